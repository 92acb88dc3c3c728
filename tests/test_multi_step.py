"""Multi-step decode (num_scheduler_steps): several decode steps per compiled call change nothing
a caller sees, compile nothing after warm-up, and leak no block or slot."""

from __future__ import annotations

import pytest

from jaxinfer import LLM, EngineConfig, SamplingParams
from tests.test_engine_core import SMALL, _all_free, everything_seen, mixed_requests

STEPS = 4


@pytest.fixture(scope="module")
def single(tiny_llama) -> LLM:
    return LLM(EngineConfig(model=str(tiny_llama), **SMALL))


@pytest.fixture(scope="module")
def multi(tiny_llama) -> LLM:
    return LLM(EngineConfig(model=str(tiny_llama), num_scheduler_steps=STEPS, **SMALL))


def test_multi_step_gives_the_single_steps_results(single, multi):
    """Seeded sampling with penalties, stop strings and stop tokens (mid-call stops), n > 1,
    logprobs, min_tokens, different lengths and a waiting queue (more sequences than seats):
    the multi-step engine gives the tokens, texts, finish reasons and logprobs of one step per
    call, really runs several steps per call, compiles nothing after warm-up, frees everything."""
    prompts, params = mixed_requests(single)
    expected = everything_seen(single, prompts, params)
    core = multi.llm_engine
    multi.warmup()
    compiled, calls = multi.num_compilations, core.stats.num_multi_step_calls
    # Bitwise, logprobs too: the loop's body is the single step's functions (measured equal at
    # XLA's default and lowest optimization levels).
    assert everything_seen(multi, prompts, params) == expected
    assert core.stats.num_multi_step_calls - calls >= 3  # it really ran several steps per call
    assert multi.num_compilations == compiled
    assert _all_free(multi)
    # Alone, a long greedy request runs almost all of its decode in calls of STEPS steps.
    calls = core.stats.num_multi_step_calls
    long = SamplingParams(temperature=0, max_tokens=41, ignore_eos=True)
    assert everything_seen(multi, ["Hello"], long) == everything_seen(single, ["Hello"], long)
    assert core.stats.num_multi_step_calls - calls == 40 // STEPS
    assert _all_free(multi)


def test_multi_step_off_where_the_host_needs_each_token(single, multi):
    """A multi-token bad word (banned only after its prefix) needs each step's token on the host:
    such a batch runs one step per call, with the single-step result."""
    tokenizer = multi.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    base = multi.generate("a b c", greedy, use_tqdm=False)[0].outputs[0].token_ids
    bad = tokenizer.decode(base[4:6])
    assert len(tokenizer.encode(bad, add_special_tokens=False)) == 2
    core = multi.llm_engine
    calls = core.stats.num_multi_step_calls
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=[bad])
    (out,) = multi.generate("a b c", params, use_tqdm=False)
    assert core.stats.num_multi_step_calls == calls
    tokens = out.outputs[0].token_ids
    assert tokens[:5] == base[:5] and tokens[5] != base[5]  # the ban took effect mid-decode
    assert tokens == single.generate("a b c", params, use_tqdm=False)[0].outputs[0].token_ids
    assert _all_free(multi)


def test_num_scheduler_steps_is_checked():
    for bad in (0, -1, 65, 2.0, True):
        with pytest.raises(ValueError, match="num_scheduler_steps"):
            EngineConfig(model="m", num_scheduler_steps=bad)


def test_the_pallas_attention_kernel_runs_in_the_loop(tiny_llama):
    """The GPU path's attention (our Pallas kernel, interpreted on CPU) inside the multi-step
    loop, each layer writing its K/V before the kernel reads the cache: the tokens and logprobs
    of one step per call."""
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=9, ignore_eos=True, logprobs=1)
    prompts = ["Hello there", "1 2 3"]
    seen = {}
    for steps in (1, STEPS):
        config = EngineConfig(
            model=str(tiny_llama),
            attention_backend="pallas_interpret",
            num_scheduler_steps=steps,
            **SMALL,
        )
        with LLM(config) as engine:
            seen[steps] = everything_seen(engine, prompts, params)
            calls = engine.llm_engine.stats.num_multi_step_calls
    assert calls >= 2
    assert seen[STEPS] == seen[1]
