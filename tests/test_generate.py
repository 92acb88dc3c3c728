"""Greedy generation through the whole engine equals transformers' `generate`, token for token.

Each prompt's reference is transformers run on that prompt alone, so batching, bucketing, chunked
prefill and preemption must all be invisible in the output.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from jaxinfer import Engine, EngineConfig, SamplingParams
from tests.checkpoints import hf_greedy, hf_model

NEW_TOKENS = 64
PROMPT_LENGTHS = (1, 3, 17, 40, 64, 99, 150, 200, 8)
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(5, 512, size=n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def expected(tiny_llama, prompts) -> list[list[int]]:
    model = hf_model(tiny_llama)
    return [hf_greedy(model, p, NEW_TOKENS) for p in prompts]


SETTINGS = {
    "roomy": {"num_kv_blocks": 256},
    # 19 usable blocks of 16 tokens hold one max_model_len (304) sequence, as the engine
    # requires, but not 8 prompts and their outputs at once: the batch must preempt.
    "squeezed-cache": {"num_kv_blocks": 20, "max_num_seqs": 8, "max_model_len": 304},
    "chunked-prefill": {"num_kv_blocks": 256, "max_num_batched_tokens": 32},
    "one-seq-at-a-time": {"num_kv_blocks": 256, "max_num_seqs": 1},
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_greedy_matches_transformers(tiny_llama, prompts, expected, setting, caplog):
    kw = {"max_model_len": 512, **SETTINGS[setting]}
    config = EngineConfig(model=str(tiny_llama), dtype="float32", **kw)
    engine = Engine(config)
    with caplog.at_level(logging.WARNING, logger="jaxinfer"):
        outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    for output, want in zip(outputs, expected, strict=True):
        assert output.outputs[0].token_ids == want
        assert output.outputs[0].finish_reason == "length"
        assert output.finished
    manager = engine.llm_engine.block_manager
    assert manager.num_free_blocks == manager.num_usable_blocks
    preemption_warnings = [r for r in caplog.records if "preempted" in r.getMessage()]
    if setting == "squeezed-cache":
        assert engine.llm_engine.scheduler.num_preemptions > 0
        assert len(preemption_warnings) == 1
    else:
        assert engine.llm_engine.scheduler.num_preemptions == 0 and not preemption_warnings


def test_no_compilation_after_warmup(tiny_llama):
    engine = Engine(
        EngineConfig(
            model=str(tiny_llama),
            dtype="float32",
            max_model_len=128,
            num_kv_blocks=48,
            max_num_seqs=8,
            max_num_batched_tokens=64,
            max_prefill_seqs=4,
        )
    )
    compiled = engine.warmup()
    assert compiled == engine.num_compilations > 0
    rng = np.random.default_rng(7)
    prompts, params = [], []
    for _ in range(200):
        length = int(rng.integers(1, 100))
        prompts.append(rng.integers(5, 512, size=length).tolist())
        temperature = float(rng.choice([0.0, 0.7, 1.0]))
        sampling = bool(temperature) and bool(rng.integers(0, 2))  # the full pipeline, or not
        params.append(
            SamplingParams(
                temperature=temperature,
                top_k=int(rng.choice([0, 1, 20])) if sampling else 0,
                top_p=float(rng.choice([1.0, 0.9])) if sampling else 1.0,
                min_p=float(rng.choice([0.0, 0.1])) if sampling else 0.0,
                repetition_penalty=float(rng.choice([1.0, 1.3])),
                frequency_penalty=float(rng.choice([0.0, 0.5])),
                logit_bias={int(rng.integers(0, 512)): 3.0} if rng.integers(0, 4) == 0 else None,
                logprobs=int(rng.choice([0, 3])) if rng.integers(0, 3) == 0 else None,
                stop=["ab"] if rng.integers(0, 5) == 0 else None,
                bad_words=["the"] if rng.integers(0, 5) == 0 else None,
                min_tokens=int(rng.integers(0, 3)),
                seed=int(rng.integers(0, 1000)),
                max_tokens=int(rng.integers(3, 128 - length)),
                ignore_eos=bool(rng.integers(0, 2)),
            )
        )
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert len(outputs) == 200 and all(o.finished for o in outputs)
    assert engine.num_compilations == compiled
    stats = engine.llm_engine.stats
    assert stats.num_unified_steps > 0  # unified (decode + prefill) buckets were covered too
    manager = engine.llm_engine.block_manager
    assert manager.num_free_blocks == manager.num_usable_blocks


def test_stories260k_greedy_text(stories260k):
    """A real trained model: greedy text equals llama2.c's documented output."""
    engine = Engine(EngineConfig(model=str(stories260k), num_kv_blocks=64, max_model_len=512))
    output = engine.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=60))[0]
    text = output.outputs[0].text
    assert text.startswith(
        ", there was a little girl named Lily. She loved to play outside in the park. One day, she "
        "saw a big, red ball. She wanted to play with it, but it was too high."
    )
    model = hf_model(stories260k)
    assert output.outputs[0].token_ids == hf_greedy(model, output.prompt_token_ids, 60)
