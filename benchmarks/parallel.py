"""Tensor-parallel throughput and memory per device, on fake CPU devices or real accelerators.

    python benchmarks/parallel.py                   # llama50m: TP 1/2/4 and DP 2 on 4 fake devices
    python benchmarks/parallel.py --quick --layouts 1x1 2x1 1x2     # TPxDP

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
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one_run(tp: int, dp: int, quick: bool, cache_dir: str) -> dict:
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
        started = time.perf_counter()
        outputs = engine.generate(workload.prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)

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

        devices = jax.devices()[: tp * dp]
        per_device = [bytes_on(d) for d in devices]
        first_tokens = [o.outputs[0].token_ids[:8] for o in outputs[:4]]
    return {
        "tp": tp,
        "dp": dp,
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
        "--layouts", nargs="+", default=["1x1", "2x1", "4x1", "1x2"], help="TPxDP, e.g. 2x1"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "jaxinfer" / "bench"))
    parser.add_argument("--out", default=str(HERE / "parallel.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        tp, dp = map(int, args.child.split("x"))
        print(json.dumps(one_run(tp, dp, args.quick, args.cache_dir)))
        return []

    rows = []
    sizes = [int(t) * int(d) for t, d in (layout.split("x") for layout in args.layouts)]
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
    print("TP | DP | output tok/s | compile s | programs | max MiB/device | total MiB")
    print("---|---|---|---|---|---|---")
    for row in rows:
        print(
            f"{row['tp']} | {row['dp']} | {row['output_tok_s']:.1f} | {row['compile_s']:.0f} | "
            f"{row['programs']} | {row['bytes_per_device_max'] / 2**20:.1f} | "
            f"{row['bytes_total'] / 2**20:.1f}"
        )
    print(f"greedy tokens identical across layouts: {same}")
    Path(args.out).write_text(json.dumps({"rows": rows, "tokens_identical": same}, indent=1))
    return rows


if __name__ == "__main__":
    main()
