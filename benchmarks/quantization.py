"""What weight-only int8 (`EngineConfig.quantization="int8"`) does on this machine.

    python benchmarks/quantization.py            # SmolLM2-135M (GGUF), 2 rounds
    python benchmarks/quantization.py --quick    # checks the script

1. The product alone, SmolLM2's shapes [B, 576] x [576, 1536] (an MLP projection) and
   [576, 49152] (the tied lm_head), B = 1 and 16, median ms per call:
   float32 weight; int8 converted whole (`x @ values.astype(f32) * scale`, what XLA:CPU does with
   the obvious code); int8 by blocks of 128 output channels (the engine's `quantized_matmul`);
   int8 x int8 with a dynamically quantized activation (`preferred_element_type=int32`: W8A8, a
   different accuracy contract, shown for what XLA:CPU's integer dot can do). Also whether the
   compiled HLO of the obvious code materializes a float32 copy of the weight (a `convert` whose
   result has the weight's shape, outside the dot).
2. The engine: SmolLM2 decode steps at batch 1 and 16, float32 vs int8, modes interleaved
   (decode ms per step = (generate N tokens - generate 1 token) / (N - 1), median over rounds),
   the weight bytes on the device, the bytes of weights read per decoded token (every weight once
   per step, shared by the batch), and the bandwidth bound on the step (weight bytes / the
   machine's read bandwidth, benchmarks/roofline.py). Results: a table and `--out` JSON; numbers
   go to RESULTS.md by hand with the machine named.
"""

from __future__ import annotations

import argparse
import json
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
        blocked = QuantizedWeight(
            values=jnp.asarray(values), scale=jnp.asarray(scale), transposed=True,
            dtype_name="float32",
        )  # fmt: skip
        values_in_out = jnp.asarray(np.ascontiguousarray(values.T))
        hlo = jax.jit(whole).lower(jnp.ones((1, HIDDEN)), values_in_out, scale).compile().as_text()
        materialized = f"f32[{HIDDEN},{out}]" in hlo and "convert(" in hlo
        for batch in (1, 16):
            x = jnp.asarray(rng.standard_normal((batch, HIDDEN)).astype(np.float32))
            row = {
                "float32": _median_ms(jax.jit(jnp.dot), (x, jnp.asarray(weight)), repeats),
                "int8 whole convert": _median_ms(
                    jax.jit(whole), (x, values_in_out, jnp.asarray(scale)), repeats
                ),
                "int8 blocks (engine)": _median_ms(
                    jax.jit(quantized_matmul), (x, blocked), repeats
                ),
                "int8 x int8 (W8A8)": _median_ms(
                    jax.jit(int8_int8), (x, values_in_out, jnp.asarray(scale)), repeats
                ),
            }
            rows[f"{label} B={batch}"] = {"ms": row, "hlo_materializes_f32_weight": materialized}
    return rows


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
    p.add_argument("--out", default=str(here / "quantization.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens = 1, 8

    from jaxinfer import LLM, EngineConfig

    products = product_table(repeats=5 if args.quick else 30)
    print(f"\n{'product':>26} " + " ".join(f"{k:>21}" for k in next(iter(products.values()))["ms"]))
    for label, row in products.items():
        cells = " ".join(f"{v:18.3f} ms" for v in row["ms"].values())
        print(f"{label:>26} {cells}   float32 copy in HLO: {row['hlo_materializes_f32_weight']}")

    files = throughput.resolve_model("smollm2", Path("~/.cache/jaxinfer/benchmarks").expanduser())
    rates = roofline.measure_machine(quick=True)
    engines = {}
    for mode in ("float32", "int8"):
        config = EngineConfig(
            model=files.path,
            dtype="float32",
            quantization=None if mode == "float32" else "int8",
            max_model_len=256,
            num_kv_blocks=160,
            max_num_seqs=16,
        )
        engines[mode] = LLM(config)
    steps: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for batch in (1, 16):
            for mode, llm in engines.items():  # interleaved: drift hits both modes alike
                steps.setdefault((mode, batch), []).append(decode_ms(llm, batch, args.new_tokens))
    summary = {}
    print(
        f"\n{'mode':>8} {'batch':>5} {'ms/step':>8} {'tok/s':>7} {'weights MB':>10} "
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
            f"{mode:>8} {batch:5d} {step_ms:8.2f} {row['tokens_per_s']:7.1f} "
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
                "bandwidth_bytes_s": rates.bandwidth_bytes_s,
                "products": products,
                "decode": summary,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
