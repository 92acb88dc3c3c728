"""What weight-only int8 (`EngineConfig.quantization="int8"`) and a GGUF kept in its blocks
(`quantization="gguf"`) do on this machine.

    python benchmarks/quantization.py            # SmolLM2-135M (GGUF), 2 rounds
    python benchmarks/quantization.py --quick    # checks the script

1. The product alone, SmolLM2's shapes [B, 576] x [576, 1536] (an MLP projection) and
   [576, 49152] (the tied lm_head), B = 1 and 16, median ms per call:
   float32 weight; int8 converted whole (`x @ values.astype(f32) * scale`, what XLA:CPU does with
   the obvious code); int8 by blocks of 128 output channels (`quantized_matmul`'s XLA path);
   int8 through the CPU kernel behind `jax.ffi` (`quantized_matmul` on CPU;
   jaxinfer/kernels/cpu/int8_matmul.cc), with all of XLA's intra-op threads and with one;
   int8 x int8 with a dynamically quantized activation (`preferred_element_type=int32`: W8A8, a
   different accuracy contract, shown for what XLA:CPU's integer dot can do). Also whether the
   compiled HLO of the obvious code materializes a float32 copy of the weight (a `convert` whose
   result has the weight's shape, outside the dot), and the kernel's int8 bytes per second.
   Then the GGUF block kernel per type (Q8_0, Q4_1, Q4_K, Q6_K) on SmolLM2's down projection
   [B, 1536] x [1536, 576] (the K-quants need `in` a multiple of 256; 576 is not), against float32.
   `--products-only` stops here.
2. Every product of one decode step, alone: one jitted call running all of SmolLM2's linear
   weights (30 layers and the lm_head; 135 MB in int8, far beyond the caches) at B rows, per
   mode: ms, the weight bytes it reads, and the resulting GB/s against the measured bandwidth
   (the "gguf" mode's lm_head is the Q8_0 token table's transpose). The engine fuses each layer's
   q/k/v and gate/up (4 products per layer instead of 7, models/fused_projections.py); the
   "separate" rows load the same weights unfused. Best of the rounds, interleaved.
3. The engine: SmolLM2 decode steps at batch 1 and 16: float32, int8 through XLA's blocked path
   (`JAXINFER_CPU_KERNELS=0` while it compiles), int8 through the kernel and the GGUF's own
   Q4_1 / Q8_0 blocks through their kernel (jaxinfer/kernels/cpu/gguf_matmul.cc), interleaved
   (decode ms per step = (generate N tokens - generate 1 token) / (N - 1), median over rounds),
   the weight bytes on the device, the bytes of weights read per step (every weight once per
   step, shared by the batch), and the bandwidth bound on the step (weight bytes / the machine's
   read bandwidth, benchmarks/roofline.py). Results: tables and `--out` JSON; numbers go to
   RESULTS.md by hand with the machine named.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline
import throughput

HIDDEN = 576
SHAPES = {"mlp [576, 1536]": 1536, "lm_head [576, 49152]": 49152}
MODES = ("float32", "int8 xla", "int8 kernel", "gguf blocks")
QUANTIZATION = {"float32": None, "int8 xla": "int8", "int8 kernel": "int8", "gguf blocks": "gguf"}


@contextlib.contextmanager
def cpu_kernels(enabled: bool):
    """`quantized_matmul` decides when traced: what is compiled inside the block keeps the path."""
    before = os.environ.get("JAXINFER_CPU_KERNELS")
    os.environ["JAXINFER_CPU_KERNELS"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["JAXINFER_CPU_KERNELS"]
        else:
            os.environ["JAXINFER_CPU_KERNELS"] = before


def _median_ms(fn, args, repeats: int) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def product_table(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxinfer.kernels.int8_matmul import int8_matmul
    from jaxinfer.models.quantization import QuantizedWeight, quantize_int8, quantized_matmul

    def whole(x, values, scale):  # values [in, out]
        return (x @ values.astype(jnp.float32)) * scale

    def int8_int8(x, values, scale):
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        x_scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        xq = jnp.round(x / x_scale).astype(jnp.int8)
        acc = jax.lax.dot_general(
            xq, values, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        )
        return acc.astype(jnp.float32) * x_scale * scale

    rng = np.random.default_rng(0)
    rows = {}
    for label, out in SHAPES.items():
        weight = rng.standard_normal((HIDDEN, out)).astype(np.float32)
        values, scale = quantize_int8(weight.T)  # [out, in]
        blocked = QuantizedWeight.from_rows(values, scale, transposed=True, dtype_name="float32")
        values_in_out = jnp.asarray(np.ascontiguousarray(values.T))
        hlo = jax.jit(whole).lower(jnp.ones((1, HIDDEN)), values_in_out, scale).compile().as_text()
        materialized = f"f32[{HIDDEN},{out}]" in hlo and "convert(" in hlo
        for batch in (1, 16):
            x = jnp.asarray(rng.standard_normal((batch, HIDDEN)).astype(np.float32))
            with cpu_kernels(False):  # a new function per path: jit caches traces by function
                xla_blocks = jax.jit(lambda x, w: quantized_matmul(x, w))
                xla_blocks.lower(x, blocked).compile()
                ms_xla_blocks = _median_ms(xla_blocks, (x, blocked), repeats)
            one_thread = functools.partial(int8_matmul, max_threads=1)
            kernel_args = (x, blocked.values, blocked.scale)
            row = {
                "float32": _median_ms(jax.jit(jnp.dot), (x, jnp.asarray(weight)), repeats),
                "int8 whole convert": _median_ms(
                    jax.jit(whole), (x, values_in_out, jnp.asarray(scale)), repeats
                ),
                "int8 blocks (XLA)": ms_xla_blocks,
                "int8 kernel": _median_ms(jax.jit(int8_matmul), kernel_args, repeats),
                "int8 kernel 1 thread": _median_ms(jax.jit(one_thread), kernel_args, repeats),
                "int8 x int8 (W8A8)": _median_ms(
                    jax.jit(int8_int8), (x, values_in_out, jnp.asarray(scale)), repeats
                ),
            }
            rows[f"{label} B={batch}"] = {
                "ms": row,
                "hlo_materializes_f32_weight": materialized,
                "kernel_int8_gb_s": values.nbytes / row["int8 kernel"] / 1e6,
            }
    return rows


BLOCK_PRODUCT = (1536, 576)  # [in, out]
BLOCK_TYPES_TIMED = ("Q8_0", "Q4_1", "Q4_K", "Q6_K")


def _timing_blocks(qtype: str, rows: int, cols: int, rng):
    """GGUFBlocks [rows, cols] to time: gguf-py's quantization of a Gaussian matrix, or for the
    K-quants (gguf-py cannot quantize them) random bytes with a finite float16 d (and dmin)."""
    import gguf

    from jaxinfer.models.gguf_blocks import LAYOUTS, GGUFBlocks

    ggml_type = gguf.GGMLQuantizationType[qtype]
    if qtype in ("Q4_K", "Q6_K"):
        _, size = gguf.GGML_QUANT_SIZES[ggml_type]
        stored = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
        at, width = LAYOUTS[qtype].scale, 4 if qtype == "Q4_K" else 2
        halves = np.full((rows, cols // 256, width // 2), 0.01, np.float16)
        stored[..., at : at + width] = halves.view(np.uint8)
        stored = stored.reshape(rows, -1)
    else:
        stored = gguf.quants.quantize(
            rng.standard_normal((rows, cols)).astype(np.float32), ggml_type
        )
    return GGUFBlocks.split(stored, qtype)


def block_product_table(repeats: int) -> dict:
    """The GGUF block kernel alone per type on one [in, out] product: median ms and GB/s, the
    types interleaved in every repeat (so that the shared machine's drift hits them alike)."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.kernels.gguf_matmul import gguf_matmul

    rng = np.random.default_rng(1)
    in_features, out_features = BLOCK_PRODUCT
    weight = jnp.asarray(rng.standard_normal((in_features, out_features)).astype(np.float32))
    blocks = {q: _timing_blocks(q, out_features, in_features, rng) for q in BLOCK_TYPES_TIMED}
    rows = {}
    for batch in (1, 16):
        x = jnp.asarray(rng.standard_normal((batch, in_features)).astype(np.float32))
        calls = {"float32": (jax.jit(jnp.dot), (x, weight), weight.nbytes)}
        for qtype, block in blocks.items():
            arrays = [None if a is None else jnp.asarray(a) for a in block.arrays]
            product = jax.jit(functools.partial(gguf_matmul, qtype))
            calls[qtype] = (product, (x, *arrays), block.nbytes)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for fn, args, _ in calls.values():
            fn(*args).block_until_ready()  # compile
        for _ in range(repeats):
            for name, (fn, args, _) in calls.items():
                started = time.perf_counter()
                fn(*args).block_until_ready()
                times[name].append(time.perf_counter() - started)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        gb_s = {name: calls[name][2] / ms[name] / 1e6 for name in calls}
        rows[f"[{in_features}, {out_features}] B={batch}"] = {"ms": ms, "weight_gb_s": gb_s}
    return rows


def _linear_weights(params) -> list:
    """Every weight a decode step multiplies by (not the embedding gather): the layers' 2-D
    weights and the lm_head (the tied embedding's transpose when there is no lm_head)."""
    import jax

    from jaxinfer.models.gguf_weight import GGUFBlockWeight
    from jaxinfer.models.quantization import QuantizedWeight

    def is_leaf(x):
        return isinstance(x, QuantizedWeight | GGUFBlockWeight)

    weights = [
        leaf
        for layer in params["layers"]
        for leaf in jax.tree_util.tree_leaves(layer, is_leaf=is_leaf)
        if is_leaf(leaf) or leaf.ndim == 2
    ]
    return [*weights, params["lm_head"] if "lm_head" in params else params["embed"].T]


def step_products(params: dict, batch: int, kernel: bool, repeats: int) -> dict:
    """All of one step's weight products, alone, at `batch` rows: ms and weight GB/s."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.models.invariant import matmul

    weights = _linear_weights(params)
    widths = sorted({w.shape[0] for w in weights})
    rng = np.random.default_rng(batch)
    xs = {n: jnp.asarray(rng.standard_normal((batch, n)).astype(np.float32)) for n in widths}

    def products(xs, weights):
        return [matmul(xs[w.shape[0]], w) for w in weights]  # the step's own dispatch

    with cpu_kernels(kernel):
        jitted = jax.jit(lambda xs, weights: products(xs, weights))
        jitted.lower(xs, weights).compile()

    def call(xs, weights):
        return jax.block_until_ready(jitted(xs, weights))[-1]

    ms = _median_ms(call, (xs, weights), repeats)
    weight_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(weights))
    return {"ms": ms, "weight_bytes": weight_bytes, "gb_s": weight_bytes / ms / 1e6}


def decode_ms(llm, batch: int, new_tokens: int) -> float:
    from jaxinfer import SamplingParams

    prompts = [{"prompt_token_ids": list(range(100 + i, 116 + i))} for i in range(batch)]

    def run(tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        started = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - started

    run(new_tokens)  # compiles every bucket on the way
    return 1e3 * (run(new_tokens) - run(1)) / (new_tokens - 1)


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--products-only", action="store_true", help="only the product tables")
    p.add_argument("--out", default=str(here / "quantization.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens = 1, 8

    from jaxinfer import LLM, EngineConfig
    from jaxinfer.kernels.gguf_matmul import kernel_isa as gguf_kernel_isa
    from jaxinfer.kernels.int8_matmul import kernel_isa
    from jaxinfer.models.loader import CheckpointSource, load_model

    print(f"int8 kernel build: {kernel_isa()}; gguf block kernels: {gguf_kernel_isa()}")
    products = product_table(repeats=5 if args.quick else 30)
    print(f"\n{'product':>26} " + " ".join(f"{k:>21}" for k in next(iter(products.values()))["ms"]))
    for label, row in products.items():
        cells = " ".join(f"{v:18.3f} ms" for v in row["ms"].values())
        print(
            f"{label:>26} {cells}   float32 copy in HLO: {row['hlo_materializes_f32_weight']}; "
            f"kernel reads int8 at {row['kernel_int8_gb_s']:.1f} GB/s"
        )
    block_products = block_product_table(repeats=5 if args.quick else 200)
    print(
        f"\n{'GGUF block kernel':>26} "
        + " ".join(f"{k:>15}" for k in ("float32", *BLOCK_TYPES_TIMED))
    )
    for label, row in block_products.items():
        cells = " ".join(f"{row['ms'][k]:12.3f} ms" for k in ("float32", *BLOCK_TYPES_TIMED))
        rates_cells = ", ".join(f"{k} {v:.1f}" for k, v in row["weight_gb_s"].items())
        print(f"{label:>26} {cells}   weight GB/s: {rates_cells}")
    if args.products_only:
        out = {"machine": throughput.machine_info(), "products": products}
        Path(args.out).write_text(json.dumps({**out, "block_products": block_products}, indent=2))
        print(f"wrote {args.out}")
        return 0

    files = throughput.resolve_model("smollm2", Path("~/.cache/jaxinfer/benchmarks").expanduser())
    rates = roofline.measure_machine(quick=args.quick)
    engines = {}
    for mode in MODES:
        config = EngineConfig(
            model=files.path,
            dtype="float32",
            quantization=QUANTIZATION[mode],
            max_model_len=256,
            num_kv_blocks=160,
            max_num_seqs=16,
        )
        engines[mode] = LLM(config)

    # The engines hold q/k/v and gate/up fused (models/fused_projections.py); "separate" rows
    # load the same weights with the 7 products per layer kept apart, for the comparison.
    source = CheckpointSource.resolve(files.path)
    weight_sets = {mode: llm.llm_engine.model.params for mode, llm in engines.items()}
    for mode in ("int8 kernel", "gguf blocks"):
        weight_sets[f"{mode} separate"] = load_model(
            source, "float32", quantization=QUANTIZATION[mode], fuse_quantized_projections=False
        ).params
    alone = {}
    print(f"\n{'step products alone':>22} {'batch':>5} {'ms':>8} {'weights MB':>10} {'GB/s':>6}")
    for _ in range(args.rounds):  # interleaved rounds: the fused / separate pairs are close
        for batch in (1, 16):
            for mode, params in weight_sets.items():
                row = step_products(
                    params, batch, mode != "int8 xla", repeats=3 if args.quick else 10
                )
                alone.setdefault(f"{mode} B={batch}", []).append(row)
    for name, rows in alone.items():
        row = min(rows, key=lambda r: r["ms"])
        alone[name] = {**row, "rounds_ms": [r["ms"] for r in rows]}
        mode, batch = name.rsplit(" B=", 1)
        print(
            f"{mode:>22} {batch:>5} {row['ms']:8.2f} {row['weight_bytes'] / 1e6:10.1f} "
            f"{row['gb_s']:6.1f}"
        )

    steps: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for batch in (1, 16):
            for mode, llm in engines.items():  # interleaved: drift hits every mode alike
                with cpu_kernels(mode != "int8 xla"):  # what compiles here keeps its path
                    step = decode_ms(llm, batch, args.new_tokens)
                steps.setdefault((mode, batch), []).append(step)
    summary = {}
    print(
        f"\n{'mode':>12} {'batch':>5} {'ms/step':>8} {'tok/s':>7} {'weights MB':>10} "
        f"{'read MB/token':>13} {'bound ms/step':>13} {'% of bound':>10}"
    )
    for (mode, batch), times in steps.items():
        weight_bytes = engines[mode].llm_engine.model.weight_bytes
        step_ms = statistics.median(times)
        bound_ms = 1e3 * weight_bytes / rates.bandwidth_bytes_s
        row = {
            "mode": mode,
            "batch": batch,
            "decode_ms_per_step": step_ms,
            "rounds_ms": times,
            "tokens_per_s": 1e3 * batch / step_ms,
            "weight_bytes": weight_bytes,
            "weight_bytes_read_per_token": weight_bytes / batch,
            "bandwidth_bound_ms_per_step": bound_ms,
            "fraction_of_bound": bound_ms / step_ms,
        }
        summary[f"{mode} B={batch}"] = row
        print(
            f"{mode:>12} {batch:5d} {step_ms:8.2f} {row['tokens_per_s']:7.1f} "
            f"{weight_bytes / 1e6:10.1f} {weight_bytes / batch / 1e6:13.1f} {bound_ms:13.2f} "
            f"{100 * row['fraction_of_bound']:9.0f}%"
        )
    print(f"read bandwidth {rates.bandwidth_bytes_s / 1e9:.1f} GB/s")
    for llm in engines.values():
        llm.shutdown()
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": throughput.machine_info(),
                "model": files.name,
                "kernel_isa": kernel_isa(),
                "bandwidth_bytes_s": rates.bandwidth_bytes_s,
                "products": products,
                "block_products": block_products,
                "step_products_alone": alone,
                "decode": summary,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
