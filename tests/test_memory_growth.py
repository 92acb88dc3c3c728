"""Memory over time (issue 14, part 6): a few hundred small calls leave the Python heap as it was.

A request's records (its sequence, samples, output processor state, RequestOutput) must all be gone
once its call returns, whatever features it used. benchmarks/memory_growth.py measures the same
thing at more calls, resident memory included (not asserted here: glibc hands memory back in steps
of its own choosing, so RSS over 200 calls is noise at this size).
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

from jaxinfer import Engine, EngineConfig, SamplingParams

PROMPTS = ["hello there", "the cache block", "one token at a time", "a queue of requests"]
PARAMS = [
    SamplingParams(max_tokens=4),
    SamplingParams(max_tokens=4, temperature=0.0, logprobs=2, prompt_logprobs=1),
    SamplingParams(max_tokens=4, temperature=0.7, stop=["the"]),
    SamplingParams(max_tokens=4, temperature=1.0, n=2, seed=3),
    SamplingParams(max_tokens=4, bad_words=["the"], presence_penalty=0.5),
]
# Measured on CPU (jax 0.10.2): 39-45 B per call here, all of it 54-byte blocks that jaxlib
# allocates while `runner.write_slot` calls its jitted writer, a set that stops growing (~7 KB after
# 1,000 slot writes, ~17 KB after 8,000). The bound is ~5x that. One leaked request record (a
# Sequence with its token lists, a RequestOutput) is over 1 KiB, so keeping any per-call object
# fails by a wide margin; issue 14 reported ~30 KiB per call.
MAX_BYTES_PER_CALL = 200
CONFIG = Path(__file__).parents[1] / "configs/tiny-cpu-test.yaml"


def test_python_heap_is_flat_over_hundreds_of_calls(tiny_llama):
    config = EngineConfig.from_yaml(CONFIG, model=str(tiny_llama))
    engine = Engine(config)
    engine.warmup()

    def call(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 6 == 5:
            engine.chat([{"role": "user", "content": prompt}], PARAMS[0], use_tqdm=False)
        else:
            engine.generate([prompt], PARAMS[i % 6], use_tqdm=False)

    for i in range(48):  # fills what is cached by design: decoded token texts, jinja, tokenizer
        call(i)
    # Two snapshots taken while tracing: the device arrays that replace each other every step
    # (KV cache, slot state) are then counted on both sides and cancel out.
    tracemalloc.start(1)
    try:
        for i in range(48):
            call(i)
        gc.collect()
        before = tracemalloc.take_snapshot()
        calls = 204
        for i in range(calls):
            call(i)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    diff = after.compare_to(before, "lineno")
    growth = sum(stat.size_diff for stat in diff)
    top = "\n".join(str(stat) for stat in diff[:5])
    assert growth / calls < MAX_BYTES_PER_CALL, f"{growth / calls:.0f} B per call; top:\n{top}"
    engine.shutdown()
