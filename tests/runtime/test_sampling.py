"""The sampling pipeline against a plain numpy transcription of vLLM's V1 sampler.

Statistical tests are deterministic (fixed seeds): N draws of one row come from N rows that share
the seed and differ in position, i.e. N independent keys. Their bound: for N draws over V tokens
the expected total-variation distance between the empirical and the true distribution is at most
0.5 * sqrt(V / N) (= 0.012 at V = 12, N = 20,000); the tests allow 0.03. A token wrongly kept
is caught outright (masked tokens must never be drawn); one wrongly dropped moves the distance by
its probability, >= 0.04 in every truncating case (asserted below).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models import invariant
from jaxinfer.runtime import sampling
from jaxinfer.runtime.sampling import (
    argmax,
    kth_largest,
    process_logits,
    row_keys,
    sample,
    token_gumbel,
    top_logprobs,
    top_logprobs_of_logits,
    top_p_threshold,
    vocab_gumbel,
)
from jaxinfer.runtime.sampling_tensors import (
    SamplingRow,
    SamplingTensors,
    advance,
    build_sampling_tensors,
)
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.seeds import row_seed

sample_jit = jax.jit(sample, static_argnums=2)

# ---------------------------------------------------------------- numpy reference (vLLM V1)


def penalties_ref(logits, prompt_ids, output_ids, repetition, frequency, presence):
    """vLLM's apply_penalties for one row, literally."""
    logits = logits.astype(np.float64).copy()
    counts = np.bincount(np.asarray(output_ids, int), minlength=logits.size)
    seen = counts > 0
    seen[list(prompt_ids)] = True
    factor = np.where(seen, repetition, 1.0)
    logits = np.where(logits > 0, logits / factor, logits * factor)
    return logits - frequency * counts - presence * (counts > 0)


def final_probs_ref(logits, params: SamplingParams, num_output=0, prompt=(), output=(), eos=()):
    """The distribution vLLM samples from for one row (one-hot for greedy), by sorting."""
    x = np.asarray(logits, np.float64).copy()
    if params.allowed_token_ids is not None:
        banned = np.ones(x.size, bool)
        banned[params.allowed_token_ids] = False
        x[banned] = -np.inf
    if num_output < params.min_tokens:
        x[list(eos) + params.stop_token_ids] = -np.inf
    for token, bias in (params.logit_bias or {}).items():
        x[token] += bias
    x = penalties_ref(
        x,
        prompt,
        output,
        params.repetition_penalty,
        params.frequency_penalty,
        params.presence_penalty,
    )
    if params.is_greedy:
        return np.eye(x.size)[np.argmax(x)]
    x = x / params.temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    x[probs < params.min_p * probs.max()] = -np.inf
    if params.top_k:
        x[x < np.sort(x)[::-1][params.top_k - 1]] = -np.inf
    if params.top_p < 1:
        order = np.argsort(x, kind="stable")  # ascending, as vLLM
        p = np.exp(x[order] - x.max())
        p /= p.sum()
        drop = np.cumsum(p) <= 1 - params.top_p
        drop[-1] = False
        x[order[drop]] = -np.inf
    probs = np.exp(x - x.max())
    return probs / probs.sum()


def tensors_for(rows, vocab_size):
    return build_sampling_tensors(rows, vocab_size)


def draw_many(logits, params: SamplingParams, num_draws: int, max_top_k: int, seed: int = 7):
    """num_draws tokens for one row: rows that share the seed, at positions 0..num_draws-1."""
    rows = [SamplingRow(params=params, seed=seed, position=i) for i in range(num_draws)]
    t = tensors_for(rows, len(logits))
    batch = np.broadcast_to(np.asarray(logits, np.float32), (num_draws, len(logits)))
    return np.asarray(sample_jit(jnp.asarray(batch), t, max_top_k)[0])


# ---------------------------------------------------------------- statistical tests

STAT_LOGITS = np.array([2.0, 1.6, 1.1, 1.0, 0.7, 0.3, 0.0, -0.4, -1.0, -1.5, -2.2, -3.0])
NUM_DRAWS = 20_000
TV_BOUND = 0.03
SMALL_DRAWS = 2000  # one shape (2000 x 16, max_top_k 8) shared by the non-statistical draws

STAT_CASES = {
    "temperature": SamplingParams(temperature=0.7),
    "hot": SamplingParams(temperature=1.8),
    "top_k": SamplingParams(top_k=3),
    "top_k_above_K": SamplingParams(top_k=6),  # > max_top_k=4: count bisection
    "top_p": SamplingParams(top_p=0.6),
    "top_p_wide": SamplingParams(top_p=0.93, temperature=1.3),  # nucleus wider than 4
    "min_p": SamplingParams(min_p=0.2, temperature=1.5),
    "all": SamplingParams(temperature=0.9, top_k=7, top_p=0.85, min_p=0.05),
    "all_with_processing": SamplingParams(
        temperature=1.2,
        top_p=0.9,
        min_p=0.02,
        logit_bias={11: 4.0, 0: -1.0},
        allowed_token_ids=list(range(1, 12)),
        repetition_penalty=1.3,
    ),
}


@pytest.mark.parametrize("max_top_k", [4, 16])
@pytest.mark.parametrize("name", list(STAT_CASES))
def test_empirical_distribution_matches_vllm(name, max_top_k):
    params = STAT_CASES[name]
    expected = final_probs_ref(STAT_LOGITS, params)
    tokens = draw_many(STAT_LOGITS, params, NUM_DRAWS, max_top_k)
    counts = np.bincount(tokens, minlength=len(STAT_LOGITS))
    assert counts.sum() == NUM_DRAWS
    assert np.all(counts[expected == 0] == 0), "a masked token was drawn"
    tv = 0.5 * np.abs(counts / NUM_DRAWS - expected).sum()
    assert tv < TV_BOUND, (tv, counts / NUM_DRAWS, expected)


def test_statistical_cases_are_not_trivial():
    """Each truncating case keeps more than one token, drops one, and keeps none below 0.04."""
    for name, params in STAT_CASES.items():
        probs = final_probs_ref(STAT_LOGITS, params)
        kept = np.count_nonzero(probs)
        assert 1 < kept, name
        if name not in ("temperature", "hot"):
            assert kept < len(STAT_LOGITS), name
            assert probs[probs > 0].min() >= 0.04, name


# ---------------------------------------------------------------- penalties and processing


def test_penalties_match_vllm_formulas():
    rng = np.random.default_rng(0)
    num_rows, vocab = 8, 64
    logits = rng.normal(0, 3, (num_rows, vocab)).astype(np.float32)
    rows, expected = [], []
    for r in range(num_rows):
        params = SamplingParams(
            temperature=0.0,
            repetition_penalty=float(rng.uniform(0.5, 2.0)),
            frequency_penalty=float(rng.uniform(-2, 2)),
            presence_penalty=float(rng.uniform(-2, 2)),
        )
        prompt = rng.integers(0, vocab, rng.integers(1, 20))
        output = rng.integers(0, vocab, rng.integers(0, 30))
        rows.append(
            SamplingRow(params=params, seed=r, prompt_token_ids=prompt, output_token_ids=output)
        )
        expected.append(
            penalties_ref(
                logits[r],
                prompt,
                output,
                params.repetition_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )
    processed = jax.jit(process_logits)(logits, tensors_for(rows, vocab))
    np.testing.assert_allclose(processed, np.array(expected), rtol=1e-5, atol=1e-5)


def test_processing_masks_and_bias():
    vocab = 10
    logits = np.zeros((3, vocab), np.float32)
    rows = [
        SamplingRow(params=SamplingParams(logit_bias={3: 2.5, 4: -150.0}), seed=0),
        SamplingRow(params=SamplingParams(allowed_token_ids=[1, 2]), seed=0, banned_token_ids=[2]),
        SamplingRow(
            params=SamplingParams(min_tokens=2, stop_token_ids=[5]),
            seed=0,
            eos_token_ids=[9],
            output_token_ids=[0],
        ),
    ]
    out = np.asarray(process_logits(jnp.asarray(logits), tensors_for(rows, vocab)))
    assert out[0, 3] == 2.5 and out[0, 4] == -100.0 and np.all(out[0, [0, 1, 2, 5]] == 0)
    assert out[1, 1] == 0 and np.all(np.isneginf(np.delete(out[1], 1)))
    assert np.all(np.isneginf(out[2, [5, 9]])) and np.all(out[2, :5] == 0)


def test_logit_bias_allowed_and_bad_words_in_sampling():
    logits = np.linspace(1, -1, 16).astype(np.float32)
    forced = draw_many(logits, SamplingParams(logit_bias={9: 100.0}), SMALL_DRAWS, 8)
    assert np.all(forced == 9)
    allowed = draw_many(logits, SamplingParams(allowed_token_ids=[3, 7, 12]), SMALL_DRAWS, 8)
    assert set(np.unique(allowed)) == {3, 7, 12}
    rows = [
        SamplingRow(
            params=SamplingParams(logit_bias={0: -100.0}),
            seed=1,
            position=i,
            banned_token_ids=[1, 2],
        )
        for i in range(SMALL_DRAWS)
    ]
    batch = np.broadcast_to(logits, (SMALL_DRAWS, 16))
    banned = np.asarray(sample_jit(jnp.asarray(batch), tensors_for(rows, 16), 8)[0])
    assert not np.isin(banned, [0, 1, 2]).any()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_bans_eos_and_stop_ids_until_reached(temperature):
    vocab, eos, stop = 16, 15, 14
    logits = np.zeros(vocab, np.float32)
    logits[[eos, stop]] = 8.0  # almost all the mass
    params = SamplingParams(temperature=temperature, min_tokens=3, stop_token_ids=[stop])

    def tokens(num_output):
        rows = [
            SamplingRow(
                params=params,
                seed=3,
                position=i,
                output_token_ids=[0] * num_output,
                eos_token_ids=[eos],
            )
            for i in range(SMALL_DRAWS)
        ]
        batch = np.broadcast_to(logits, (SMALL_DRAWS, vocab))
        return np.asarray(sample_jit(jnp.asarray(batch), tensors_for(rows, vocab), 8)[0])

    for num_output in (0, 2):
        assert not np.isin(tokens(num_output), [eos, stop]).any()
    assert np.isin(tokens(3), [eos, stop]).mean() > 0.95


# ---------------------------------------------------------------- rows with every token masked


def _masked_rows(temperature: float) -> tuple[list[SamplingRow], list[set[int]]]:
    """Rows whose processed logits are all -inf, and the tokens each may emit."""

    def params(**kw):
        return SamplingParams(temperature=temperature, top_p=0.9, **kw)

    rows = [
        # min_tokens bans both allowed tokens (a stop id and eos): the better raw one of them.
        SamplingRow(
            params=params(allowed_token_ids=[5, 9], min_tokens=2, stop_token_ids=[5]),
            seed=1,
            eos_token_ids=[9],
        ),
        # A bad word takes 5, min_tokens takes eos 9: what is left of the allowed set is 9.
        SamplingRow(
            params=params(allowed_token_ids=[5, 9], min_tokens=1),
            seed=2,
            eos_token_ids=[9],
            banned_token_ids=[5],
        ),
        # A huge repetition penalty sends every (negative, prompt) logit to -inf.
        SamplingRow(
            params=params(allowed_token_ids=[4, 11], repetition_penalty=3e38),
            seed=3,
            prompt_token_ids=range(16),
        ),
        # logit_bias (clamped to -100) alone never masks: the only allowed token stays.
        SamplingRow(params=params(allowed_token_ids=[6], logit_bias={6: -100.0}), seed=4),
        # allowed_mask itself empty (intake rejects this): the model's own argmax, not token 0.
        SamplingRow(params=params(allowed_token_ids=[5]), seed=5, banned_token_ids=[5]),
    ]
    return rows, [{5}, {9}, {11}, {6}, {7}]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_fully_masked_row_never_emits_token_0_or_a_token_outside_the_allowed_set(temperature):
    vocab = 16
    logits = -np.linspace(0.5, 2.0, vocab).astype(np.float32)  # all negative
    logits[[5, 9]] = [-0.6, -0.7]
    logits[[4, 11]] = [-1.9, -1.2]  # x 3e38 < -3.4e38: -inf
    logits[7] = -0.1  # the raw argmax
    rows, expected = _masked_rows(temperature)
    t = tensors_for(rows, vocab)
    assert np.all(np.isneginf(np.asarray(process_logits(jnp.asarray(logits), t))[[0, 1, 2, 4]]))
    batch = jnp.asarray(np.broadcast_to(logits, (len(rows), vocab)))
    for max_top_k in (4, 16):
        tokens = np.asarray(sample_jit(batch, t, max_top_k)[0])
        assert [{int(token)} for token in tokens] == expected, max_top_k
    # The same rows among ordinary ones: each row still decides alone.
    mixed = [rows[0], None, rows[2], mixed_rows(np.random.default_rng(0), 1, vocab)[0]]
    batch = jnp.asarray(np.broadcast_to(logits, (len(mixed), vocab)))
    tokens = np.asarray(sample_jit(batch, tensors_for(mixed, vocab), 4)[0])
    assert tokens[0] == 5 and tokens[1] == 7 and tokens[2] == 11  # padding: the raw argmax


def test_logits_pushed_to_inf_by_a_tiny_repetition_penalty_still_sample_among_the_best():
    """10 / 1.2e-38 overflows to +inf; without care top-p turns inf - inf into NaN and an
    arbitrary token (here: 0) comes out."""
    vocab = 16
    logits = -np.ones(vocab, np.float32)
    logits[[3, 9]] = [10.0, 5.0]
    rows = [
        SamplingRow(
            params=SamplingParams(temperature=0.7, repetition_penalty=1.2e-38, **extra),
            seed=s,
            position=s,
            prompt_token_ids=[3, 9],
        )
        for extra in ({"top_p": 0.5}, {"top_k": 2, "top_p": 0.9}, {"min_p": 0.1}, {})
        for s in range(4)
    ]
    batch = jnp.asarray(np.broadcast_to(logits, (len(rows), vocab)))
    for max_top_k in (2, 16):
        tokens = np.asarray(sample_jit(batch, tensors_for(rows, vocab), max_top_k)[0])
        assert np.isin(tokens, [3, 9]).all(), (max_top_k, tokens)


# ---------------------------------------------------------------- greedy and row independence


def mixed_rows(rng, num_rows, vocab):
    """Rows with a random mix of every feature (a quarter greedy)."""
    rows = []
    for r in range(num_rows):
        kind = r % 8
        greedy = kind in (0, 5)
        params = SamplingParams(
            temperature=0.0 if greedy else float(rng.uniform(0.3, 1.5)),
            top_k=[0, 5, 40, 300, 0, 0, 3, 0][kind],
            top_p=[1.0, 0.9, 1.0, 0.95, 0.5, 1.0, 0.8, 0.99][kind],
            min_p=[0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.001][kind],
            repetition_penalty=float(rng.choice([1.0, 1.3])),
            frequency_penalty=float(rng.choice([0.0, 0.5])),
            presence_penalty=float(rng.choice([0.0, -0.4])),
            logit_bias={int(rng.integers(vocab)): 3.0} if kind == 4 else None,
            min_tokens=2 if kind == 7 else 0,
        )
        rows.append(
            SamplingRow(
                params=params,
                seed=int(rng.integers(2**32)),
                position=int(rng.integers(100)),
                prompt_token_ids=rng.integers(0, vocab, 10),
                output_token_ids=rng.integers(0, vocab, int(rng.integers(0, 5))),
                eos_token_ids=[0],
            )
        )
    return rows


def test_greedy_rows_take_the_argmax_of_processed_logits():
    rng = np.random.default_rng(1)
    vocab = 300
    rows = mixed_rows(rng, 32, vocab)
    logits = rng.normal(0, 2, (32, vocab)).astype(np.float32)
    t = tensors_for(rows, vocab)
    tokens = np.asarray(sample_jit(jnp.asarray(logits), t, 16)[0])
    processed = np.asarray(process_logits(jnp.asarray(logits), t))
    greedy = np.array([row.params.is_greedy for row in rows])
    np.testing.assert_array_equal(tokens[greedy], processed[greedy].argmax(-1))
    # An all-greedy batch (the draw-free branches) gives the same greedy tokens.
    all_greedy = [r if r.params.is_greedy else None for r in rows]
    tokens_greedy = np.asarray(
        sample_jit(jnp.asarray(logits), tensors_for(all_greedy, vocab), 16)[0]
    )
    np.testing.assert_array_equal(tokens_greedy[greedy], tokens[greedy])
    # Padding rows (and a plain greedy batch) are the argmax of the raw logits.
    np.testing.assert_array_equal(tokens_greedy[~greedy], logits[~greedy].argmax(-1))


def test_argmax_matches_jnp_argmax_with_ties_and_inf():
    x = np.array([[1.0, 3.0, 3.0, 0.0], [-np.inf] * 4, [np.inf, 0, np.inf, 1]], np.float32)
    np.testing.assert_array_equal(argmax(jnp.asarray(x)), np.argmax(x, -1))


def test_a_row_is_the_same_alone_in_a_batch_and_for_any_max_top_k():
    rng = np.random.default_rng(2)
    vocab = 1000
    rows = mixed_rows(rng, 32, vocab)
    logits = rng.normal(0, 2.5, (32, vocab)).astype(np.float32)
    t = tensors_for(rows, vocab)
    batch = np.asarray(sample_jit(jnp.asarray(logits), t, 16)[0])
    for r in range(0, 32, 3):
        alone = sample_jit(jnp.asarray(logits[r : r + 1]), tensors_for([rows[r]], vocab), 16)[0]
        assert int(alone[0]) == batch[r], r
    # Other slots, other neighbours (half of them replaced by padding): the same tokens.
    shuffled = np.random.default_rng(0).permutation(32)
    mixed = [rows[i] if n % 2 else None for n, i in enumerate(shuffled)]
    again = np.asarray(sample_jit(jnp.asarray(logits[shuffled]), tensors_for(mixed, vocab), 16)[0])
    np.testing.assert_array_equal(again[1::2], batch[shuffled[1::2]])
    # The candidate path (large K) and the full-vocabulary path (small K) agree token for token.
    for max_top_k in (4, 1000):
        other = np.asarray(sample_jit(jnp.asarray(logits), t, max_top_k)[0])
        np.testing.assert_array_equal(other, batch, err_msg=f"max_top_k={max_top_k}")


def test_key_is_seed_and_position():
    params = SamplingParams(temperature=1.0)
    positions = [0, 0, *range(1, SMALL_DRAWS - 1)]
    rows = [SamplingRow(params=params, seed=5, position=p) for p in positions]
    batch = jnp.zeros((SMALL_DRAWS, 16))
    tokens = np.asarray(sample_jit(batch, tensors_for(rows, 16), 8)[0])
    assert tokens[0] == tokens[1]  # same seed and position: same token
    assert np.bincount(tokens, minlength=16).min() > 60  # other positions: independent draws
    rows[1] = dataclasses.replace(rows[1], seed=6)
    other_seed = np.asarray(sample_jit(batch, tensors_for(rows, 16), 8)[0])
    np.testing.assert_array_equal(np.delete(other_seed, 1), np.delete(tokens, 1))


def test_new_parameter_mix_does_not_recompile():
    rng = np.random.default_rng(3)
    run = jax.jit(lambda logits, t: sample(logits, t, 16))
    logits = jnp.asarray(rng.normal(size=(8, 100)).astype(np.float32))
    for seed in range(3):
        run(logits, tensors_for(mixed_rows(np.random.default_rng(seed), 8, 100), 100))
    run(logits, SamplingTensors.neutral(8, 100))
    assert run._cache_size() == 1


# ---------------------------------------------------------------- building blocks


def test_token_noise_is_addressable_by_token_id():
    keys = row_keys(jnp.array([1, 2, 3], jnp.uint32), jnp.array([0, 5, 9]))
    full = vocab_gumbel(keys, 101)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 101, (3, 17)))
    np.testing.assert_array_equal(token_gumbel(keys, ids), jnp.take_along_axis(full, ids, axis=1))
    expected_key = jax.random.key_data(jax.random.fold_in(jax.random.key(2), 5))
    np.testing.assert_array_equal(keys[1], expected_key)


def test_order_key_preserves_order():
    x = np.array([-np.inf, -1e30, -2.5, -1e-30, 0.0, 1e-30, 1.0, 3e38, np.inf], np.float32)
    keys = np.asarray(sampling._order_key(jnp.asarray(x)))
    assert np.all(np.diff(keys.astype(np.int64)) > 0)


def test_bisection_thresholds_match_sorting():
    rng = np.random.default_rng(4)
    x = np.round(rng.normal(size=(6, 40)), 1).astype(np.float32)  # many ties
    x[0, :30] = -np.inf
    k = np.array([1, 5, 17, 40, 2, 39])
    expected = np.sort(x, axis=-1)[:, ::-1][np.arange(6), k - 1]
    np.testing.assert_array_equal(kth_largest(jnp.asarray(x), jnp.asarray(k)), expected)

    weights = np.where(np.isinf(x), 0, np.exp(x)).astype(np.float32)
    top_p = np.array([0.5, 0.9, 0.1, 0.99, 0.7, 0.3], np.float32)
    limit = top_p * weights.sum(-1)
    threshold = np.asarray(top_p_threshold(jnp.asarray(weights), jnp.asarray(limit)))
    kept = weights >= threshold[:, None]
    for r in range(6):
        above = np.array([weights[r][weights[r] > w].sum() for w in weights[r]])
        np.testing.assert_array_equal(kept[r], above < limit[r], err_msg=str(r))
        assert 0 < kept[r].sum() < 40


def test_top_logprobs_ranks_like_vllm():
    logits = jnp.array([[2.0, 1.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0, 3.0]])
    raw = jax.nn.log_softmax(logits)
    logprob, rank, ids, values = top_logprobs(raw, jnp.array([2, 0]), 2)
    np.testing.assert_allclose(logprob, [raw[0, 2], raw[1, 0]])
    # vLLM's rank counts tokens with logprob >= the token's: ties share the last rank of the group.
    np.testing.assert_array_equal(rank, [3, 5])
    np.testing.assert_array_equal(top_logprobs(raw, jnp.array([0, 4]), 0)[1], [1, 1])
    np.testing.assert_array_equal(ids[:, 0], [0, 4])
    np.testing.assert_allclose(values, np.sort(np.asarray(raw), -1)[:, ::-1][:, :2])


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_top_logprobs_of_logits_equals_top_logprobs_of_the_log_softmax(batch_invariant):
    """Prompt logprobs skip writing the [S, V] log-softmax: the same logprobs and ranks, bitwise,
    in both modes; rows with ties, -inf entries (a masked vocabulary) and a huge shift included."""
    rng = np.random.default_rng(11)
    logits = rng.normal(scale=4.0, size=(37, 1000)).astype(np.float32)  # 37: not a tile multiple
    logits[1, ::3] = -np.inf
    logits[2, :] = 1.5  # every token tied
    logits[3] += 1e4
    logits[4, 10:20] = logits[4].max() + 1.0  # a tie at the top
    tokens = rng.integers(0, 1000, size=37).astype(np.int32)
    tokens[1] = 3  # an -inf entry: logprob -inf, last rank
    tokens[4] = 12

    def both(x, t):
        ours = top_logprobs_of_logits(x, t, 5)
        return ours, top_logprobs(invariant.log_softmax(x), t, 5)

    with invariant.batch_invariant_ops(batch_invariant):
        ours, reference = jax.jit(both)(jnp.asarray(logits), jnp.asarray(tokens))
    names = ("token_logprob", "rank", "top_ids", "top_logprobs")
    for name, got, want in zip(names, ours, reference, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    assert np.isneginf(ours[0][1]) and ours[1][1] == 1000
    assert ours[1][2] == 1000 and ours[1][4] == 10  # ties share the last rank of their group


def test_raw_logprobs_are_the_unprocessed_log_softmax():
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(2, 30)).astype(np.float32))
    rows = [SamplingRow(params=SamplingParams(logit_bias={1: 50.0}, temperature=0.3), seed=0)] * 2
    _, raw = sample_jit(logits, tensors_for(rows, 30), 8)
    np.testing.assert_allclose(raw, jax.nn.log_softmax(logits), rtol=1e-6)


# ---------------------------------------------------------------- host builder and device update


def test_builder_and_advance():
    params = SamplingParams(temperature=0.5, top_k=4, stop_token_ids=[7])
    row = SamplingRow(params=params, seed=9, prompt_token_ids=[1, 2], output_token_ids=[3, 3, 5])
    t = build_sampling_tensors([None, row], 10)
    neutral = SamplingTensors.neutral(1, 10)
    for field in dataclasses.fields(SamplingTensors):
        np.testing.assert_array_equal(getattr(t, field.name)[0], getattr(neutral, field.name)[0])
    assert t.positions[1] == 3 and t.num_output_tokens[1] == 3 and t.seeds[1] == 9
    assert t.output_counts[1, 3] == 2 and t.output_counts[1, 5] == 1
    assert t.prompt_mask[1, [1, 2]].all() and t.stop_mask[1, 7]
    stepped = advance(jax.device_put(t), jnp.array([4, 5]), jnp.array([False, True]))
    assert int(stepped.output_counts[1, 5]) == 2 and int(stepped.output_counts[0].sum()) == 0
    np.testing.assert_array_equal(stepped.positions, [0, 4])
    np.testing.assert_array_equal(stepped.num_output_tokens, [0, 4])


def test_row_seed():
    assert row_seed(123) == 123
    seeds = {row_seed(123, i) for i in range(100)} | {row_seed(2**40 + 123)}
    assert len(seeds) == 101 and all(0 <= s < 2**32 for s in seeds)
    assert row_seed(123, 1) == row_seed(123, 1)
    with pytest.raises(ValueError):
        row_seed(-1)


def test_distinct_seeds_give_distinct_key_seeds():
    """SamplingParams takes seeds in [0, 2**64); 2**64 and 2**65 once collided (the mix works
    mod 2**64) and are now rejected. Seeds that differ only in their high bits still differ."""
    seeds = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**33, 2**40 + 123, 2**63, 2**63 + 1, 2**64 - 1]
    seeds += [k << 32 for k in range(3, 200)]  # equal low 32 bits
    key_seeds = [row_seed(seed) for seed in seeds]
    assert len(set(key_seeds)) == len(seeds) and all(0 <= s < 2**32 for s in key_seeds)
    assert [row_seed(seed) for seed in range(1000)] == list(range(1000))  # < 2**32: unchanged
    for seed in (2**64, 2**65):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
            row_seed(seed)
        with pytest.raises(ValueError, match=r"SamplingParams.seed must be"):
            SamplingParams(seed=seed)
