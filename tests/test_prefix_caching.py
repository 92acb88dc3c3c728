"""Prefix caching end to end on tiny checkpoints: the same tokens and logprobs with caching on and
off, K/V served from cache equal to a fresh prefill's, and the prompt tokens it saves."""

from __future__ import annotations

import numpy as np
import pytest

from jaxinfer import LLM, EngineConfig, SamplingParams
from tests.checkpoints import tiny_checkpoint

BLOCK = 8
CONFIG = dict(
    dtype="float32",
    max_model_len=128,
    block_size=BLOCK,
    num_kv_blocks=96,
    max_num_seqs=4,
    max_num_batched_tokens=64,
    seq_buckets=(4,),
    token_buckets=(64,),
)
PREFIX = [(7 * i + 3) % 500 + 2 for i in range(37)]  # a shared "system prompt": 4 full blocks
QUESTIONS = [[(11 * q + j) % 500 + 2 for j in range(3 + q % 7)] for q in range(8)]
# Logprobs of the same tokens computed along another path (cached K/V read back instead of this
# step's K/V, other softmax chunking) differ by float32 reassociation only. Measured over these
# tests' prompts (greedy, seeded, prompt logprobs): at most 2.6e-6 (llama), 1.4e-6 (gemma2);
# allowed: 1e-5, about 4x that, i.e. a change in how attention sums, never a change in what it
# sums (a stale or wrong block moves logprobs by 1e-2 and more).
LOGPROB_ATOL = 1e-5


def prompts(questions=QUESTIONS) -> list[dict]:
    return [{"prompt_token_ids": PREFIX + q} for q in questions]


@pytest.fixture(scope="module", params=["llama", "gemma2"])  # gemma2: sliding-window layers
def engines(request):
    path = tiny_checkpoint(request.param)
    on = LLM(EngineConfig(model=str(path), **CONFIG))
    off = LLM(EngineConfig(model=str(path), enable_prefix_caching=False, **CONFIG))
    yield on, off
    on.shutdown()
    off.shutdown()


def assert_same(with_cache, without_cache) -> None:
    for cached, fresh in zip(with_cache, without_cache, strict=True):
        assert cached.prompt_token_ids == fresh.prompt_token_ids
        for a, b in zip(cached.outputs, fresh.outputs, strict=True):
            assert a.token_ids == b.token_ids
            assert a.finish_reason == b.finish_reason
            if b.logprobs is not None:
                for step_a, step_b in zip(a.logprobs, b.logprobs, strict=True):
                    assert step_a.keys() == step_b.keys()
                    for token, entry in step_b.items():
                        assert step_a[token].logprob == pytest.approx(
                            entry.logprob, abs=LOGPROB_ATOL
                        )
        if fresh.prompt_logprobs is not None:
            assert len(cached.prompt_logprobs) == len(fresh.prompt_logprobs)
            for step_a, step_b in zip(cached.prompt_logprobs[1:], fresh.prompt_logprobs[1:]):
                for token, entry in step_b.items():
                    assert step_a[token].logprob == pytest.approx(entry.logprob, abs=LOGPROB_ATOL)


def run_both(engines, prompts, params):
    on, off = engines
    on.reset_prefix_cache()
    hits = on.llm_engine.stats.prefix_cache_hits
    with_cache = on.generate(prompts, params, use_tqdm=False)
    without_cache = off.generate(prompts, params, use_tqdm=False)
    assert_same(with_cache, without_cache)
    assert_nothing_held(on)
    return on.llm_engine.stats.prefix_cache_hits - hits


def assert_nothing_held(llm) -> None:
    core = llm.llm_engine
    core.block_manager.check_invariants([])
    assert core.block_manager.num_free_blocks == core.block_manager.num_usable_blocks


GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True)
SEEDED = SamplingParams(
    temperature=0.9, top_p=0.9, max_tokens=6, seed=3, logprobs=2, ignore_eos=True
)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_shared_system_prompt(engines, params):
    hits = run_both(engines, prompts(), params)
    # The first step's 64-token budget holds the first prompt and the start of the second, both
    # admitted before anything is cached; every later question reuses the 4 prefix blocks.
    assert hits == 6 * 4 * BLOCK


def test_few_shot_and_parallel_samples(engines):
    shots = [PREFIX[:20] + q + PREFIX[20:] for q in QUESTIONS[:3]]  # prefixes diverge early
    params = SamplingParams(n=3, temperature=1.0, max_tokens=5, seed=11, logprobs=1)
    run_both(engines, [{"prompt_token_ids": p} for p in shots] + prompts()[:2], params)


def test_prompt_logprobs_cover_every_position(engines):
    on, _ = engines
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    on.generate(prompts()[:1], GREEDY, use_tqdm=False)  # the prefix is cached now
    run_both(engines, prompts()[1:4], params)
    (out,) = on.generate(prompts()[4:5], params, use_tqdm=False)
    assert len(out.prompt_logprobs) == len(PREFIX) + len(QUESTIONS[4])
    assert out.prompt_logprobs[0] is None and all(out.prompt_logprobs[1:])


def test_a_second_generate_call_hits_what_the_first_cached(engines):
    on, _ = engines
    on.reset_prefix_cache()
    stats = on.llm_engine.stats
    on.generate(prompts()[:1], GREEDY, use_tqdm=False)
    before = stats.prompt_tokens
    on.generate(prompts()[1:2], GREEDY, use_tqdm=False)
    assert stats.prompt_tokens - before == len(PREFIX) + len(QUESTIONS[1]) - 4 * BLOCK


def squeezed(path, caching: bool) -> LLM:
    # 16 blocks of 8 = 128 tokens (one max_model_len) for 4 sequences of ~70: decode runs out
    # and preempts, with the shared prefix blocks as well as without them.
    config = dict(CONFIG, num_kv_blocks=17, max_num_batched_tokens=16, token_buckets=(16,))
    return LLM(EngineConfig(model=str(path), enable_prefix_caching=caching, **config))


def test_squeezed_cache_with_preemption_and_chunked_prefill():
    path = tiny_checkpoint("llama")
    params = SamplingParams(temperature=0.8, max_tokens=24, seed=5, logprobs=1, ignore_eos=True)
    on, off = squeezed(path, True), squeezed(path, False)
    try:
        with_cache = on.generate(prompts()[:4], params, use_tqdm=False)
        without_cache = off.generate(prompts()[:4], params, use_tqdm=False)
        assert on.llm_engine.scheduler.num_preemptions > 0
        assert off.llm_engine.scheduler.num_preemptions > 0
        assert_same(with_cache, without_cache)
        assert on.llm_engine.stats.prompt_tokens < off.llm_engine.stats.prompt_tokens
        assert_nothing_held(on)
    finally:
        on.shutdown()
        off.shutdown()


def _prefix_blocks_after_prefill(llm, request_id, tokens) -> np.ndarray:
    """Run one request's first step and read its prefix blocks' K/V from the device cache."""
    core = llm.llm_engine
    core.add_request(request_id, {"prompt_token_ids": tokens}, GREEDY)
    core.step()
    seq = core._requests[request_id].samples[0].seq
    blocks = np.asarray(seq.block_table[: len(PREFIX) // BLOCK])
    contents = np.stack(
        [np.asarray(layer)[:, blocks] for kv in core.runner.kv_cache for layer in kv]
    )
    core.abort_request(request_id)
    return blocks, contents


def test_a_hit_serves_the_kv_a_fresh_prefill_writes(engines):
    on, off = engines
    on.reset_prefix_cache()
    on.generate(prompts()[:1], GREEDY, use_tqdm=False)
    cached_blocks = set(on.llm_engine.block_manager._cached.values())
    blocks, served = _prefix_blocks_after_prefill(on, "hit", PREFIX + QUESTIONS[2])
    assert set(blocks) <= cached_blocks  # served from the cache, not recomputed
    _, fresh = _prefix_blocks_after_prefill(off, "fresh", PREFIX + QUESTIONS[2])
    np.testing.assert_allclose(served, fresh, rtol=0, atol=1e-6)
