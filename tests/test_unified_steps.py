"""Unified steps on a tiny checkpoint: decodes and prefill chunks in one compiled step give the
same tokens and logprobs as separate prefill and decode steps."""

from __future__ import annotations

import pytest

from jaxinfer import LLM, EngineConfig, SamplingParams
from tests.test_prefix_caching import assert_same  # logprobs within its stated LOGPROB_ATOL

CONFIG = {
    "dtype": "float32",
    "max_model_len": 128,
    "num_kv_blocks": 64,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 32,
    "seq_buckets": (4,),
    "token_buckets": (16, 32),
    "enable_prefix_caching": False,  # what is compared here is the step layout alone
}


@pytest.fixture(scope="module")
def engines(tiny_llama):
    unified = LLM(EngineConfig(model=str(tiny_llama), **CONFIG))
    separate = LLM(EngineConfig(model=str(tiny_llama), unified_steps=False, **CONFIG))
    yield unified, separate
    unified.shutdown()
    separate.shutdown()


def staggered_prompts() -> list[dict]:
    """Short and long prompts: the long ones arrive (in later steps) while short ones decode."""
    lengths = [3, 50, 5, 70, 9, 33, 2]
    return [
        {"prompt_token_ids": [(13 * i + 7 * j) % 500 + 2 for j in range(n)]}
        for i, n in enumerate(lengths)
    ]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True),
        SamplingParams(n=2, temperature=0.9, top_k=20, max_tokens=12, seed=4, logprobs=1),
        SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2),
    ],
    ids=["greedy", "seeded-n2", "prompt-logprobs"],
)
def test_unified_steps_match_separate_steps(engines, params):
    unified, separate = engines
    before = unified.llm_engine.stats.num_unified_steps
    got = unified.generate(staggered_prompts(), params, use_tqdm=False)
    want = separate.generate(staggered_prompts(), params, use_tqdm=False)
    assert_same(got, want)
    assert unified.llm_engine.stats.num_unified_steps > before
    assert separate.llm_engine.stats.num_unified_steps == 0


def test_decodes_keep_stepping_while_a_long_prompt_prefills(engines):
    """The separate loop stops every running decode for each chunk of an arriving prompt."""
    unified, separate = engines
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    gaps = {}
    for name, llm in (("unified", unified), ("separate", separate)):
        core = llm.llm_engine
        core.add_request("short", {"prompt_token_ids": [5, 6, 7]}, params)
        core.step()
        core.step()
        core.add_request("long", {"prompt_token_ids": list(range(2, 100))}, params)
        steps_without_short = 0
        while core.has_unfinished_requests():
            outputs = core.step()
            if not any(o.request_id == "short" for o in outputs) and core._requests.get("short"):
                steps_without_short += 1
        gaps[name] = steps_without_short
    assert gaps["unified"] == 0 and gaps["separate"] >= 3  # 98 tokens: >= 3 chunks of 32
