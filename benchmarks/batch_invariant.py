"""What the batch-invariant mode costs: throughput.py's workload with `batch_invariant` off and on.

    python benchmarks/batch_invariant.py                    # llama50m, 256 requests, 2 rounds
    python benchmarks/batch_invariant.py --model smollm2 --num-requests 64
    python benchmarks/batch_invariant.py --quick            # checks the script

The same seeded greedy workload as benchmarks/throughput.py (prompts 16-512, outputs 16-256,
`ignore_eos`, max_num_seqs 64, 512-token steps), run through one `generate` per engine after
`warmup()`, the two modes interleaved (off, on, off, on, ...) so that drift on a shared machine hits
both alike. Reported per mode: output tok/s (median over rounds), per-step host and device-wait
time, compile seconds, and how many requests' greedy tokens equal the default mode's (the modes
round differently, so a near-tie may go the other way; the tokens are not expected to be equal,
only the invariant mode's run-to-run and batch-to-batch equality is promised, and tested in
tests/test_batch_invariant.py). Results: a table and `--out` JSON; numbers go to RESULTS.md by
hand with the machine named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # the workload and the runner, shared


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=throughput.MODELS, default="llama50m")
    p.add_argument("--num-requests", type=int)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache-dir", default="~/.cache/jaxinfer/benchmarks")
    p.add_argument("--out", default=str(here / "batch_invariant.json"))
    args = p.parse_args(argv)

    spec = throughput.QUICK if args.quick else throughput.FULL
    if args.num_requests:
        spec = replace(spec, num_requests=args.num_requests)
    files = throughput.resolve_model(args.model, Path(args.cache_dir).expanduser())
    runs: dict[str, list[dict]] = {"default": [], "batch_invariant": []}
    for round_index in range(args.rounds):
        for mode, results in runs.items():
            result = throughput.run_jaxinfer(
                files, spec, args.seed, ttft_repeats=1, batch_invariant=mode == "batch_invariant"
            )
            result.pop("workload"), result.pop("shape")
            results.append(result)
            print(
                f"round {round_index + 1} {mode:>15}: {result['output_tokens_per_s']:.1f} tok/s, "
                f"host {result['host_ms_per_step']:.1f} ms + device wait "
                f"{result['device_wait_ms_per_step']:.1f} ms per step, "
                f"compile {result['compile_s']:.0f} s",
                flush=True,
            )
    reference = runs["default"][0]["tokens"]
    summary = {}
    for mode, results in runs.items():
        summary[mode] = {
            "output_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in results),
            "rounds_tok_s": [r["output_tokens_per_s"] for r in results],
            "host_ms_per_step": statistics.median(r["host_ms_per_step"] for r in results),
            "device_wait_ms_per_step": statistics.median(
                r["device_wait_ms_per_step"] for r in results
            ),
            "compile_s": statistics.median(r["compile_s"] for r in results),
            "ttft_s": statistics.median(r["ttft_s"] for r in results),
            "requests_equal_to_default": sum(
                a == b for a, b in zip(results[0]["tokens"], reference, strict=True)
            ),
            "runs_identical": all(r["tokens"] == results[0]["tokens"] for r in results),
        }
    slowdown = (
        summary["default"]["output_tokens_per_s"]
        / summary["batch_invariant"]["output_tokens_per_s"]
    )
    header = (
        f"{'mode':>16} {'tok/s':>8} {'host ms':>8} {'wait ms':>8} {'compile s':>9} {'= default':>9}"
    )
    print("\n" + header)
    for mode, row in summary.items():
        print(
            f"{mode:>16} {row['output_tokens_per_s']:8.1f} {row['host_ms_per_step']:8.1f} "
            f"{row['device_wait_ms_per_step']:8.1f} {row['compile_s']:9.0f} "
            f"{row['requests_equal_to_default']:>4}/{spec.num_requests}"
        )
    print(f"batch-invariant run time: {100 * (slowdown - 1):+.0f}%")
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": throughput.machine_info(),
                "model": files.name,
                "workload": spec.__dict__,
                "summary": summary,
                "run_time_increase": slowdown - 1,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
