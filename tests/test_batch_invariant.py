"""Batch-invariant mode (`EngineConfig(batch_invariant=True)`, issue 18 part 4): a request's tokens
and logprobs are bitwise the same whatever else is in the batch, its row, the bucket, the
chunked-prefill cuts, preemption and max_num_seqs. Compared with `==`, never a tolerance.

Twenty seeded requests (sampling with top-k/top-p, logprobs, a few with prompt logprobs) run
  * alone, one per generate() call (decode buckets of one row, prefills alone);
  * together with filler requests in a shuffled order (other rows, bigger buckets, unified steps
    mixing their prefills and decodes, prefix-cache hits on the K/V the alone runs left);
  * on a second engine with max_num_seqs 4, a 16-token budget (every prompt over 16 tokens is
    prefilled in chunks) and a cache so small that sequences are preempted and recomputed.
The default mode fails the same comparison (checked, so the test is known to be able to fail),
while agreeing within float32 noise.
"""

from __future__ import annotations

import random

import pytest

from jaxinfer import LLM, EngineConfig, SamplingParams
from tests.checkpoints import tiny_checkpoint

BASE = {"dtype": "float32", "max_model_len": 96, "block_size": 8}
ROOMY = dict(BASE, num_kv_blocks=160, max_num_seqs=8, max_num_batched_tokens=64)
SQUEEZED = dict(BASE, num_kv_blocks=14, max_num_seqs=4, max_num_batched_tokens=16)


def _requests() -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(18)
    requests = []
    for i in range(20):
        prompt = [rng.randrange(2, 500) for _ in range(rng.randrange(3, 41))]
        params = SamplingParams(
            temperature=0.9,
            top_p=0.9 if i % 2 else 1.0,
            top_k=20 if i % 3 == 0 else -1,
            seed=1000 + i,
            max_tokens=rng.randrange(6, 14),
            logprobs=3,
            prompt_logprobs=2 if i % 5 == 0 else None,
        )
        requests.append((prompt, params))
    return requests


def _fillers(count: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(99)
    return [
        (
            [rng.randrange(2, 500) for _ in range(rng.randrange(2, 60))],
            SamplingParams(temperature=1.0, max_tokens=rng.randrange(1, 20)),
        )
        for _ in range(count)
    ]


def _run(llm: LLM, requests) -> list:
    prompts = [{"prompt_token_ids": prompt} for prompt, _ in requests]
    return llm.generate(prompts, [params for _, params in requests], use_tqdm=False)


def _signature(output) -> tuple:
    """Everything a request returns that the mode promises to keep, as exact Python values."""
    (completion,) = output.outputs

    def entries(step: dict) -> tuple:
        return tuple(sorted((t, e.logprob, e.rank) for t, e in step.items()))

    prompt = tuple(entries(s) for s in output.prompt_logprobs[1:]) if output.prompt_logprobs else ()
    return (
        tuple(completion.token_ids),
        tuple(entries(step) for step in completion.logprobs),
        completion.cumulative_logprob,
        prompt,
    )


def _alone_and_together(llm: LLM, count: int = 20) -> tuple[list, list]:
    requests = _requests()[:count]
    alone = [_signature(_run(llm, [request])[0]) for request in requests]
    mixed = [(i, r) for i, r in enumerate(requests)] + [(None, r) for r in _fillers(12)]
    random.Random(5).shuffle(mixed)
    outputs = _run(llm, [request for _, request in mixed])
    together = [None] * len(requests)
    for (index, _), output in zip(mixed, outputs, strict=True):
        if index is not None:
            together[index] = _signature(output)
    return alone, together


@pytest.fixture(scope="module")
def invariant_runs():
    llm = LLM(EngineConfig(model=str(tiny_checkpoint("llama")), batch_invariant=True, **ROOMY))
    try:
        yield _alone_and_together(llm)
    finally:
        llm.shutdown()


def test_alone_equals_in_a_shuffled_batch(invariant_runs):
    alone, together = invariant_runs
    for index, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a == b, f"request {index} differs between alone and in a batch"


def test_squeezed_chunked_and_preempted_equals_alone(invariant_runs):
    alone, _ = invariant_runs
    llm = LLM(EngineConfig(model=str(tiny_checkpoint("llama")), batch_invariant=True, **SQUEEZED))
    try:
        outputs = _run(llm, _requests() + _fillers(6))
        preemptions = llm.llm_engine.scheduler.num_preemptions
        assert preemptions > 0, "the squeezed cache should force preemption"
    finally:
        llm.shutdown()
    assert any(len(prompt) > 16 for prompt, _ in _requests())  # so some prompts were chunked
    for index, (a, output) in enumerate(zip(alone, outputs, strict=False)):
        assert _signature(output) == a, f"request {index} differs when squeezed and chunked"


def test_the_default_mode_is_not_invariant_so_the_checks_can_fail():
    llm = LLM(EngineConfig(model=str(tiny_checkpoint("llama")), **ROOMY))
    try:
        alone, together = _alone_and_together(llm, count=8)  # plenty to see the drift
    finally:
        llm.shutdown()
    assert alone != together
    for a, b in zip(alone, together, strict=True):  # ...float32 noise, not a different answer
        if a[0] == b[0]:
            for step_a, step_b in zip(a[1], b[1], strict=True):
                for (ta, la, _), (tb, lb, _) in zip(step_a, step_b, strict=True):
                    assert ta == tb and la == pytest.approx(lb, abs=1e-5)


def test_the_pallas_kernel_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="attention_backend.*batch_invariant"):
        EngineConfig(model="unused", batch_invariant=True, attention_backend="pallas_interpret")
