"""EngineCore driven by hand (vLLM's LLMEngine loop), output kinds, streaming, and AsyncEngine."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxinfer import LLM, EngineConfig, SamplingParams
from jaxinfer.engine.async_engine import AsyncEngine
from jaxinfer.sampling_params import RequestOutputKind

# Few shapes (one decode, one prefill program): the tests here are about the host loop.
SMALL = dict(
    dtype="float32",
    max_model_len=128,
    num_kv_blocks=64,
    max_num_seqs=4,
    max_num_batched_tokens=64,
    seq_buckets=(4,),
    token_buckets=(64,),
)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=10, seed=7, ignore_eos=True)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(EngineConfig(model=str(tiny_llama), **SMALL))


def _all_free(llm: LLM) -> bool:
    core = llm.llm_engine
    return (
        core.block_manager.num_free_blocks == core.block_manager.num_usable_blocks
        and not core.has_unfinished_requests()
        and len(core._free_slots) == core.config.max_num_seqs
    )


def _run(core) -> dict[str, list]:
    """Step until idle; -> every output of each request, in the order they came."""
    seen: dict[str, list] = {}
    while core.has_unfinished_requests():
        for output in core.step():
            seen.setdefault(output.request_id, []).append(output)
    return seen


def test_add_request_step_loop_matches_generate(llm):
    prompts = ["Hello there", "The capital of France is", "1 2 3"]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, SEEDED, use_tqdm=False)]
    core = llm.llm_engine
    for i, prompt in enumerate(prompts):
        core.add_request(f"r{i}", prompt, SEEDED)
    assert core.get_num_unfinished_requests() == 3
    seen = _run(core)
    # CUMULATIVE (the default): one output per step, each the whole output so far.
    for i, prompt in enumerate(prompts):
        outs = seen[f"r{i}"]
        assert len(outs) == 10 and [o.finished for o in outs] == [False] * 9 + [True]
        assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 11))
        assert outs[-1].outputs[0].token_ids == expected[i]
        assert outs[-1].prompt == prompt
    assert _all_free(llm)


def test_output_kinds_delta_concatenates_and_final_only_once(llm):
    core = llm.llm_engine
    prompt = "Once upon a time"
    final = llm.generate(prompt, SEEDED, use_tqdm=False)[0].outputs[0]
    for kind in RequestOutputKind:
        core.add_request(
            kind.name, prompt, SamplingParams(**{**_fields(SEEDED), "output_kind": kind})
        )
    seen = _run(core)
    cumulative, delta, final_only = (seen[k.name] for k in RequestOutputKind)
    assert cumulative[-1].outputs[0].text == final.text
    assert len(final_only) == 1 and final_only[0].finished
    assert final_only[0].outputs[0].token_ids == final.token_ids
    assert "".join(o.outputs[0].text for o in delta) == final.text
    assert sum((o.outputs[0].token_ids for o in delta), []) == final.token_ids
    assert delta[-1].outputs[0].finish_reason == "length" and delta[-1].finished


def _fields(params: SamplingParams) -> dict:
    return {k: getattr(params, k) for k in params.__dataclass_fields__}


def test_abort_frees_blocks_and_the_rest_finish(llm):
    core = llm.llm_engine
    core.add_request("keep", "Hello there", GREEDY)
    core.add_request("drop", "The capital of France is", SamplingParams(max_tokens=50))
    for _ in range(3):
        core.step()
    core.abort_request("drop")
    assert core.get_num_unfinished_requests() == 1
    seen = _run(core)
    assert "drop" not in seen or not seen["drop"][-1].finished
    assert seen["keep"][-1].finished
    assert _all_free(llm)
    core.abort_request(["unknown", "keep"])  # finished or unknown ids are ignored


def test_duplicate_request_id_and_bad_prompt_leave_the_engine_usable(llm):
    core = llm.llm_engine
    core.add_request("same", "Hello", GREEDY)
    with pytest.raises(ValueError, match="same"):
        core.add_request("same", "Hello", GREEDY)
    with pytest.raises((ValueError, TypeError)):
        core.add_request("bad", [1.5, 2.0], GREEDY)
    assert core.get_num_unfinished_requests() == 1
    assert _run(core)["same"][-1].finished
    assert _all_free(llm)


def test_stream_yields_deltas_and_closing_early_aborts(llm):
    final = llm.generate("Hello there", SEEDED, use_tqdm=False)[0].outputs[0]
    pieces = list(llm.stream("Hello there", SEEDED))
    assert "".join(p.outputs[0].text for p in pieces) == final.text
    assert sum((p.outputs[0].token_ids for p in pieces), []) == final.token_ids
    stream = llm.stream("Hello there", SamplingParams(max_tokens=60))
    next(stream)
    stream.close()  # a `break` out of a for loop does the same once the generator is dropped
    assert _all_free(llm)


def test_async_engine_interleaves_requests_and_cancels(llm):
    expected = {
        p: o.outputs[0].token_ids
        for p, o in zip(["a b", "c d e"], llm.generate(["a b", "c d e"], SEEDED, use_tqdm=False))
    }
    engine = AsyncEngine(llm)
    delta = SamplingParams(**{**_fields(SEEDED), "output_kind": RequestOutputKind.DELTA})

    async def collect(prompt: str, request_id: str) -> tuple[list[int], list[int]]:
        tokens, steps = [], []
        async for output in engine.generate(prompt, delta, request_id):
            tokens += output.outputs[0].token_ids
            steps.append(engine.core.stats.num_steps)
        return tokens, steps

    async def cancelled() -> None:
        async for _ in engine.generate("x y z", SamplingParams(max_tokens=60), "gone"):
            break

    async def main():
        results = await asyncio.gather(collect("a b", "A"), collect("c d e", "B"), cancelled())
        for _ in range(100):  # the abort runs on the engine thread after the step in progress
            if _all_free(llm):
                break
            await asyncio.sleep(0.01)
        return results

    (a_tokens, a_steps), (b_tokens, b_steps), _ = asyncio.run(main())
    assert a_tokens == expected["a b"] and b_tokens == expected["c d e"]
    assert set(a_steps) & set(b_steps)  # both advanced in the same steps: one shared batch
    assert _all_free(llm)


_GOOD = ["Hello", [5, 6, 7], {"prompt_token_ids": [9, 10]}, {"prompt": "abc"}, np.arange(3, 8)]
_BAD = [
    None,
    b"bytes",
    [1.5, 2],
    [True, 3],
    {"prompt_token_ids": None},
    {"prompt_token_ids": "abc"},
    [2**31],
    [-1],
    [],
    [5] * 200,
]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prompts=st.lists(st.sampled_from(range(len(_GOOD) + len(_BAD))), min_size=1, max_size=5),
    bad_words=st.sampled_from([None, [" "], ["\n"], ["xyz"]]),
)
def test_a_call_mixing_good_and_bad_prompts_queues_all_or_nothing(llm, prompts, bad_words):
    chosen = [(_GOOD + _BAD)[i] for i in prompts]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, bad_words=bad_words)
    expect_error = any(i >= len(_GOOD) for i in prompts) or bad_words in ([" "], ["\n"])
    try:
        outputs = llm.generate(chosen, params, use_tqdm=False)
    except (ValueError, TypeError) as error:
        assert expect_error, error
        assert "prompts[" in str(error) or "prompts is" in str(error)
    else:
        assert not expect_error
        assert len(outputs) == len(chosen) and all(
            len(o.outputs[0].token_ids) == 2 for o in outputs
        )
    assert _all_free(llm)
    assert llm.generate("Hello", GREEDY, use_tqdm=False)[0].finished  # the next call works


def mixed_requests(llm: LLM) -> tuple[list[str], list[SamplingParams]]:
    """Six prompts whose requests exercise the loop's paths: seeded sampling with penalties and
    logprobs, n > 1, a stop string and a stop token (stops mid-decode, from this model's own
    greedy output), a short request, min_tokens; different lengths."""
    tokenizer = llm.get_tokenizer()
    base = llm.generate("a b c", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    prompts = ["Hello there", "The capital of France is", "1 2 3", "a b c", "x", "y z"]
    params = [
        SamplingParams(temperature=0.9, seed=1, max_tokens=12, presence_penalty=0.5, logprobs=2),
        SamplingParams(temperature=0.7, top_k=20, seed=2, max_tokens=9, n=2, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=15, stop=[tokenizer.decode(base[3:5])]),
        SamplingParams(temperature=0, max_tokens=15, stop_token_ids=[base[6]], ignore_eos=True),
        SamplingParams(temperature=1.0, seed=5, max_tokens=3, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, seed=6, max_tokens=20, min_tokens=4, ignore_eos=True),
    ]
    return prompts, params


def everything_seen(engine: LLM, prompts, params) -> list:
    """What a caller sees of each completion: tokens, text, finish and stop reasons, logprobs."""
    return [
        [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs]
        for o in engine.generate(prompts, params, use_tqdm=False)
    ]


def test_async_scheduling_gives_the_plain_loops_results(llm, tiny_llama):
    """Steps planned ahead (the next decode dispatched before this one's tokens are read back)
    change nothing a caller sees: tokens, logprobs, texts and finish reasons are those of the
    plain loop, over seeded sampling with penalties, stop strings and tokens, n > 1, logprobs,
    early eos-like stops and different lengths; and nothing compiles after warm-up."""
    prompts, params = mixed_requests(llm)
    plain = LLM(EngineConfig(model=str(tiny_llama), async_scheduling=False, **SMALL))
    assert not plain.llm_engine._run_ahead_enabled
    expected = everything_seen(plain, prompts, params)
    plain.shutdown()
    core = llm.llm_engine
    llm.warmup()
    compiled, ahead = llm.num_compilations, core.stats.num_steps_ahead
    assert everything_seen(llm, prompts, params) == expected
    assert core.stats.num_steps_ahead - ahead > 10  # it really ran ahead
    assert llm.num_compilations == compiled
    assert _all_free(llm)


def test_detokenize_false_gives_token_ids_only(llm):
    """vLLM's `detokenize=False`: same tokens, empty text (evaluation clients score ids)."""
    (with_text,) = llm.generate("Hello there", SEEDED, use_tqdm=False)
    params = SamplingParams(**{**_fields(SEEDED), "detokenize": False})
    (ids_only,) = llm.generate("Hello there", params, use_tqdm=False)
    assert ids_only.outputs[0].token_ids == with_text.outputs[0].token_ids
    assert with_text.outputs[0].text and ids_only.outputs[0].text == ""
