"""Tensor-, pipeline- and data-parallel throughput and memory per device, on fake CPU devices or
real accelerators.

    python benchmarks/parallel.py          # llama50m: TP 1/2/4, PP 2/4, TP 2 x PP 2, DP 2
    python benchmarks/parallel.py --quick --layouts 1x1x1 2x1x1 1x2x1     # TPxPPxDP

Pipeline layouts run the workload twice on the same warmed-up engine: with prefill steps cut into
one micro-batch per stage (the default: stage s works on micro-batch m + 1 while stage s + 1 works
on m) and uncut (stages take turns). For both, the prefill steps are replayed to measure how busy
the stages are: the time each stage's work takes alone, summed, over P x the step's wall time.
The rest is the bubble; the ideal with M micro-batches of equal stages is busy M / (M + P - 1).

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


def prefill_bubble(engine, prompts, params, pp: int) -> dict:
    """Replays the prefill steps of one `generate` on the warmed-up engine: the wall time of each
    step (stages overlapping where the step was cut into micro-batches) against the time its
    stages take run alone. Stage busy = sum of stage times / (P x wall); the bubble is the rest."""
    runner = engine.runner
    steps = []
    execute_many = runner.execute_many

    def recording(batches):
        if batches[0][0].is_prefill:
            steps.append([(b, replace(i, sampled=np.zeros_like(i.sampled))) for b, i in batches])
        return execute_many(batches)

    runner.execute_many = recording
    try:
        engine.generate(prompts, params, use_tqdm=False)
    finally:
        del runner.execute_many
    wall = work = 0.0
    for batches in steps:
        started = time.perf_counter()
        runner.execute_many(batches)
        wall += time.perf_counter() - started
        work += sum(sum(runner.stage_seconds(b, i)) for b, i in batches)
    micro = max(len(batches) for batches in steps)
    return {
        "prefill_steps": len(steps),
        "micro_batches": micro,
        "stage_busy": work / (pp * wall),
        "ideal_busy": micro / (micro + pp - 1),
    }


def one_run(tp: int, pp: int, dp: int, quick: bool, cache_dir: str) -> dict:
    """Runs inside a child process whose XLA_FLAGS already give it enough devices."""
    import jax

    sys.path.insert(0, str(HERE))
    import throughput

    from jaxinfer import Engine, EngineConfig, SamplingParams

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
        started = time.perf_counter()
        programs = engine.warmup()
        compile_s = time.perf_counter() - started
        workload = throughput.make_workload(spec, 0, engine.vocab_size)
        params = [
            SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            for n in workload.output_lens
        ]
        timed_generate(engine, workload.prompts, params)  # first runs of each program: untimed
        outputs, seconds = timed_generate(engine, workload.prompts, params)
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        pipeline = {}
        if pp > 1:
            overlapped = prefill_bubble(engine, workload.prompts, params, pp)
            # The same engine, its prefill steps no longer cut (every bucket is compiled already).
            engine.config = engine.config.replace(pipeline_micro_batches=1)
            _, turns_seconds = timed_generate(engine, workload.prompts, params)
            turns = prefill_bubble(engine, workload.prompts, params, pp)
            pipeline = {
                "turns_output_tok_s": generated / turns_seconds,
                "prefill_overlapped": overlapped,
                "prefill_turns": turns,
            }

        replicas = getattr(engine, "replicas", [engine])

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
        first_tokens = [o.outputs[0].token_ids[:8] for o in outputs[:4]]
    return {
        "tp": tp,
        "pp": pp,
        "dp": dp,
        **pipeline,
        "device": devices[0].device_kind,
        "output_tok_s": generated / seconds,
        "seconds": seconds,
        "compile_s": compile_s,
        "programs": programs,
        "bytes_per_device_max": max(per_device),
        "bytes_total": sum(per_device),
        "first_tokens": first_tokens,
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
        "tok/s, prefill not cut | prefill stage busy: cut (ideal) | not cut (ideal)"
    )
    print("---|---|---|---|---|---|---|---|---|---|---")
    for row in rows:
        pipeline = "- | - | -"
        if row["pp"] > 1:
            cut, turns = row["prefill_overlapped"], row["prefill_turns"]
            pipeline = (
                f"{row['turns_output_tok_s']:.1f} | "
                f"{cut['stage_busy']:.0%} ({cut['ideal_busy']:.0%}) | "
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
