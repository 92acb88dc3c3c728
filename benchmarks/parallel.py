"""Tensor-, pipeline- and data-parallel throughput and memory per device, on fake CPU devices or
real accelerators.

    python benchmarks/parallel.py          # llama50m: TP 1/2/4, PP 2/4, TP 2 x PP 2, DP 2
    python benchmarks/parallel.py --quick --layouts 1x1x1 2x1x1 1x2x1     # TPxPPxDP

Pipeline layouts run twice: with one micro-batch of sequences per stage in flight (the default:
stage s works on micro-batch m + 1 while stage s + 1 works on m), and with the same sequences as
one batch (stages take turns). For both, a pass of the workload is recorded and each step's stage
work is then timed alone: stage busy = summed stage times / (P x the pass's wall time), the bubble
is the rest. The ideal for M micro-batches of equal stages is min(1, M / P).

On CPU the "devices" are slices of the same two cores (`--xla_force_host_platform_device_count`),
so tokens/s shows the *overhead* of sharding (collectives, smaller matmuls), not a speed-up: the
point is shape and overhead, and that the memory per device falls as 1/T. On a multi-GPU host the
same script measures real scaling (the XLA_FLAGS line only applies on CPU).

Same workload as benchmarks/throughput.py (seeded, greedy, ignore_eos), one process per run, so
every configuration gets a fresh JAX with the device count it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def timed_generate(engine, prompts, params) -> tuple[list, float]:
    started = time.perf_counter()
    outputs = engine.generate(prompts, params, use_tqdm=False)
    return outputs, time.perf_counter() - started


def stage_utilization(engine, prompts, params, pp: int) -> dict:
    """One more timed pass of the workload, recording every step; then each recorded step's
    stage work is run alone and waited for (`ModelRunner.stage_seconds`). Stage busy = the summed
    stage times / (P x the pass's wall time); the bubble is the rest (host time included)."""
    runner = engine.llm_engine.runner
    steps = []
    dispatch = runner.dispatch

    def recording(bucket, inputs, previous=None):
        steps.append((bucket, replace(inputs, sampled=np.zeros_like(inputs.sampled))))
        return dispatch(bucket, inputs, previous)

    runner.dispatch = recording
    try:
        outputs, wall = timed_generate(engine, prompts, params)
    finally:
        del runner.dispatch
    work = sum(sum(runner.stage_seconds(bucket, inputs)) for bucket, inputs in steps)
    micro = engine.config.resolved_micro_batches
    return {
        "micro_batches": micro,
        "steps": len(steps),
        "output_tok_s": sum(len(o.outputs[0].token_ids) for o in outputs) / wall,
        "stage_busy": work / (pp * wall),
        "ideal_busy": min(1.0, micro / pp),
    }


def measure(engine, spec, throughput) -> dict:
    """Warm up (compile every bucket, then one untimed pass); -> the timed pass's numbers."""
    from jaxinfer import SamplingParams

    started = time.perf_counter()
    programs = engine.warmup()
    compile_s = time.perf_counter() - started
    workload = throughput.make_workload(spec, 0, engine.vocab_size)
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens
    ]
    timed_generate(engine, workload.prompts, params)  # first runs of each program: untimed
    outputs, seconds = timed_generate(engine, workload.prompts, params)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "workload": (workload.prompts, params),
        "programs": programs,
        "compile_s": compile_s,
        "output_tok_s": generated / seconds,
        "seconds": seconds,
        "first_tokens": [o.outputs[0].token_ids[:8] for o in outputs[:4]],
    }


def one_run(tp: int, pp: int, dp: int, quick: bool, cache_dir: str) -> dict:
    """Runs inside a child process whose XLA_FLAGS already give it enough devices."""
    import jax

    sys.path.insert(0, str(HERE))
    import throughput

    from jaxinfer import Engine, EngineConfig

    spec = throughput.QUICK if quick else throughput.FULL
    files = throughput.resolve_model("llama50m", Path(cache_dir))
    config = EngineConfig(
        model=files.path,
        dtype="float32",
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        data_parallel_size=dp,
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
    )
    with Engine(config) as engine:
        run = measure(engine, spec, throughput)
        prompts, params = run.pop("workload")
        pipeline = {}
        if pp > 1:
            pipeline["overlapped"] = stage_utilization(engine, prompts, params, pp)
        replicas = getattr(engine.llm_engine, "replicas", None) or [engine.llm_engine]

        def bytes_on(device) -> int:
            arrays = jax.tree_util.tree_leaves(
                [(r.model.params, r.runner.kv_cache) for r in replicas]
            )
            return sum(
                shard.data.nbytes
                for array in arrays
                for shard in array.addressable_shards
                if shard.device == device
            )

        devices = jax.devices()[: tp * pp * dp]
        per_device = [bytes_on(d) for d in devices]
    if pp > 1:  # the same sequences in flight as one batch: stages take turns
        turns = config.replace(pipeline_micro_batches=1, max_num_seqs=spec.max_num_seqs * pp)
        with Engine(turns) as engine:
            measure(engine, spec, throughput)
            pipeline["turns"] = stage_utilization(engine, prompts, params, pp)
    return {
        "tp": tp,
        "pp": pp,
        "dp": dp,
        **pipeline,
        **run,
        "device": devices[0].device_kind,
        "bytes_per_device_max": max(per_device),
        "bytes_total": sum(per_device),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["1x1x1", "2x1x1", "4x1x1", "1x2x1", "1x4x1", "2x2x1", "1x1x2"],
        help="TPxPPxDP, e.g. 2x2x1",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "jaxinfer" / "bench"))
    parser.add_argument("--out", default=str(HERE / "parallel.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        tp, pp, dp = map(int, args.child.split("x"))
        print(json.dumps(one_run(tp, pp, dp, args.quick, args.cache_dir)))
        return []

    rows = []
    sizes = [int(t) * int(p) * int(d) for t, p, d in (lay.split("x") for lay in args.layouts)]
    for layout in args.layouts:
        env = dict(os.environ)
        env.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={max(sizes)}")
        command = [sys.executable, __file__, "--child", layout, "--cache-dir", args.cache_dir]
        done = subprocess.run(
            command + (["--quick"] if args.quick else []),
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    same = all(row["first_tokens"] == rows[0]["first_tokens"] for row in rows)
    print(f"{rows[0]['device']}: llama50m f32, {'quick' if args.quick else 'full'} workload")
    print(
        "TP | PP | DP | output tok/s | compile s | programs | max MiB/device | total MiB | "
        "stage busy (ideal) | one batch: tok/s | one batch: stage busy (ideal)"
    )
    print("---|---|---|---|---|---|---|---|---|---|---")
    for row in rows:
        pipeline = "- | - | -"
        if row["pp"] > 1:
            cut, turns = row["overlapped"], row["turns"]
            pipeline = (
                f"{cut['stage_busy']:.0%} ({cut['ideal_busy']:.0%}) | "
                f"{turns['output_tok_s']:.1f} | "
                f"{turns['stage_busy']:.0%} ({turns['ideal_busy']:.0%})"
            )
        print(
            f"{row['tp']} | {row['pp']} | {row['dp']} | {row['output_tok_s']:.1f} | "
            f"{row['compile_s']:.0f} | {row['programs']} | "
            f"{row['bytes_per_device_max'] / 2**20:.1f} | {row['bytes_total'] / 2**20:.1f} | "
            f"{pipeline}"
        )
    print(f"greedy tokens identical across layouts: {same}")
    Path(args.out).write_text(json.dumps({"rows": rows, "tokens_identical": same}, indent=1))
    return rows


if __name__ == "__main__":
    main()
