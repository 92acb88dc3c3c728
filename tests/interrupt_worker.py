"""Worker for tests/test_interrupt.py: Ctrl-C lands in generate() at random moments, again and again.

    python -m tests.interrupt_worker CHECKPOINT [--inside 30] [--max-rounds 100] [--seed 0]

Builds one small engine, takes an uninterrupted reference, then for each round starts generate()
and has a timer thread send SIGINT to the main thread (a real signal, as a terminal's Ctrl-C) after
a random delay drawn over the length of one call (the median of the latest uninterrupted calls).
Whether the interrupt landed inside generate() or after it returned, the next generate() must
return the reference tokens and the engine's blocks, sampling slots and queues must be back where
they started. Rounds go on until `--inside` interrupts landed inside a call (or `--max-rounds`).
Prints one JSON line per round and a last summary line; exits 1 at the first round that breaks the
engine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def engine_resources(engine) -> dict:
    """What an interrupted call must give back: free KV blocks, free sampling slots, queued work.

    The one place that reads engine internals."""
    core = engine.llm_engine
    unfinished = core.has_unfinished_requests()
    return {
        "free_blocks": core.block_manager.num_free_blocks,
        "free_slots": sorted(core._free_slots),
        "unfinished": unfinished,
    }


PROMPTS = ["the cache block", "one token at a time", "a queue of requests", "every model"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--inside", type=int, default=30, help="interrupts inside generate()")
    parser.add_argument("--max-rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    from jaxinfer import Engine, EngineConfig, SamplingParams

    config = EngineConfig(
        model=args.checkpoint,
        dtype="float32",
        max_model_len=128,
        block_size=16,
        num_kv_blocks=32,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        seq_buckets=(4,),
        token_buckets=(64,),
    )
    engine = Engine(config)
    engine.warmup()
    # n=2 makes the second sample a fork sharing the prompt's blocks (copy-on-write, a donated
    # block copy); the others are plain greedy rows.
    params = [
        SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=args.max_tokens, temperature=0.8, seed=7, n=2, ignore_eos=True),
    ]
    params = [params[i % 2] for i in range(len(PROMPTS))]

    def run() -> list[list[list[int]]]:
        outputs = engine.generate(PROMPTS, params, use_tqdm=False)
        return [[list(c.token_ids) for c in out.outputs] for out in outputs]

    reference = run()
    initial = engine_resources(engine)
    durations = []  # of uninterrupted calls: where to aim the next interrupt
    for _ in range(3):
        started = time.perf_counter()
        assert run() == reference, "generate() is not deterministic"
        durations.append(time.perf_counter() - started)

    rng = random.Random(args.seed)
    main_thread = threading.main_thread().ident
    landed = {"inside": 0, "after": 0}
    index = 0
    while landed["inside"] < args.inside and index < args.max_rounds:
        call_seconds = statistics.median(durations[-5:])
        delay = rng.uniform(0.0, call_seconds)
        timer = threading.Timer(delay, signal.pthread_kill, (main_thread, signal.SIGINT))
        where = "inside"
        try:
            timer.start()
            run()
            where = "after"
            while True:  # the interrupt is on its way: wait for it where it cannot hurt
                time.sleep(0.001)
        except KeyboardInterrupt:
            pass
        timer.join()
        landed[where] += 1
        record = {"round": index, "delay_ms": round(delay * 1e3, 2), "landed": where}
        try:
            started = time.perf_counter()
            tokens = run()
            durations.append(time.perf_counter() - started)
            problems = []
            if tokens != reference:
                problems.append("tokens differ from the reference")
            if (now := engine_resources(engine)) != initial:
                problems.append(f"resources {now} != initial {initial}")
        except Exception as error:  # noqa: BLE001 (the engine is broken: say how)
            problems = [f"{type(error).__name__}: {error}"]
        record["problems"] = problems
        print(json.dumps(record), flush=True)
        if problems:
            print(json.dumps({"ok": False, "round": index, "landed": landed}), flush=True)
            return 1
        index += 1
    summary = {"ok": True, "rounds": index, "landed": landed, "call_ms": call_seconds * 1e3}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
