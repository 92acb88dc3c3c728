"""The batch-invariant attention (`pallas_kernels/batch_invariant.py`).

Two claims: it computes the reference's attention (float32 tolerance 1e-5, the bound the kernel
tests use: both accumulate in float32 and differ only in summation order), and a token's output is
bitwise the same whatever step it is computed in: alone or among other sequences at another row,
in a bigger padded step, in one prefill or cut into chunks whose earlier K/V come from the cache,
as a decode row or as a prefill row. The reference fails the second claim (checked, so that the
test is known to be able to fail).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import batch_invariant, reference
from tests.kernels.test_reference import assert_padding_zero, make_batch, numpy_attention

KV_HEADS, GROUP, HEAD_DIM, BLOCK = 2, 2, 16, 16


@functools.cache
def _jitted(module, **static):
    return jax.jit(functools.partial(module.paged_attention, **static))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    decode=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    window=st.sampled_from([None, 5, 40]),
    cap=st.sampled_from([None, 20.0]),
)
def test_matches_the_reference(decode, seed, window, cap):
    rng = np.random.default_rng(seed)
    q_lens = [1] * 5 if decode else [int(x) for x in rng.choice([1, 3, 16, 17, 40], 4)]
    seqs = [(int(rng.integers(0, 300)), q) for q in q_lens]
    b = make_batch(
        rng,
        seqs,
        padded_seqs=1,
        pad_tokens=1 if decode else 7,
        block_size=BLOCK,
        kv_heads=KV_HEADS,
        group=GROUP,
        head_dim=HEAD_DIM,
        pad_value=np.nan,
    )
    static = {"decode_only": decode, "sliding_window": window, "soft_cap": cap, "scale": b.scale}
    got = np.asarray(_jitted(batch_invariant, **static)(*b.args()), np.float64)
    want = np.asarray(_jitted(reference, **static)(*b.args()), np.float64)
    assert np.all(np.isfinite(got)), "NaN from padding or foreign cache slots leaked in"
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert_padding_zero(b, got)
    exact = numpy_attention(b, sliding_window=window, soft_cap=cap)
    np.testing.assert_allclose(got, exact, atol=1e-5, rtol=1e-5)


class _Sequence:
    """One sequence's whole history: queries and K/V of every position."""

    def __init__(self, rng: np.random.Generator, length: int) -> None:
        self.q = rng.standard_normal((length, KV_HEADS * GROUP, HEAD_DIM)).astype(np.float32)
        self.k = rng.standard_normal((length, KV_HEADS, HEAD_DIM)).astype(np.float32)
        self.v = rng.standard_normal((length, KV_HEADS, HEAD_DIM)).astype(np.float32)


def _step(parts, *, pad_tokens: int, pad_seqs: int, width: int, rng) -> tuple:
    """A step's arguments for `parts` = [(sequence, first new position, new token count)]: the
    cache holds each sequence's positions before its new ones, in randomly placed blocks."""
    num_blocks = 96  # one cache shape for every step here: one compile per step shape
    assert 1 + sum(math.ceil((first + n) / BLOCK) for _, first, n in parts) <= num_blocks
    pool = list(rng.permutation(np.arange(1, num_blocks)))
    shape = (KV_HEADS, num_blocks, BLOCK, HEAD_DIM)
    k_cache, v_cache = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    tables = np.zeros((len(parts) + pad_seqs, width), np.int32)
    q, k_new, v_new, lens, starts = [], [], [], [], [0]
    for s, (seq, first, count) in enumerate(parts):
        for b in range(math.ceil((first + count) / BLOCK)):
            tables[s, b] = pool.pop()
        for p in range(first):
            k_cache[:, tables[s, p // BLOCK], p % BLOCK] = seq.k[p]
            v_cache[:, tables[s, p // BLOCK], p % BLOCK] = seq.v[p]
        new = slice(first, first + count)
        q.append(seq.q[new]), k_new.append(seq.k[new]), v_new.append(seq.v[new])
        lens.append(first + count)
        starts.append(starts[-1] + count)
    starts += [starts[-1]] * pad_seqs
    lens += [0] * pad_seqs

    def padded(rows: list[np.ndarray]) -> np.ndarray:
        real = np.concatenate(rows)
        return np.concatenate([real, np.full((pad_tokens, *real.shape[1:]), np.nan, np.float32)])

    arrays = (padded(q), padded(k_new), padded(v_new), k_cache, v_cache)
    ints = (tables, np.array(lens, np.int32), np.array(starts, np.int32))
    return tuple(jnp.asarray(a) for a in arrays + ints)


def _rows(out: jax.Array, start: int, count: int) -> np.ndarray:
    return np.asarray(out)[start : start + count]


def _outputs_of_one_sequence(module, window) -> list[np.ndarray]:
    """Positions 100..179 of one sequence computed five ways (the decode rows and one-token
    prefill rows at every 4th and 7th position) -> each way's output rows."""
    rng = np.random.default_rng(7)
    target = _Sequence(rng, 180)
    others = [_Sequence(rng, 300) for _ in range(3)]
    scale = HEAD_DIM**-0.5
    prefill = _jitted(module, scale=scale, sliding_window=window, decode_only=False)
    decode = _jitted(module, scale=scale, sliding_window=window, decode_only=True)
    ways = []
    # 1. Alone, one prefill of 80 tokens.
    ways.append(
        _rows(
            prefill(*_step([(target, 100, 80)], pad_tokens=0, pad_seqs=0, width=12, rng=rng)), 0, 80
        )
    )
    # 2. Third of four sequences, a wider table, padded tokens and sequences.
    parts = [(others[0], 37, 5), (others[1], 0, 29), (target, 100, 80), (others[2], 250, 1)]
    out = prefill(*_step(parts, pad_tokens=14, pad_seqs=2, width=20, rng=rng))
    ways.append(_rows(out, 34, 80))
    # 3. Chunked: 100..130 then 131..179 (the second chunk reads the first from the cache).
    first = _rows(
        prefill(*_step([(target, 100, 31)], pad_tokens=1, pad_seqs=0, width=12, rng=rng)), 0, 31
    )
    parts = [(others[0], 10, 3), (target, 131, 49)]
    second = _rows(prefill(*_step(parts, pad_tokens=0, pad_seqs=1, width=12, rng=rng)), 3, 49)
    ways.append(np.concatenate([first, second]))
    # 4. Token by token as decode rows, at row 1 of 3 (every 4th position: the shapes are the same).
    rows = []
    for p in range(100, 180, 4):
        parts = [(others[1], 200, 1), (target, p, 1), (others[2], 17, 1)]
        rows.append(_rows(decode(*_step(parts, pad_tokens=1, pad_seqs=1, width=20, rng=rng)), 1, 1))
    ways.append(np.concatenate(rows))
    # 5. Token by token as one-token prefill rows beside a long prefill.
    rows = []
    for p in range(100, 180, 7):
        parts = [(others[0], 0, 40), (target, p, 1)]
        rows.append(
            _rows(prefill(*_step(parts, pad_tokens=3, pad_seqs=0, width=20, rng=rng)), 40, 1)
        )
    ways.append(np.concatenate(rows))
    return ways


def test_a_tokens_output_is_bitwise_the_same_in_every_step():
    for window in (None, 24):
        ways = _outputs_of_one_sequence(batch_invariant, window)
        alone = ways[0]
        for name, got in zip(["in a batch", "chunked", "decode rows"], ways[1:4], strict=True):
            want = alone[::4] if name == "decode rows" else alone
            assert np.array_equal(got, want), f"{name} (window {window}) differs from alone"
        assert np.array_equal(ways[4], alone[::7]), "one-token prefill rows differ from alone"


def test_the_reference_is_not_invariant_so_the_check_can_fail():
    ways = _outputs_of_one_sequence(reference, None)
    alone = ways[0]
    assert any(
        not np.array_equal(got, want)
        for got, want in zip(ways[1:4], [alone, alone, alone[::4]], strict=True)
    )
    for got, want in zip(ways[1:4], [alone, alone, alone[::4]], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)  # the same attention
