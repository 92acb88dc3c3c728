"""Attention on the CPU: the jnp reference against the C++ kernel
(jaxinfer/kernels/cpu/paged_attention.cc), one layer of SmolLM2-135M's shapes, decode rows and
prefill chunks.

    python benchmarks/cpu_attention.py                 # the table below, JSON to --out
    python benchmarks/cpu_attention.py --quick         # smoke run (tests/kernels runs it)
    python benchmarks/cpu_attention.py --kv-cache-dtype fp8   # decode also on an fp8 cache

Shapes: 9 query heads, 3 kv heads, head dim 64, 16-token blocks, a float32 cache; S decode rows in
{1, 16, 64}; contexts of 128 or 512 positions, every row the same ("equal"), or drawn uniformly
from 1 .. 2 x that ("ragged", same mean: the reference runs every row as far as the longest, the
kernel each row to its own length). Block tables of shuffled blocks, as wide as the longest
context allows.

Prefill chunks (the reference's ragged path, `decode_only=False`, which scores every token of the
step against every other and masks): a 512-token step holding 16 fresh prompts of 32 tokens, 4 of
128, one of 512, and a 256-token later chunk of a prompt with 256 positions already cached
(chunked prefill), beside the kernel, which scores each token against its own sequence only.

Timing: the two are interleaved (reference, kernel, reference, kernel, ...: `--rounds` rounds of
`--repeats` calls each) because the machine is shared; each is the median over its calls, in ms
per call, after one warm-up (which compiles). The load average is printed and stored.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxinfer.kernels import paged_attention_cpu as kernel
from jaxinfer.runtime import kv_cache
from pallas_kernels import reference

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16  # SmolLM2-135M
ROWS = (1, 16, 64)
CONTEXTS = (128, 512)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def make_inputs(rows: int, context: int, ragged: bool, seed: int = 0) -> tuple:
    """Decode inputs for `rows` rows of about `context` positions each."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 2 * context + 1, rows) if ragged else np.full(rows, context)
    width = -(-int(lens.max()) // BLOCK)
    blocks = rng.permutation(rows * width) + 1
    tables = blocks.reshape(rows, width).astype(np.int32)
    cache_shape = (KV_HEADS, rows * width + 1, BLOCK, HEAD_DIM)
    k_cache = rng.standard_normal(cache_shape, np.float32)
    v_cache = rng.standard_normal(cache_shape, np.float32)
    q = rng.standard_normal((rows, HEADS, HEAD_DIM), np.float32)
    k_new = rng.standard_normal((rows, KV_HEADS, HEAD_DIM), np.float32)
    v_new = rng.standard_normal((rows, KV_HEADS, HEAD_DIM), np.float32)
    starts = np.arange(rows + 1, dtype=np.int32)
    arrays = (q, k_new, v_new, k_cache, v_cache, tables, lens.astype(np.int32), starts)
    return tuple(jnp.asarray(a) for a in arrays)


PREFILL = {  # name -> (cached positions, new tokens) of each sequence of a 512-token step
    "16 x 32 fresh": ((0, 32),) * 16,
    "4 x 128 fresh": ((0, 128),) * 4,
    "1 x 512 fresh": ((0, 512),),
    "256 after 256 cached": ((256, 256),),
}


def make_prefill_inputs(seqs: tuple[tuple[int, int], ...], seed: int = 0) -> tuple:
    """One prefill step: sequence s feeds seqs[s][1] tokens after seqs[s][0] cached positions."""
    rng = np.random.default_rng(seed)
    lens = np.array([cached + new for cached, new in seqs], np.int32)
    width = -(-int(lens.max()) // BLOCK)
    tables = (rng.permutation(len(seqs) * width) + 1).reshape(len(seqs), width).astype(np.int32)
    cache_shape = (KV_HEADS, len(seqs) * width + 1, BLOCK, HEAD_DIM)
    k_cache = rng.standard_normal(cache_shape, np.float32)
    v_cache = rng.standard_normal(cache_shape, np.float32)
    tokens = sum(new for _, new in seqs)
    q = rng.standard_normal((tokens, HEADS, HEAD_DIM), np.float32)
    k_new = rng.standard_normal((tokens, KV_HEADS, HEAD_DIM), np.float32)
    v_new = rng.standard_normal((tokens, KV_HEADS, HEAD_DIM), np.float32)
    starts = np.cumsum([0] + [new for _, new in seqs]).astype(np.int32)
    arrays = (q, k_new, v_new, k_cache, v_cache, tables, lens, starts)
    return tuple(jnp.asarray(a) for a in arrays)


def _time_both(
    args: tuple, decode_only: bool, rounds: int, repeats: int, fp8: str | None = None
) -> dict:
    """The reference and the kernel on the float32 cache; with `fp8` (a kv_cache_dtype) also the
    kernel on the same cache rounded to it and kept as bytes, as the engine keeps it."""
    scale = HEAD_DIM**-0.5
    functions = {
        "reference": jax.jit(
            lambda *a: reference.paged_attention(*a, scale=scale, decode_only=decode_only)
        ),
        "kernel": jax.jit(lambda *a: kernel.paged_attention(*a, scale=scale)),
    }
    inputs = dict.fromkeys(functions, args)
    if fp8 is not None:
        dtype = kv_cache.cache_dtype(fp8, "float32")
        functions["kernel_fp8"] = jax.jit(
            lambda *a: kernel.paged_attention(*a, scale=scale, cache_dtype=dtype)
        )
        inputs["kernel_fp8"] = (
            *args[:3],
            *(kv_cache.encode(c, dtype) for c in args[3:5]),
            *args[5:],
        )
    outputs = {name: np.asarray(f(*inputs[name])) for name, f in functions.items()}  # compile
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            for _ in range(repeats):
                started = time.perf_counter()
                jax.block_until_ready(function(*inputs[name]))
                samples[name].append(time.perf_counter() - started)
    reference_ms = 1e3 * statistics.median(samples["reference"])
    kernel_ms = 1e3 * statistics.median(samples["kernel"])
    timed = {
        "reference_ms": reference_ms,
        "kernel_ms": kernel_ms,
        "speedup": reference_ms / kernel_ms,
        "max_abs_diff": float(np.abs(outputs["reference"] - outputs["kernel"]).max()),
    }
    if fp8 is not None:
        timed["kernel_fp8_ms"] = 1e3 * statistics.median(samples["kernel_fp8"])
    return timed


def measure(
    rows: int, context: int, ragged: bool, rounds: int, repeats: int, fp8: str | None = None
) -> dict:
    timed = _time_both(make_inputs(rows, context, ragged), True, rounds, repeats, fp8)
    return {"rows": rows, "context": context, "contexts": "ragged" if ragged else "equal", **timed}


def measure_prefill(name: str, rounds: int, repeats: int) -> dict:
    timed = _time_both(make_prefill_inputs(PREFILL[name]), False, rounds, repeats)
    return {"step": name, "tokens": sum(new for _, new in PREFILL[name]), **timed}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 x 2 calls, S 1 and 16, 128")
    p.add_argument(
        "--kv-cache-dtype",
        choices=("fp8", "fp8_e4m3", "fp8_e5m2"),
        help="decode rows also through the kernel on the cache in this 8-bit float (as bytes)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("cpu_attention.json"))
    args = p.parse_args(argv)
    if not kernel.cpu_kernel_enabled():
        raise SystemExit("the CPU paged-attention kernel is not available here (see the warning)")
    rounds, repeats = (2, 2) if args.quick else (args.rounds, args.repeats)
    load_before = _loadavg()
    results = [
        measure(rows, context, ragged, rounds, repeats, args.kv_cache_dtype)
        for rows in (ROWS[:2] if args.quick else ROWS)
        for context in (CONTEXTS[:1] if args.quick else CONTEXTS)
        for ragged in (False, True)
    ]
    prefill = [
        measure_prefill(name, rounds, repeats)
        for name in (list(PREFILL)[1:2] if args.quick else PREFILL)
    ]
    report = {
        "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block": BLOCK},
        "kernel_isa": kernel.kernel_isa(),
        "jax": jax.__version__,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "rounds": rounds,
        "repeats": repeats,
        "kv_cache_dtype": args.kv_cache_dtype,
        "results": results,
        "prefill": prefill,
    }
    print(f"load average before {load_before}, after {report['loadavg_after']}")
    fp8 = f" kernel {args.kv_cache_dtype} ms |" if args.kv_cache_dtype else ""
    print(f"| S | context | rows | reference ms | kernel ms | speedup | max abs diff |{fp8}")
    print("|---:|---:|---|---:|---:|---:|---:|" + ("---:|" if fp8 else ""))
    for r in results:
        print(
            f"| {r['rows']} | {r['context']} | {r['contexts']} | {r['reference_ms']:.3f} | "
            f"{r['kernel_ms']:.3f} | {r['speedup']:.1f}x | {r['max_abs_diff']:.1e} |"
            + (f" {r['kernel_fp8_ms']:.3f} |" if fp8 else "")
        )
    print("\n| prefill step (512 tokens) | reference ms | kernel ms | speedup | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for r in prefill:
        print(
            f"| {r['step']} | {r['reference_ms']:.3f} | {r['kernel_ms']:.3f} | "
            f"{r['speedup']:.1f}x | {r['max_abs_diff']:.1e} |"
        )
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
