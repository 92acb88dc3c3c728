"""The sampling pipeline through the whole engine: reproducibility, logprobs, stop strings, masks.

The pipeline's arithmetic is tested row by row in tests/runtime/test_sampling.py; here the claims
are about the engine: a seeded request draws the same tokens whatever else happens around it,
logprobs are the model's own (checked against transformers), and the per-slot device state
(penalty counts, masks) follows each request through batching and preemption.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from jaxinfer import Engine, EngineConfig, SamplingParams
from tests.checkpoints import hf_greedy, hf_model

SEEDED = SamplingParams(
    temperature=0.9,
    top_p=0.95,
    top_k=40,
    min_p=0.02,
    repetition_penalty=1.1,
    frequency_penalty=0.2,
    seed=1234,
    max_tokens=24,
    ignore_eos=True,
)


def _engine(tiny_llama, **kw) -> Engine:
    base = {"dtype": "float32", "max_model_len": 256, "num_kv_blocks": 128}
    return Engine(EngineConfig(model=str(tiny_llama), **{**base, **kw}))


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return np.random.default_rng(3).integers(5, 512, size=37).tolist()


def _others(count: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """A mixed batch: greedy, plain temperature, top-k, penalties, bias, masks, other seeds."""
    rng = np.random.default_rng(11)
    prompts, params = [], []
    for i in range(count):
        prompts.append(rng.integers(5, 512, size=int(rng.integers(1, 90))).tolist())
        kind = i % 6
        params.append(
            SamplingParams(
                temperature=[0.0, 1.0, 0.7, 1.3, 0.5, 1.0][kind],
                top_k=[0, 0, 5, 0, 0, 100][kind],
                top_p=[1.0, 1.0, 1.0, 0.8, 1.0, 0.5][kind],
                presence_penalty=[0.0, 0.0, 0.0, 1.5, 0.0, 0.0][kind],
                logit_bias={7: 5.0} if kind == 4 else None,
                allowed_token_ids=list(range(100, 200)) if kind == 5 else None,
                seed=None if kind == 1 else int(rng.integers(0, 10_000)),
                max_tokens=int(rng.integers(4, 40)),
                ignore_eos=True,
            )
        )
    return prompts, params


def test_seeded_request_is_reproducible_in_every_setting(tiny_llama, prompt, caplog):
    alone = _engine(tiny_llama).generate([prompt], SEEDED, use_tqdm=False)[0].outputs[0].token_ids
    assert len(alone) == 24

    # (b) in a batch with 31 other requests of mixed parameters, at a different row
    others, other_params = _others(31)
    batch = _engine(tiny_llama).generate(
        others[:13] + [prompt] + others[13:],
        other_params[:13] + [SEEDED] + other_params[13:],
        use_tqdm=False,
    )
    assert batch[13].outputs[0].token_ids == alone

    # (c) another max_num_seqs, other buckets, chunked prefill
    small = _engine(tiny_llama, max_num_seqs=3, max_num_batched_tokens=16, seq_buckets=(1, 3))
    out = small.generate(others[:5] + [prompt], other_params[:5] + [SEEDED], use_tqdm=False)
    assert out[-1].outputs[0].token_ids == alone

    # (d) preempted and recomputed: 12 usable blocks cannot hold 8 sequences at once
    squeezed = _engine(tiny_llama, num_kv_blocks=13, max_num_seqs=8)
    with caplog.at_level(logging.WARNING, logger="jaxinfer"):
        out = squeezed.generate([prompt] + others[:7], [SEEDED] + other_params[:7], use_tqdm=False)
    assert squeezed.scheduler.num_preemptions > 0
    assert out[0].outputs[0].token_ids == alone

    # (e) a second fresh engine, same request
    again = _engine(tiny_llama).generate([prompt], SEEDED, use_tqdm=False)
    assert again[0].outputs[0].token_ids == alone


def test_unseeded_requests_follow_the_engine_seed(tiny_llama, prompt):
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    first = _engine(tiny_llama, seed=5).generate([prompt] * 3, params, use_tqdm=False)
    second = _engine(tiny_llama, seed=5).generate([prompt] * 3, params, use_tqdm=False)
    other = _engine(tiny_llama, seed=6).generate([prompt] * 3, params, use_tqdm=False)
    ids = [[o.outputs[0].token_ids for o in run] for run in (first, second, other)]
    assert ids[0] == ids[1]
    assert len({tuple(t) for t in ids[0]}) == 3  # each request index draws its own stream
    assert ids[0] != ids[2]


def test_seeded_sampling_differs_from_greedy_and_between_seeds(tiny_llama, prompt):
    engine = _engine(tiny_llama)
    runs = engine.generate(
        [prompt] * 3,
        [
            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            SEEDED,
            SamplingParams(**{**_fields(SEEDED), "seed": 99}),
        ],
        use_tqdm=False,
    )
    ids = [r.outputs[0].token_ids for r in runs]
    assert ids[0] != ids[1] and ids[1] != ids[2]


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}


@torch.no_grad()
def test_logprobs_match_transformers(tiny_llama, prompt):
    k = 5
    engine = _engine(tiny_llama)
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=12, logprobs=k, ignore_eos=True)
    out = engine.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 12

    model = hf_model(tiny_llama)
    ids = torch.tensor([prompt + out.token_ids[:-1]])
    logits = model(ids).logits[0, len(prompt) - 1 :].float()
    reference = torch.log_softmax(logits, dim=-1).numpy()  # [12, V]
    total = 0.0
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = reference[step]
        assert token in entry
        np.testing.assert_allclose(entry[token].logprob, row[token], atol=1e-4)
        # vLLM's rank: tokens with a logprob >= the token's (allowing for float noise vs torch)
        rank = entry[token].rank
        assert (
            int(np.sum(row > row[token] + 1e-4)) + 1
            <= rank
            <= int(np.sum(row >= row[token] - 1e-4))
        )
        top_ids = [tid for tid in entry if tid != token or len(entry) == k]
        kth_best = np.sort(row)[-k]
        assert len(top_ids) == k and all(row[tid] >= kth_best - 1e-4 for tid in top_ids)
        assert sorted(entry[tid].rank for tid in top_ids) == list(range(1, k + 1))
        for tid in top_ids:
            np.testing.assert_allclose(entry[tid].logprob, row[tid], atol=1e-4)
        assert entry[token].decoded_token == engine.tokenizer.decode([token])
        total += row[token]
    np.testing.assert_allclose(out.cumulative_logprob, total, atol=1e-3)


def test_repetition_penalty_greedy_matches_transformers(tiny_llama, prompt):
    """transformers' RepetitionPenaltyLogitsProcessor uses vLLM's formula over prompt + output."""
    engine = _engine(tiny_llama)
    params = SamplingParams(temperature=0, repetition_penalty=1.8, max_tokens=20, ignore_eos=True)
    out = engine.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert out == hf_greedy(tiny_llama, prompt, 20, repetition_penalty=1.8)
    assert out != hf_greedy(tiny_llama, prompt, 20)  # the penalty changed something


def test_stop_string_spanning_tokens(tiny_llama, prompt):
    engine = _engine(tiny_llama)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = engine.generate([prompt], greedy, use_tqdm=False)[0].outputs[0]
    pieces = [engine.tokenizer.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
    # a stop string made of the end of one token's text and the start of the next one's
    cut = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    boundary = len(pieces[cut - 1])
    stop = full.text[boundary - 1 : boundary + 1]
    first_at = full.text.find(stop)
    for include in (False, True):
        params = SamplingParams(
            temperature=0,
            max_tokens=30,
            ignore_eos=True,
            stop=[stop, "no such stop string anywhere"],
            include_stop_str_in_output=include,
        )
        out = engine.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == full.text[: first_at + (len(stop) if include else 0)]
        assert out.token_ids == full.token_ids[: len(out.token_ids)]
        assert len(out.token_ids) < len(full.token_ids)


def test_min_tokens_holds_back_eos(tiny_llama, prompt):
    engine = _engine(tiny_llama)
    eos = min(engine.eos_token_ids)
    eager = {"temperature": 0, "max_tokens": 20, "logit_bias": {eos: 100.0}}
    out = engine.generate(
        [prompt, prompt],
        [SamplingParams(**eager), SamplingParams(**eager, min_tokens=6)],
        use_tqdm=False,
    )
    assert out[0].outputs[0].token_ids == [eos] and out[0].outputs[0].finish_reason == "stop"
    held = out[1].outputs[0]
    assert len(held.token_ids) == 7 and held.token_ids[-1] == eos
    assert eos not in held.token_ids[:-1] and held.finish_reason == "stop"


def test_allowed_token_ids_logit_bias_and_bad_words(tiny_llama, prompt):
    engine = _engine(tiny_llama)
    allowed = list(range(200, 230))
    out = engine.generate(
        [prompt] * 2,
        [
            SamplingParams(temperature=1.5, seed=1, max_tokens=40, allowed_token_ids=allowed),
            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logit_bias={123: 100.0}),
        ],
        use_tqdm=False,
    )
    assert set(out[0].outputs[0].token_ids) <= set(allowed)
    assert out[1].outputs[0].token_ids == [123] * 10

    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = engine.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    word = engine.tokenizer.decode(plain[:2]).strip()
    banned = engine._bad_word_token_ids([word])
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, bad_words=[word])
    out = engine.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert out != plain
    for ids in banned:
        windows = {tuple(out[i : i + len(ids)]) for i in range(len(out) - len(ids) + 1)}
        assert tuple(ids) not in windows


def test_bad_sampling_input_fails_before_any_work(tiny_llama, prompt):
    engine = _engine(tiny_llama)
    vocab = engine.vocab_size
    cases = [
        (SamplingParams(logit_bias={vocab: 1.0}), "logit_bias"),
        (SamplingParams(allowed_token_ids=[vocab + 3]), "allowed_token_ids"),
        (SamplingParams(logprobs=engine.config.max_logprobs + 1), "logprobs"),
        (SamplingParams(top_k=vocab + 1), "top_k"),
        (SamplingParams(n=2), "SamplingParams.n"),
    ]
    for bad, field in cases:
        with pytest.raises(ValueError, match=field):
            engine.generate([prompt, prompt], [SamplingParams(max_tokens=2), bad], use_tqdm=False)
        manager = engine.block_manager
        assert manager.num_free_blocks == manager.num_usable_blocks
        assert not engine.scheduler.has_unfinished
    ok = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 3
