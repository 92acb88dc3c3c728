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
from jaxinfer.engine.intake import bad_word_token_ids
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

    # (d) preempted and recomputed: 12 usable blocks cannot hold 8 sequences at once (and hold
    # one max_model_len sequence, as the engine requires)
    squeezed = _engine(tiny_llama, num_kv_blocks=13, max_num_seqs=8, max_model_len=192)
    with caplog.at_level(logging.WARNING, logger="jaxinfer"):
        out = squeezed.generate([prompt] + others[:7], [SEEDED] + other_params[:7], use_tqdm=False)
    assert squeezed.llm_engine.scheduler.num_preemptions > 0
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
    eos = min(engine.llm_engine.eos_token_ids)
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
    banned = bad_word_token_ids(engine.tokenizer, [word], 0)
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
        (SamplingParams(n=engine.config.max_num_seqs + 1), "SamplingParams.n"),
    ]
    for bad, field in cases:
        with pytest.raises(ValueError, match=field):
            engine.generate([prompt, prompt], [SamplingParams(max_tokens=2), bad], use_tqdm=False)
        manager = engine.llm_engine.block_manager
        assert manager.num_free_blocks == manager.num_usable_blocks
        assert not engine.llm_engine.scheduler.has_unfinished
    ok = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 3


def test_parallel_samples_equal_single_requests_with_their_seeds(tiny_llama, prompt):
    """n > 1 shares the prompt's blocks (copy-on-write of the partial one); if sharing or the
    copy were wrong, the samples' tokens would drift from the same requests run one by one."""
    from jaxinfer.seeds import row_seed

    engine = _engine(tiny_llama)
    params = SamplingParams(**{**_fields(SEEDED), "n": 4, "logprobs": 1})
    out = engine.generate([prompt, prompt[:5]], params, use_tqdm=False)
    for request in out:
        assert [c.index for c in request.outputs] == [0, 1, 2, 3]
        assert len({tuple(c.token_ids) for c in request.outputs}) == 4
        for completion in request.outputs:
            alone = SamplingParams(
                **{**_fields(params), "n": 1, "seed": row_seed(1234, completion.index)}
            )
            single = engine.generate([request.prompt_token_ids], alone, use_tqdm=False)[0]
            assert single.outputs[0].token_ids == completion.token_ids
            assert len(completion.logprobs) == len(completion.token_ids)
    manager = engine.llm_engine.block_manager
    assert manager.num_free_blocks == manager.num_usable_blocks
    # sample 0 is the request's own seed: n = 1 with the same seed gives the same tokens
    assert (
        out[0].outputs[0].token_ids
        == engine.generate([prompt], SEEDED, use_tqdm=False)[0].outputs[0].token_ids
    )


@torch.no_grad()
def test_prompt_logprobs_match_transformers_across_chunks(tiny_llama, prompt):
    """Prompt logprobs come chunk by chunk (chunked prefill here) and equal transformers'."""
    k = 3
    engine = _engine(tiny_llama, max_num_batched_tokens=16, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=k)
    out = engine.generate([prompt, prompt[:9]], [params, SamplingParams(max_tokens=2)], False)
    assert out[1].prompt_logprobs is None
    entries = out[0].prompt_logprobs
    assert len(entries) == len(prompt) and entries[0] is None

    logits = hf_model(tiny_llama)(torch.tensor([prompt])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1).numpy()  # row p predicts token p + 1
    for position in range(1, len(prompt)):
        entry, row, token = entries[position], reference[position - 1], prompt[position]
        np.testing.assert_allclose(entry[token].logprob, row[token], atol=1e-4)
        assert len(entry) in (k, k + 1)
        top = sorted((lp.rank, tid) for tid, lp in entry.items() if tid != token or len(entry) == k)
        assert [rank for rank, _ in top] == list(range(1, k + 1))
        for _, tid in top:
            np.testing.assert_allclose(entry[tid].logprob, row[tid], atol=1e-4)
        assert min(row[tid] for _, tid in top) >= np.sort(row)[-k] - 1e-4


@torch.no_grad()
def test_whole_vocabulary_logprobs_when_unbounded(tiny_llama, prompt):
    """vLLM: logprobs=-1 counts as vocab_size against max_logprobs; -1 lifts the bound."""
    with pytest.raises(ValueError, match="max_logprobs"):
        _engine(tiny_llama).generate([prompt], SamplingParams(logprobs=-1), use_tqdm=False)
    engine = _engine(tiny_llama, max_logprobs=-1)
    params = SamplingParams(temperature=0, max_tokens=2, logprobs=-1, prompt_logprobs=-1)
    out = engine.generate([prompt[:6]], params, use_tqdm=False)[0]
    vocab = engine.vocab_size
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    logits = hf_model(tiny_llama)(torch.tensor([ids[:-1]])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1).numpy()
    entries = out.prompt_logprobs[1:] + out.outputs[0].logprobs
    assert len(entries) == len(ids) - 1
    for entry, row in zip(entries, reference, strict=True):
        assert sorted(entry) == list(range(vocab))
        got = np.array([entry[t].logprob for t in range(vocab)])
        np.testing.assert_allclose(got, row, atol=1e-4)
