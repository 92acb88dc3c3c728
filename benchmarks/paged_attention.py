"""Paged attention speed: our Pallas kernel beside XLA (the jnp reference under jit), JAX's own
(deprecated) Pallas GPU decode kernel where it still runs, and dense flash attention for prefill.

    python benchmarks/paged_attention.py            # on a GPU: the full grid below
    python benchmarks/paged_attention.py --quick    # CPU smoke run (reference only; tiny shapes)

What is measured, and why:

* Decode is memory-bound: each step reads every cached K/V byte of the batch once. So decode is
  reported as achieved bandwidth, (K + V bytes of the batch's contexts) / time, beside the
  device's read bandwidth measured in the same run (best of 10 jitted sums over 4 GiB,
  roofline.py's measure; over 1 GiB the H200 read 2.6-2.7 TB/s, the sum's fixed cost showing),
  which is what a perfect kernel could approach. Goal: >= 80% of it at long context. (Until 2026-12-04 the bound was a copy's read + write rate, `a + 1`: on the H200
  it read 2.3 TB/s against 3.8 TB/s for the sum, and the kernel's reads came out at 1.2x "the
  bound".)
* Prefill (fresh prompts, causal) is compute-bound: reported as TFLOP/s (2 matmuls of
  2 * L^2 / 2 * H * D flops per sequence) beside `jax.nn.dot_product_attention(is_causal=True)` on
  the same dense tensors (cuDNN flash attention on GPU). Goal: within 1.5x of it.
* The KV write (the new tokens' K/V scattered into their slots, a separate donated call in the
  engine) is timed too, as bandwidth of the bytes written.
* Shape: Llama-3-8B attention (32 query heads, 8 kv heads, head dim 128), bfloat16, block size 16.

Each timing is the median of `--repeats` runs after one warm-up, with `block_until_ready`; decode
also reports `back_to_back_ms` (20 calls dispatched back to back, waited for once: the small
cells' device time without the host's per-call wait).
Results: a table on stdout, JSON to `--out` (device kind and jax version included).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # roofline.py beside this file
from roofline import measure_device_bandwidth

from pallas_kernels import paged_attention as kernel
from pallas_kernels import reference


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of fn(*args) after one warm-up call (which also compiles)."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def timed_back_to_back(fn, *args, calls: int = 20) -> float:
    """Seconds per call of `calls` calls dispatched back to back and waited for once (after one
    warm-up call): the host's per-call dispatch and wait no longer add to each call, so a call of
    ~0.1 ms is timed by the device's work (while that exceeds the dispatch's own cost). Why: on
    the H200, host-timed medians of unchanged code moved up to 2x between runs at that size."""
    jax.block_until_ready(fn(*args))
    started = time.perf_counter()
    results = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(results)
    return (time.perf_counter() - started) / calls


def random_paged_batch(key, args, *, batch: int, context: int, q_len: int):
    """A batch whose sequences each own `ceil(context / block_size)` shuffled blocks (head counts,
    head dim, block size and dtype from the command line's `args`)."""
    heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    block_size, dtype = args.block_size, args.dtype
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq + 1  # block 0: the padding sink
    keys = jax.random.split(key, 6)
    cache_shape = (kv_heads, num_blocks, block_size, head_dim)
    k_cache = jax.random.normal(keys[0], cache_shape, dtype)
    v_cache = jax.random.normal(keys[1], cache_shape, dtype)
    tables = 1 + jax.random.permutation(keys[2], batch * blocks_per_seq).astype(jnp.int32)
    tables = tables.reshape(batch, blocks_per_seq)
    tokens = batch * q_len
    q = jax.random.normal(keys[3], (tokens, heads, head_dim), dtype)
    k_new = jax.random.normal(keys[4], (tokens, kv_heads, head_dim), dtype)
    v_new = jax.random.normal(keys[5], (tokens, kv_heads, head_dim), dtype)
    context_lens = jnp.full((batch,), context, jnp.int32)
    query_start_loc = jnp.arange(batch + 1, dtype=jnp.int32) * q_len
    return q, k_new, v_new, k_cache, v_cache, tables, context_lens, query_start_loc


def implementations(args, decode_only: bool) -> dict:
    scale = args.head_dim**-0.5
    impls = {
        "xla_reference": jax.jit(
            functools.partial(reference.paged_attention, scale=scale, decode_only=decode_only)
        )
    }
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu or args.interpret:
        impls["pallas"] = jax.jit(
            functools.partial(
                kernel.paged_attention,
                scale=scale,
                decode_only=decode_only,
                interpret=not on_gpu,
            )
        )
    if on_gpu and decode_only:
        try:  # deprecated since jax 0.11; measured while it still exists
            from jax.experimental.pallas.ops.gpu import paged_attention as jax_op

            def jax_decode(q, k_new, v_new, k_cache, v_cache, tables, lens, qsl):
                # Its table must split into k_splits (16) partitions: pad it with the sink
                # block, which `lens` masks (the full grid's tables need no padding).
                tables = jnp.pad(tables, ((0, 0), (0, -tables.shape[1] % 16)))
                return jax_op.paged_attention(q, k_cache, v_cache, tables, lens)

            impls["jax_pallas_gpu_decode"] = jax.jit(jax_decode)
        except ImportError:
            pass
    return impls


def bench_decode(args, read_rate: float) -> list[dict]:
    rows = []
    itemsize = jnp.dtype(args.dtype).itemsize
    for batch in args.batches:
        for context in args.contexts:
            kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * itemsize
            if kv_bytes > args.max_cache_gb * 1e9:
                continue
            inputs = random_paged_batch(
                jax.random.key(0), args, batch=batch, context=context, q_len=1
            )
            for name, fn in implementations(args, decode_only=True).items():
                try:
                    seconds = timed(fn, *inputs, repeats=args.repeats)
                except Exception as error:  # noqa: BLE001 (report it, keep measuring the others)
                    rows.append(
                        {
                            "case": "decode",
                            "impl": name,
                            "batch": batch,
                            "context": context,
                            "error": str(error)[:200],
                        }
                    )
                    continue
                rate = kv_bytes / seconds
                rows.append(
                    {
                        "case": "decode",
                        "impl": name,
                        "batch": batch,
                        "context": context,
                        "ms": seconds * 1e3,
                        "GB/s": rate / 1e9,
                        "of_read_bw": rate / read_rate,
                        "back_to_back_ms": timed_back_to_back(fn, *inputs) * 1e3,
                    }
                )
            del inputs
    return rows


def dense_attention_seconds(dense_args, repeats: int) -> tuple[str, float]:
    """`jax.nn.dot_product_attention(is_causal=True)` timed with cuDNN's flash attention where it
    runs (asked for by name: the default, `implementation=None`, ran at ~52 TFLOP/s at 8k on the
    H200 with jax 0.11.2, by all appearances XLA's unfused attention), else XLA's.
    -> (implementation, seconds)."""

    def seconds_with(implementation: str) -> float:
        attention = functools.partial(
            jax.nn.dot_product_attention, is_causal=True, implementation=implementation
        )
        return timed(jax.jit(attention), *dense_args, repeats=repeats)

    if jax.default_backend() == "gpu":
        try:
            return "cudnn", seconds_with("cudnn")
        except Exception as error:  # noqa: BLE001 (any failure: say so, time XLA's instead)
            print(
                f"cuDNN attention did not run ({str(error)[:120]}); timing XLA's", file=sys.stderr
            )
    return "xla", seconds_with("xla")


def bench_prefill(args) -> list[dict]:
    rows = []
    for seq_len in args.prefill_lens:
        batch = max(1, args.prefill_tokens // seq_len)
        inputs = random_paged_batch(
            jax.random.key(1), args, batch=batch, context=seq_len, q_len=seq_len
        )
        flops = 4 * batch * seq_len * seq_len / 2 * args.heads * args.head_dim
        for name, fn in implementations(args, decode_only=False).items():
            seconds = timed(fn, *inputs, repeats=args.repeats)
            rows.append(
                {
                    "case": "prefill",
                    "impl": name,
                    "batch": batch,
                    "context": seq_len,
                    "ms": seconds * 1e3,
                    "TFLOP/s": flops / seconds / 1e12,
                }
            )
        q, k_new, v_new = inputs[:3]
        shape = (batch, seq_len)
        dense_args = (
            q.reshape(*shape, args.heads, args.head_dim),
            k_new.reshape(*shape, args.kv_heads, args.head_dim),
            v_new.reshape(*shape, args.kv_heads, args.head_dim),
        )
        implementation, seconds = dense_attention_seconds(dense_args, args.repeats)
        rows.append(
            {
                "case": "prefill",
                "impl": "dense_dot_product_attention",
                "implementation": implementation,
                "batch": batch,
                "context": seq_len,
                "ms": seconds * 1e3,
                "TFLOP/s": flops / seconds / 1e12,
            }
        )
    return rows


def bench_kv_write(args) -> list[dict]:
    rows = []
    itemsize = jnp.dtype(args.dtype).itemsize
    write = jax.jit(reference.write_kv, donate_argnums=(0, 1))
    for tokens in (args.batches[-1], args.prefill_tokens):
        inputs = random_paged_batch(
            jax.random.key(2), args, batch=tokens, context=args.block_size, q_len=1
        )
        _, k_new, v_new, k_cache, v_cache, tables, _, _ = inputs
        slots = tables[:, 0] * args.block_size
        caches = [(k_cache, v_cache)]

        def step(k_new=k_new, v_new=v_new, slots=slots, caches=caches):
            caches[0] = write(*caches[0], k_new, v_new, slots)
            return caches[0]

        seconds = timed(step, repeats=args.repeats)
        written = 2 * tokens * args.kv_heads * args.head_dim * itemsize
        rows.append(
            {
                "case": "kv_write",
                "impl": "xla_scatter",
                "batch": tokens,
                "context": 0,
                "ms": seconds * 1e3,
                "GB/s": written / seconds / 1e9,
            }
        )
    return rows


COLUMNS = (
    "case",
    "impl",
    "batch",
    "context",
    "ms",
    "back_to_back_ms",
    "GB/s",
    "of_read_bw",
    "TFLOP/s",
    "error",
)


def format_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """A markdown table of `rows` (missing cells empty, floats to 3 significant digits)."""
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def run_header(args, read_rate: float, note: str = "") -> dict:
    """The run's device, versions, shape and read bandwidth (JSON), also printed as one line."""
    device = jax.devices()[0]
    print(
        f"{device.device_kind} ({device.platform}), jax {jax.__version__}, {args.dtype}; "
        f"device read bandwidth {read_rate / 1e9:.1f} GB/s{note}"
    )
    return {
        "device": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "dtype": str(args.dtype),
        "shape": {
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "block_size": args.block_size,
        },
        "read_bandwidth_GB/s": read_rate / 1e9,
    }


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run)")
    parser.add_argument("--interpret", action="store_true", help="run the kernel interpreted")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-cache-gb", type=float, default=24.0)
    parser.add_argument(
        "--batches", type=_sizes, default=[1, 8, 32, 64, 128, 256], help="decode batch sizes"
    )
    parser.add_argument(
        "--contexts", type=_sizes, default=[512, 2048, 8192, 32768], help="decode context lengths"
    )
    parser.add_argument(
        "--prefill-lens", type=_sizes, default=[512, 2048, 8192], help="prefill prompt lengths"
    )
    parser.add_argument("--out", default=str(Path(__file__).with_name("paged_attention.json")))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.dtype = jnp.dtype(args.dtype)
    args.heads, args.kv_heads, args.head_dim, args.block_size = 32, 8, 128, 16
    args.prefill_tokens = 8192
    read_bytes = 4 << 30  # roofline.py's size: at 1 GiB a sum's launch cost shows (2.6 vs 3.8 TB/s)
    if args.quick:
        args.heads, args.kv_heads, args.head_dim = 4, 1, 64
        args.batches, args.contexts = [3], [200]
        args.prefill_lens, args.prefill_tokens = [64], 128
        args.repeats = 1
        read_bytes = 1 << 22

    read_rate = measure_device_bandwidth(read_bytes, max(args.repeats, 10))
    rows = bench_decode(args, read_rate) + bench_prefill(args) + bench_kv_write(args)
    result = {**run_header(args, read_rate), "rows": rows}
    print(format_table(rows))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
