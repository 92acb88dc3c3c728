"""Where a jaxinfer decode step's time goes: host against device, and the device time by piece.

    python benchmarks/step_profile.py                      # SmolLM2-135M, batch 1 and 16
    python benchmarks/step_profile.py --quantization int8
    python benchmarks/step_profile.py --quick --model /path/to/tiny/checkpoint

Method (timing, not a profiler trace: jax.profiler writes an xplane trace on CPU, but reading a
per-op table out of it needs the xprof / tensorboard-plugin-profile package, which this
environment does not have; timing pieces compiled apart needs nothing and says the same thing at
the granularity asked for):

1. The whole step, through the engine. `async_scheduling=False` (the plain loop), so a step is
   host work, then a wait for the device, never both at once. B sequences of a 16-token prompt
   generate N tokens, and again 1 token; the decode steps' share is the difference of the
   engine's counters (`EngineStats.host_seconds`, `device_wait_seconds`, `num_steps`) between the
   two runs. Host = scheduler + building the step's inputs + dispatch + reading the tokens back
   into requests + making outputs; device wait = what the host waits for after dispatching.
2. The device step alone: one decode step's (bucket, inputs), captured from the middle of the
   run (context about 16 + N/2), replayed through `ModelRunner.stage_seconds` (the step's
   executable and its K/V write, waited for), median of R.
3. The pieces, each its own jitted function on the same shapes and the engine's own parameters
   (so int8 weights go through the same `quantized_matmul`), all layers in one call, median of R:
   qkv projections, o projection, MLP (gate, up, down), lm_head (final norm + logits), attention
   (the engine's paged-attention backend over the captured step's block tables and the live KV
   cache), sampler (slot rows gathered, `sample`, logprob outputs: the step's code after the
   logits). "other" = the device step less the pieces (embedding gather, norms, rotary,
   residuals, the K/V write, launch). Pieces compiled apart lose cross-piece fusion, so they can
   add up to a little more or less than the step.

Results: a table and JSON (`--out`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPT_LEN = 16
PIECES = ("qkv", "o", "mlp", "lm_head", "attention", "sampler")


def _median_ms(fn, args: tuple, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile, and the first call's one-off costs
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def _capture_decode_step(runner, batch: int, at_step: int) -> dict:
    """Wrap `runner.dispatch` so the `at_step`-th pure decode step of `batch` rows is kept."""
    seen: dict = {"count": 0}
    original = runner.dispatch

    def dispatch(bucket, inputs, previous=None):
        if not bucket.is_prefill and int(np.sum(inputs.context_lens > 0)) == batch:
            seen["count"] += 1
            if seen["count"] == at_step:
                seen["step"] = (bucket, inputs)
        return original(bucket, inputs, previous)

    runner.dispatch = dispatch
    seen["restore"] = lambda: setattr(runner, "dispatch", original)
    return seen


def engine_step_times(llm, batch: int, new_tokens: int, rng: np.random.Generator) -> dict:
    """Per decode step: host ms and device-wait ms (counters of N tokens less those of 1)."""
    from jaxinfer import SamplingParams

    engine = llm.llm_engine
    vocab = llm.vocab_size

    def run(tokens: int) -> tuple[float, float, int, float]:
        prompts = [
            {"prompt_token_ids": rng.integers(16, vocab, PROMPT_LEN).tolist()} for _ in range(batch)
        ]
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        before = dataclasses.replace(engine.stats)
        started = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - started
        after = engine.stats
        return (
            after.host_seconds - before.host_seconds,
            after.device_wait_seconds - before.device_wait_seconds,
            after.num_steps - before.num_steps,
            wall,
        )

    run(new_tokens)  # compiles the buckets on the way; untimed
    capture = _capture_decode_step(engine.runner, batch, at_step=new_tokens // 2)
    try:
        host_n, device_n, steps_n, wall_n = run(new_tokens)
    finally:
        capture["restore"]()
    host_1, device_1, steps_1, wall_1 = run(1)
    steps = steps_n - steps_1
    return {
        "decode_steps": steps,
        "host_ms": 1e3 * (host_n - host_1) / steps,
        "device_wait_ms": 1e3 * (device_n - device_1) / steps,
        "wall_ms": 1e3 * (wall_n - wall_1) / steps,
        "captured": capture["step"],
    }


def piece_functions(runner) -> dict:
    """Each piece as (function, arguments builder); arguments built from the captured step."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.models.layers import gated_mlp, linear
    from jaxinfer.runtime.step import make_attention, sampler_inputs

    model = runner.model
    cfg = model.model_config
    static = runner.stages[-1].jit.keywords  # the step's own static arguments
    layers = runner.stages[0].params["layers"]
    params = runner.stages[-1].params

    def qkv(layers, x):
        return [(linear(x, l, "q"), linear(x, l, "k"), linear(x, l, "v")) for l in layers]

    def o(layers, x):
        return [linear(x, l, "o") for l in layers]

    def mlp(layers, x):
        return [gated_mlp(x, l) for l in layers]

    def lm_head(params, x):
        return model.family.logits(params, cfg, x)

    def attention(kv_cache, inputs, q, k, v, *, decode_rows):
        attend = make_attention(
            inputs,
            scale=cfg.head_dim**-0.5,
            decode_rows=decode_rows,
            sliding_window=cfg.sliding_window,
            paged_attention=static["paged_attention"],
        )
        return [attend(q, k, v, layer_cache) for layer_cache in kv_cache]

    def arguments(bucket, inputs) -> dict:
        rng = np.random.default_rng(0)
        t, s = bucket.num_tokens, bucket.num_seqs
        e = cfg.hidden_size

        def normal(*shape):
            return jnp.asarray(rng.standard_normal(shape).astype(np.float32))

        q_width = cfg.num_heads * cfg.head_dim
        return {
            "qkv": (jax.jit(qkv), (layers, normal(t, e))),
            "o": (jax.jit(o), (layers, normal(t, q_width))),
            "mlp": (jax.jit(mlp), (layers, normal(t, e))),
            "lm_head": (jax.jit(lm_head), (params, normal(s, e))),
            "attention": (
                jax.jit(functools.partial(attention, decode_rows=bucket.decode_rows)),
                (
                    runner.kv_cache,
                    inputs,
                    normal(t, cfg.num_heads, cfg.head_dim),
                    normal(t, cfg.num_kv_heads, cfg.head_dim),
                    normal(t, cfg.num_kv_heads, cfg.head_dim),
                ),
            ),
            # the engine's own three sampler programs in one, not donating: the slot state is
            # the engine's
            "sampler": (
                jax.jit(functools.partial(sampler, runner._sample_rows.__wrapped__)),
                (
                    normal(s, cfg.vocab_size),
                    runner.slot_state,
                    sampler_inputs(inputs),
                    {name: getattr(inputs, name) for name in ("slots", "banned", "sampled")},
                ),
            ),
        }

    return arguments


def sampler(sample_rows, logits, slot_state, rows: dict, slot_inputs: dict):
    """The runner's sampler programs in sequence: gather the rows, sample, count the tokens."""
    from jaxinfer.runtime import slot_state as slots

    slot_rows = slots.gather_rows(slot_state, slot_inputs["slots"], slot_inputs["banned"])
    outputs = sample_rows(logits, slot_rows, rows)
    counted = slots.count_sampled(
        slot_state, slot_inputs["slots"], outputs["tokens"], slot_inputs["sampled"]
    )
    return outputs, counted


def profile(llm, batch: int, new_tokens: int, repeats: int, seed: int) -> dict:
    engine = llm.llm_engine
    runner = engine.runner
    whole = engine_step_times(llm, batch, new_tokens, np.random.default_rng(seed + batch))
    bucket, inputs = whole.pop("captured")
    device_ms = 1e3 * statistics.median(
        sum(runner.stage_seconds(bucket, inputs)) for _ in range(repeats)
    )
    pieces = {
        name: _median_ms(fn, args, repeats)
        for name, (fn, args) in piece_functions(runner)(bucket, inputs).items()
    }
    return {
        "batch": batch,
        "bucket": dataclasses.asdict(bucket),
        "context_len": int(np.max(inputs.context_lens)),
        **whole,
        "device_step_ms": device_ms,
        "pieces_ms": pieces,
        "other_ms": device_ms - sum(pieces.values()),
    }


HEADER = ["batch", "wall ms", "host ms", "device wait ms", "device step ms", *PIECES, "other"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    return [
        [
            str(r["batch"]),
            f"{r['wall_ms']:.2f}",
            f"{r['host_ms']:.2f}",
            f"{r['device_wait_ms']:.2f}",
            f"{r['device_step_ms']:.2f}",
            *(f"{r['pieces_ms'][p]:.2f}" for p in PIECES),
            f"{r['other_ms']:.2f}",
        ]
        for r in rows
    ]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---:|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M Q4_1 GGUF")
    p.add_argument("--quantization", default=None, choices=[None, "int8"])
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(HERE / "step_profile.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 8, 3
    sys.path.insert(0, str(HERE))
    import throughput

    from jaxinfer import LLM, EngineConfig

    if args.model is None:
        from jaxinfer.default_model import default_model_path

        args.model = str(default_model_path())
    batches = [int(b) for b in args.batches.split(",")]
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    llm = LLM(
        EngineConfig(
            model=args.model,
            quantization=args.quantization,
            async_scheduling=False,
            max_model_len=-(-(PROMPT_LEN + args.new_tokens) // 16) * 16 + 16,
            max_num_seqs=max(batches),
        )
    )
    try:
        rows = [profile(llm, b, args.new_tokens, args.repeats, args.seed) for b in batches]
    finally:
        llm.shutdown()
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(markdown_table(table_rows(rows)))
    print(f"load average before {load_before}, after {load_after}")
    result = {
        "machine": throughput.machine_info(),
        "model": args.model,
        "quantization": args.quantization,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "method": "timing: engine counters for host/device; pieces jitted apart on the same shapes",
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
