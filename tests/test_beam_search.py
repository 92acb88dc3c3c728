"""`LLM.beam_search` against transformers' `generate(num_beams=k, do_sample=False)`, token for token.

The reference is transformers' own beam search (`early_stopping=False`, its default, and
`num_return_sequences=k` so that all k beams are compared, best first), on the same float32
weights. Equality is exact on the tokens; the scores are compared at 1e-4, a margin above the
float32 difference of the two implementations' log-probabilities (a few 1e-6 on the tiny checkpoint
and up to ~1e-4 on SmolLM2's logits, tests/models/test_smollm2.py), summed over a few tokens.

With eos: the tiny checkpoint's own eos almost never ranks among the best continuations, so its eos
is set (on both sides) to tokens that do appear early in its beams; the test checks that beams then
really end on eos.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

import jaxinfer
from jaxinfer import LLM, BeamSearchParams, EngineConfig
from jaxinfer.engine.beam_search import beam_search
from tests.checkpoints import SMOLLM2_ENGINE, hf_model

MAX_TOKENS = 10
SCORE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(EngineConfig(model=str(tiny_llama), max_model_len=128, max_num_seqs=16))


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return hf_model(tiny_llama)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(5, 300, size=n).tolist() for n in (3, 17, 9)]


@torch.no_grad()
def hf_beam_search(
    model, prompt: list[int], width: int, max_tokens: int, eos: list[int] | None, penalty: float
) -> list[tuple[list[int], float]]:
    """transformers' k beams for one prompt, best first: (generated ids up to and with eos, the
    beam's score). `eos=None`: no eos at all (jaxinfer's ignore_eos=True)."""
    config = GenerationConfig(
        do_sample=False,
        num_beams=width,
        num_return_sequences=width,
        max_new_tokens=max_tokens,
        length_penalty=penalty,
        early_stopping=False,
        eos_token_id=eos,
        pad_token_id=model.config.pad_token_id,
        return_dict_in_generate=True,
        output_scores=True,
    )
    # generate() fills the config's Nones from model.generation_config (its eos included): swap.
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    finally:
        model.generation_config = saved
    beams = []
    for row, score in zip(out.sequences.tolist(), out.sequences_scores.tolist(), strict=True):
        generated = row[len(prompt) :]
        ends = [i for i, token in enumerate(generated) if eos and token in eos]
        beams.append((generated[: ends[0] + 1] if ends else generated, score))
    return beams


def _check_equal(outputs, prompts, references, penalty: float) -> None:
    for prompt, output, expected in zip(prompts, outputs, references, strict=True):
        got = [sequence.tokens[len(prompt) :] for sequence in output.sequences]
        assert got == [tokens for tokens, _ in expected]
        for sequence, (tokens, score) in zip(output.sequences, expected, strict=True):
            assert sequence.tokens[: len(prompt)] == prompt
            assert len(sequence.logprobs) == len(tokens)
            ours = sequence.cum_logprob / len(tokens) ** penalty
            assert abs(ours - score) < SCORE_TOLERANCE, (ours, score)


@pytest.mark.parametrize("width", [2, 4])
def test_matches_transformers_without_eos(llm, reference, prompts, width):
    params = BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    references = [hf_beam_search(reference, p, width, MAX_TOKENS, None, 1.0) for p in prompts]
    _check_equal(outputs, prompts, references, 1.0)
    for output in outputs:
        assert [s.finish_reason for s in output.sequences] == ["length"] * width
        assert all(len(s.tokens) == len(output.sequences[0].tokens) for s in output.sequences)


@pytest.mark.parametrize(("width", "penalty"), [(2, 1.0), (4, 1.0), (4, 0.0), (4, -1.0)])
def test_matches_transformers_with_eos(llm, reference, prompts, width, penalty):
    free = BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = llm.beam_search([{"prompt_token_ids": p} for p in prompts], free)
    # Tokens the beams pick early: as eos they end some beams mid-search.
    early = sorted({s.tokens[len(p) + 1] for o, p in zip(first, prompts) for s in o.sequences})
    engine = llm.llm_engine
    saved = engine.eos_token_ids
    params = BeamSearchParams(width, MAX_TOKENS, length_penalty=penalty)
    stopped = 0
    try:
        for eos in early[:2]:
            engine.eos_token_ids = {eos}
            outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
            references = [
                hf_beam_search(reference, p, width, MAX_TOKENS, [eos], penalty) for p in prompts
            ]
            _check_equal(outputs, prompts, references, penalty)
            for output in outputs:
                for sequence in output.sequences:
                    ended_on_eos = sequence.tokens[-1] == eos
                    assert sequence.finish_reason == ("stop" if ended_on_eos else "length")
                    stopped += ended_on_eos
    finally:
        engine.eos_token_ids = saved
    assert stopped > 0  # eos really ended beams, so the eos path was exercised


def test_output_layout_and_text(llm):
    tokenizer = llm.get_tokenizer()
    outputs = llm.beam_search(
        ["Hello world", {"prompt": "The cat"}], BeamSearchParams(3, 5, ignore_eos=True)
    )
    assert len(outputs) == 2
    for text, output in zip(["Hello world", "The cat"], outputs, strict=True):
        prompt_ids = tokenizer(text)["input_ids"]
        assert len(output.sequences) == 3
        for sequence in output.sequences:
            assert sequence.tokens[: len(prompt_ids)] == prompt_ids
            assert sequence.text == tokenizer.decode(sequence.tokens[len(prompt_ids) :])
            assert sequence.lora_request is None
            for step, token in zip(sequence.logprobs, sequence.tokens[len(prompt_ids) :]):
                assert token in step
        scores = [s.cum_logprob / 5 for s in output.sequences]
        assert scores == sorted(scores, reverse=True)


def test_bad_params_raise_before_anything_is_queued(llm):
    engine = llm.llm_engine
    steps = engine.stats.num_steps
    for fields, error, name in [
        ({"beam_width": 0, "max_tokens": 4}, ValueError, "beam_width"),
        ({"beam_width": 2, "max_tokens": 0}, ValueError, "max_tokens"),
        ({"beam_width": 2.0, "max_tokens": 4}, TypeError, "beam_width"),
        ({"beam_width": 2, "max_tokens": 4, "temperature": -1.0}, ValueError, "temperature"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}, ValueError, "length"),
        ({"beam_width": 2, "max_tokens": 4, "ignore_eos": "yes"}, TypeError, "ignore_eos"),
    ]:
        with pytest.raises(error, match=name):
            BeamSearchParams(**fields)
    calls = [
        # 2 * 11 candidates per beam > max_logprobs=20
        (["Hi"], BeamSearchParams(11, 4), "beam_width"),
        (["Hi"], BeamSearchParams(2, 200), "max_tokens"),  # beyond max_model_len=128
        (["Hi", {"prompt_token_ids": [10**6]}], BeamSearchParams(2, 4), r"prompts\[1\]"),
    ]
    for prompts, params, name in calls:
        with pytest.raises(ValueError, match=name):
            llm.beam_search(prompts, params)
    with pytest.raises(ValueError, match="lora_request"):
        llm.beam_search(["Hi"], BeamSearchParams(2, 4), lora_request=object())
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search(["Hi"], {"beam_width": 2, "max_tokens": 4})
    assert not engine.has_unfinished_requests()
    assert engine.stats.num_steps == steps  # every one stopped before a step ran


def test_no_leaks(llm):
    engine = llm.llm_engine
    steps = engine.stats.num_steps
    llm.beam_search(["Hi there", "Hi"], BeamSearchParams(4, 6), concurrency_limit=1)
    assert engine.stats.num_steps > steps
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_beams_share_the_prompt_blocks(llm):
    """The beams of a 70-token prompt read its full blocks from the prefix cache (shared by
    reference, as vLLM's loop shares them), so a step computes little more than each beam's
    partial last block: at most the prompt once plus one block per later beam request."""
    engine = llm.llm_engine
    assert llm.reset_prefix_cache()
    queried, hits = engine.stats.prefix_cache_queries, engine.stats.prefix_cache_hits
    prompt = list(range(5, 75))
    width, max_tokens = 4, 6
    llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(width, max_tokens, True))
    queried = engine.stats.prefix_cache_queries - queried
    computed = queried - (engine.stats.prefix_cache_hits - hits)
    requests = 1 + width * (max_tokens - 1)  # an upper bound: one, then <= width per step
    assert queried >= len(prompt) * (1 + max_tokens - 1)  # every step asked for the prompt
    assert computed <= len(prompt) + (requests - 1) * engine.config.block_size


def test_importable_where_vllm_has_it():
    from jaxinfer.beam_search import BeamSearchOutput, BeamSearchSequence
    from jaxinfer.sampling_params import BeamSearchParams as FromSamplingParams

    assert FromSamplingParams is jaxinfer.BeamSearchParams is BeamSearchParams
    assert BeamSearchParams(4, 16) == BeamSearchParams(beam_width=4, max_tokens=16)
    assert BeamSearchOutput().sequences == []
    assert BeamSearchSequence(tokens=[1], logprobs=[]).cum_logprob == 0.0


# ---- the real default model -------------------------------------------------------------------

SMOLLM2_QUESTIONS = ["What is the capital of France?", "What is 12 times 7?"]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> LLM:
    return LLM(EngineConfig(model=str(smollm2_gguf), **SMOLLM2_ENGINE))


def _chat_ids(tokenizer, question: str) -> list[int]:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": question},
    ]
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


@pytest.mark.parametrize(
    ("width", "ignore_eos", "questions", "max_tokens"),
    [
        (2, False, SMOLLM2_QUESTIONS[:1], 10),
        (4, False, SMOLLM2_QUESTIONS[:1], 10),
        (2, True, SMOLLM2_QUESTIONS[1:], 4),
    ],
)
def test_smollm2_matches_transformers(
    smollm2, hf_smollm2, width, ignore_eos, questions, max_tokens
):
    tokenizer = smollm2.get_tokenizer()
    prompts = [_chat_ids(tokenizer, question) for question in questions]
    params = BeamSearchParams(width, max_tokens, ignore_eos=ignore_eos)
    outputs = smollm2.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    eos = None if ignore_eos else sorted(smollm2.llm_engine.eos_token_ids)
    references = [hf_beam_search(hf_smollm2, p, width, max_tokens, eos, 1.0) for p in prompts]
    _check_equal(outputs, prompts, references, 1.0)
    if not ignore_eos:  # the answer ends on the end-of-turn token within max_tokens
        assert outputs[0].sequences[0].finish_reason == "stop"
        assert "Paris" in outputs[0].sequences[0].text
    engine = smollm2.llm_engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_eos_ranked_beyond_the_width_does_not_finish():
    """transformers' rule, where vLLM's loop differs: an eos continuation joins the finished beams
    only if it ranks among the best beam_width continuations of its step. Here eos ranks second
    with width 1, so the answer is the 2-token beam even though the eos beam would score higher
    (vLLM's `LLM.beam_search` keeps eos of any rank and would return [EOS])."""
    eos_id = 9
    table = {(): {5: math.log(0.6), eos_id: math.log(0.4)}, (5,): {6: math.log(0.1), 7: -5.0}}

    def next_logprobs(sequences):
        return [table[tuple(ids[1:])] for ids in sequences]  # ids[0] is the prompt

    (finished,) = beam_search([[1]], BeamSearchParams(1, 2), frozenset({eos_id}), next_logprobs)
    assert [done.beam.token_ids for done in finished] == [(5, 6)]
    assert finished[0].finish_reason == "length"
    assert finished[0].score == pytest.approx(math.log(0.06) / 2)
