"""Memory over time: what each small generate() call leaves behind, resident and on the Python heap.

    python benchmarks/memory_growth.py                    # tiny random Llama, 560 calls per workload
    python benchmarks/memory_growth.py --model PATH --calls 2000 --no-keep-freed-memory

One engine (configs/tiny-cpu-test.yaml shapes, every bucket compiled by `warmup()`), then per
workload:
- warm-up: `--warmup` calls first, so lazily filled caches (a token's decoded text for logprobs,
  tokenizer and jinja caches, allocator pools) are full before anything is counted;
- resident: `--calls` calls, RSS (/proc/self/statm) read every eighth of them; "KiB/call" is the
  growth over all of them, "2nd half" over the last half only (a leak keeps growing there, an
  allocator settling does not);
- Python heap: under tracemalloc (1 frame), `--heap-calls` calls between two snapshots (each after
  gc.collect(), the first after half as many calls again), per call, and the line that grew most;
- also the objects the cyclic GC tracks and JAX live arrays over the resident calls, and compiled
  executables over all of them (all three should not move).

Workloads: `plain` is issue 14's call, `generate(["hello there"], SamplingParams(max_tokens=4))`;
`tqdm` the same with the progress bar on (written to /dev/null); `mixed` cycles through logprobs and
prompt logprobs, stop strings, n=2 seeded sampling, bad words with penalties, and chat().
Results go to benchmarks/memory_growth.json; the table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.checkpoints builds the default model


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def workloads(engine) -> dict:
    """name -> a function making call number i."""
    from jaxinfer import SamplingParams

    plain = SamplingParams(max_tokens=4)
    prompts = ["hello there", "the cache block", "one token at a time", "a queue of requests"]
    mixed = [
        SamplingParams(max_tokens=4, temperature=0.0, logprobs=2, prompt_logprobs=1),
        SamplingParams(max_tokens=4, temperature=0.7, stop=["the"]),
        SamplingParams(max_tokens=4, temperature=1.0, n=2, seed=3),
        SamplingParams(max_tokens=4, bad_words=["the"], presence_penalty=0.5),
    ]

    def plain_call(i: int) -> None:
        engine.generate(["hello there"], plain, use_tqdm=False)

    def tqdm_call(i: int) -> None:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            engine.generate(["hello there"], plain)

    def mixed_call(i: int) -> None:
        prompt = prompts[i % len(prompts)]
        if i % 5 == 4:
            engine.chat([{"role": "user", "content": prompt}], plain, use_tqdm=False)
        else:
            engine.generate([prompt], mixed[i % 5], use_tqdm=False)

    return {"plain": plain_call, "tqdm": tqdm_call, "mixed": mixed_call}


def measure(engine, call, *, warmup: int, calls: int, heap_calls: int) -> dict:
    import jax

    for i in range(warmup):
        call(i)
    gc.collect()
    objects, arrays = len(gc.get_objects()), len(jax.live_arrays())
    compilations = engine.num_compilations
    marks = [rss_bytes()]
    started = time.perf_counter()
    for i in range(calls):
        call(i)
        if (i + 1) % max(calls // 8, 1) == 0:
            marks.append(rss_bytes())
    seconds = time.perf_counter() - started
    gc.collect()
    objects, arrays = len(gc.get_objects()) - objects, len(jax.live_arrays()) - arrays
    half = len(marks) // 2
    # Traced bytes between two snapshots taken after tracing started: the device arrays that
    # replace each other every step (cache, slot state) are then counted on both sides.
    tracemalloc.start(1)
    for i in range(heap_calls // 2):
        call(i)
    gc.collect()
    before = tracemalloc.take_snapshot()
    for i in range(heap_calls):
        call(i)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    diff = after.compare_to(before, "lineno")
    heap = sum(stat.size_diff for stat in diff)
    top = max(diff, key=lambda stat: stat.size_diff)
    where = Path(top.traceback[0].filename)
    where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else Path(*where.parts[-3:])
    return {
        "calls": calls,
        "ms_per_call": round(1e3 * seconds / calls, 2),
        "rss_start_mib": round(marks[0] / 2**20, 1),
        "rss_kib_per_call": round((marks[-1] - marks[0]) / calls / 1024, 3),
        "rss_kib_per_call_2nd_half": round(
            (marks[-1] - marks[half]) / (calls * (len(marks) - 1 - half) / (len(marks) - 1)) / 1024,
            3,
        ),
        "rss_marks_kib": [round((m - marks[0]) / 1024) for m in marks],
        "heap_calls": heap_calls,
        "heap_bytes_per_call": round(heap / heap_calls, 1),
        "heap_top_line": f"{where}:{top.traceback[0].lineno} {top.size_diff} B",
        "gc_objects_delta": objects,
        "live_arrays_delta": arrays,
        "compilations_delta": engine.num_compilations - compilations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: the tiny random Llama)")
    parser.add_argument("--config", default=str(ROOT / "configs/tiny-cpu-test.yaml"))
    parser.add_argument("--workloads", nargs="+", default=["plain", "tqdm", "mixed"])
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--calls", type=int, default=560)
    parser.add_argument("--heap-calls", type=int, default=200)
    parser.add_argument("--no-keep-freed-memory", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).with_name("memory_growth.json")))
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    from jaxinfer import Engine, EngineConfig

    model = args.model
    if model is None:
        from tests.checkpoints import tiny_checkpoint

        model = str(tiny_checkpoint("llama"))
    config = EngineConfig.from_yaml(args.config, model=model)
    if args.no_keep_freed_memory:
        config = config.replace(cpu_keep_freed_memory=False)
    engine = Engine(config)
    engine.warmup()
    calls = workloads(engine)
    results = []
    print("| workload | ms/call | RSS KiB/call | 2nd half | heap B/call | GC objects | arrays |")
    print("|---|---|---|---|---|---|---|")
    for name in args.workloads:
        row = measure(
            engine,
            calls[name],
            warmup=args.warmup,
            calls=args.calls,
            heap_calls=args.heap_calls,
        )
        results.append({"workload": name, **row})
        print(
            f"| {name} | {row['ms_per_call']} | {row['rss_kib_per_call']} "
            f"| {row['rss_kib_per_call_2nd_half']} | {row['heap_bytes_per_call']} "
            f"| {row['gc_objects_delta']:+d} | {row['live_arrays_delta']:+d} |",
            flush=True,
        )
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model if args.model else "tests.checkpoints tiny llama",
        "config": Path(args.config).name,
        "keep_freed_memory": not args.no_keep_freed_memory,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    Path(args.out).write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
