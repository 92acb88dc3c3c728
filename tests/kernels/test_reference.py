"""The jnp reference paged attention against an independent float64 numpy implementation.

Every cache slot that does not hold a real earlier position of its sequence is NaN (block 0, spare
blocks, the unused tail of a sequence's last block, and the slots of the new tokens' own positions),
so any read outside a sequence's own context shows up in the output.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.reference import paged_attention, write_kv

SETTINGS = settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# (kv heads, query heads per kv head, head dim): every GQA ratio and head dim, few compiled shapes.
HEAD_CONFIGS = [(2, 1, 16), (1, 2, 64), (2, 4, 8), (1, 4, 16), (2, 2, 64)]


def to_kernel(cache: np.ndarray) -> np.ndarray:
    """[N, P, K, D] -> the kernels' kv-head-major [K, N, P, D]."""
    return np.ascontiguousarray(np.asarray(cache).transpose(2, 0, 1, 3))


def from_kernel(cache) -> np.ndarray:
    return np.asarray(cache).transpose(1, 2, 0, 3)


@dataclass
class Batch:
    q: np.ndarray  # [T, H, D]
    k_new: np.ndarray  # [T, K, D]
    v_new: np.ndarray  # [T, K, D]
    k_cache: np.ndarray  # [N, P, K, D] here (easy to index); the kernels take [K, N, P, D]
    v_cache: np.ndarray  # [N, P, K, D]
    block_tables: np.ndarray  # [S, B] int32
    context_lens: np.ndarray  # [S] int32
    query_start_loc: np.ndarray  # [S + 1] int32
    scale: float

    def args(self, dtype=jnp.float32):
        floats = (self.q, self.k_new, self.v_new, to_kernel(self.k_cache), to_kernel(self.v_cache))
        ints = (self.block_tables, self.context_lens, self.query_start_loc)
        return tuple(jnp.asarray(a, dtype) for a in floats) + tuple(jnp.asarray(a) for a in ints)


def make_batch(
    rng: np.random.Generator,
    seqs: list[tuple[int, int]],  # (prior context, q_len) of each real sequence
    *,
    padded_seqs: int,
    pad_tokens: int,
    block_size: int,
    kv_heads: int,
    group: int,
    head_dim: int,
    spare_blocks: int = 2,
    extra_table_cols: int = 1,
    token_multiple: int = 1,
    pad_value: float = 1.0,
) -> Batch:
    """A ragged batch; the cache is NaN everywhere except the real earlier positions.

    Padding tokens get random inputs times `pad_value` (NaN to poison them); more padding tokens are
    added to make T a multiple of `token_multiple`. The table width and block count are rounded up
    too, so that hypothesis examples share compiled shapes.
    """
    heads = kv_heads * group
    num_seqs = len(seqs) + padded_seqs
    ctxs = [prior + q_len for prior, q_len in seqs]
    blocks_needed = [math.ceil(c / block_size) for c in ctxs]
    width = 1 << (max([1, *blocks_needed]) + extra_table_cols - 1).bit_length()
    num_blocks = 1 << (sum(blocks_needed) + spare_blocks).bit_length()
    pool = rng.permutation(np.arange(1, num_blocks))  # block 0 is the padding sink

    block_tables = np.zeros((num_seqs, width), np.int32)
    k_cache = np.full((num_blocks, block_size, kv_heads, head_dim), np.nan, np.float32)
    v_cache = np.full_like(k_cache, np.nan)
    used = 0
    for s, ((prior, _), nb) in enumerate(zip(seqs, blocks_needed, strict=True)):
        block_tables[s, :nb] = pool[used : used + nb]
        used += nb
        for p in range(prior):
            blk, off = block_tables[s, p // block_size], p % block_size
            k_cache[blk, off] = rng.standard_normal((kv_heads, head_dim))
            v_cache[blk, off] = rng.standard_normal((kv_heads, head_dim))

    q_lens = [q_len for _, q_len in seqs] + [0] * padded_seqs
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    context_lens = np.array(ctxs + [0] * padded_seqs, np.int32)
    real = int(qsl[-1])
    tokens = -(-(real + pad_tokens) // token_multiple) * token_multiple
    q = rng.standard_normal((tokens, heads, head_dim)).astype(np.float32)
    k_new = rng.standard_normal((tokens, kv_heads, head_dim)).astype(np.float32)
    v_new = rng.standard_normal((tokens, kv_heads, head_dim)).astype(np.float32)
    for a in (q, k_new, v_new):
        a[real:] *= pad_value
    return Batch(
        q, k_new, v_new, k_cache, v_cache, block_tables, context_lens, qsl, 1 / math.sqrt(head_dim)
    )


def numpy_attention(
    b: Batch, *, sliding_window: int | None = None, soft_cap: float | None = None, cast=None
) -> np.ndarray:
    """Obvious per-sequence, per-token, per-head attention in float64."""
    f = (lambda a: np.asarray(a, np.float64)) if cast is None else cast
    q, k_new, v_new, k_cache, v_cache = (
        f(a) for a in (b.q, b.k_new, b.v_new, b.k_cache, b.v_cache)
    )
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    heads = q.shape[1]
    group = heads // kv_heads
    out = np.zeros(q.shape, np.float64)
    for s in range(len(b.context_lens)):
        start, end = int(b.query_start_loc[s]), int(b.query_start_loc[s + 1])
        ctx, q_len = int(b.context_lens[s]), end - start
        prior = ctx - q_len
        keys = np.empty((ctx, kv_heads, q.shape[2]))
        vals = np.empty_like(keys)
        for p in range(ctx):
            if p < prior:
                blk, off = b.block_tables[s, p // block_size], p % block_size
                keys[p], vals[p] = k_cache[blk, off], v_cache[blk, off]
            else:
                keys[p], vals[p] = k_new[start + p - prior], v_new[start + p - prior]
        for i in range(q_len):
            t, pos = start + i, prior + i
            for h in range(heads):
                kh = h // group
                scores = keys[:, kh] @ q[t, h] * b.scale
                if soft_cap is not None:
                    scores = soft_cap * np.tanh(scores / soft_cap)
                k_pos = np.arange(ctx)
                visible = k_pos <= pos
                if sliding_window is not None:
                    visible &= k_pos > pos - sliding_window
                scores = np.where(visible, scores, -np.inf)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[t, h] = w @ vals[:, kh]
    return out


@functools.cache
def _jitted(**static):
    return jax.jit(functools.partial(paged_attention, **static))


def run(b: Batch, dtype=jnp.float32, *, eager: bool = False, **kwargs) -> np.ndarray:
    """The reference's output as float64; jitted by default (one compile per shape, not per op)."""
    fn = functools.partial(paged_attention, scale=b.scale, **kwargs)
    if not eager:
        fn = _jitted(scale=b.scale, **kwargs)
    return np.asarray(fn(*b.args(dtype)), np.float64)


@st.composite
def ragged_batches(draw, decode: bool = False):
    """A mixed prefill/decode ragged batch (or a decode-shaped one: T == S)."""
    n_real = draw(st.integers(1, 5))
    # Decode batches are always 6 sequences wide (T == S == 6), to share compiled shapes.
    n_pad = 6 - n_real if decode else draw(st.integers(0, 6 - n_real))
    seqs = []
    for _ in range(n_real):
        q_len = 1 if decode else draw(st.sampled_from([1, 1, 2, 5, 16, 40]))
        prior = draw(st.one_of(st.just(0), st.integers(0, 100)))
        seqs.append((prior, q_len))
    batch = make_batch(
        np.random.default_rng(draw(st.integers(0, 2**32 - 1))),
        seqs,
        padded_seqs=n_pad,
        pad_tokens=n_pad if decode else draw(st.integers(0, 7)),
        token_multiple=1 if decode else 16,
        block_size=draw(st.sampled_from([4, 8, 16])),
        **dict(zip(("kv_heads", "group", "head_dim"), draw(st.sampled_from(HEAD_CONFIGS)))),
        spare_blocks=draw(st.integers(0, 3)),
        extra_table_cols=draw(st.integers(0, 2)),
    )
    return batch


def assert_padding_zero(b: Batch, out: np.ndarray) -> None:
    real = int(b.query_start_loc[-1])
    assert np.all(out[real:] == 0.0), "padding tokens must output exactly 0"


def assert_close(actual, expected, atol=1e-5, rtol=1e-5):
    assert np.all(np.isfinite(actual)), "NaN/inf leaked into the output"
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


@SETTINGS
@given(ragged_batches())
def test_ragged_matches_numpy(b: Batch):
    out = run(b)
    assert_close(out, numpy_attention(b))
    assert_padding_zero(b, out)


@settings(SETTINGS, max_examples=6)
@given(ragged_batches(decode=True))
def test_decode_only_matches_general(b: Batch):
    assert b.q.shape[0] == len(b.context_lens)  # T == S
    general = run(b)
    decode = run(b, decode_only=True)
    assert_close(decode, general, atol=1e-6, rtol=1e-6)
    assert_close(decode, numpy_attention(b))
    assert_padding_zero(b, decode)


@settings(SETTINGS, max_examples=8)
@given(
    ragged_batches(),
    st.sampled_from([None, 1, 2, 3, 7, 16, 50]),
    st.sampled_from([None, 0.5, 1.5, 5.0]),
    st.booleans(),
)
def test_sliding_window_and_soft_cap(b: Batch, window, cap, scale_up):
    if scale_up:  # make the soft cap bite hard
        b.scale *= 4.0
    out = run(b, sliding_window=window, soft_cap=cap)
    assert_close(out, numpy_attention(b, sliding_window=window, soft_cap=cap))
    assert_padding_zero(b, out)


@pytest.mark.parametrize("window,cap", [(None, None), (4, None), (None, 2.0)])
def test_fresh_prefill_without_cached_context(window, cap):
    """All sequences start at position 0: the branch that never reads the (all-NaN) cache."""
    rng = np.random.default_rng(5)
    b = make_batch(
        rng,
        [(0, 7), (0, 1), (0, 19)],
        padded_seqs=1,
        pad_tokens=3,
        block_size=8,
        kv_heads=2,
        group=2,
        head_dim=16,
        pad_value=np.nan,
    )
    assert np.isnan(b.k_cache).all()
    out = run(b, sliding_window=window, soft_cap=cap)
    assert_close(out, numpy_attention(b, sliding_window=window, soft_cap=cap))
    assert_padding_zero(b, out)


@pytest.mark.parametrize("window,cap", [(None, None), (3, None), (None, 1.5), (5, 2.0)])
def test_decode_only_sliding_window_soft_cap(window, cap):
    rng = np.random.default_rng(7)
    b = make_batch(
        rng,
        [(0, 1), (9, 1), (30, 1), (16, 1)],
        padded_seqs=2,
        pad_tokens=2,
        block_size=8,
        kv_heads=2,
        group=2,
        head_dim=16,
    )
    general = run(b, sliding_window=window, soft_cap=cap)
    decode = run(b, decode_only=True, sliding_window=window, soft_cap=cap)
    expected = numpy_attention(b, sliding_window=window, soft_cap=cap)
    assert_close(general, expected)
    assert_close(decode, expected)
    assert_close(decode, general, atol=1e-6, rtol=1e-6)
    assert_padding_zero(b, decode)


def test_bfloat16():
    rng = np.random.default_rng(3)
    b = make_batch(
        rng,
        [(37, 1), (0, 23), (12, 9), (64, 1)],
        padded_seqs=1,
        pad_tokens=5,
        block_size=8,
        kv_heads=2,
        group=4,
        head_dim=64,
    )
    out = _jitted(scale=b.scale)(*b.args(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float64)

    def bf16(a):  # the reference sees exactly the bf16-rounded inputs
        return np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)

    assert_close(out, numpy_attention(b, cast=bf16), atol=2e-2, rtol=2e-2)
    assert_padding_zero(b, out)


@pytest.mark.parametrize("decode_only", [False, True])
def test_poisoned_padding_tokens_output_zero(decode_only):
    """Padding tokens with NaN q/k/v still give exactly 0 and do not disturb real tokens."""
    rng = np.random.default_rng(11)
    seqs = [(5, 1), (20, 1), (0, 1)] if decode_only else [(5, 7), (20, 1), (0, 3)]
    b = make_batch(
        rng,
        seqs,
        padded_seqs=3,
        pad_tokens=3 if decode_only else 6,
        block_size=4,
        kv_heads=1,
        group=4,
        head_dim=8,
        pad_value=np.nan,
    )
    out = run(b, decode_only=decode_only)
    real = int(b.query_start_loc[-1])
    assert out.shape[0] > real
    assert np.all(out[real:] == 0.0)
    assert_close(out[:real], numpy_attention(b)[:real])


def test_all_padding_batch_is_zero():
    rng = np.random.default_rng(5)
    b = make_batch(
        rng, [], padded_seqs=3, pad_tokens=3, block_size=4, kv_heads=2, group=2, head_dim=8
    )
    for decode_only in (False, True):
        out = run(b, decode_only=decode_only)
        assert np.all(out == 0.0)


def test_gqa_head_mapping():
    """Query head h reads kv head h // G: with kv heads holding distinct constant values, the
    output of each query head is exactly its kv head's value."""
    kv_heads, group, d, p = 2, 3, 8, 4
    rng = np.random.default_rng(0)
    b = make_batch(
        rng,
        [(6, 2)],
        padded_seqs=0,
        pad_tokens=0,
        block_size=p,
        kv_heads=kv_heads,
        group=group,
        head_dim=d,
    )
    for kh in range(kv_heads):
        b.v_new[:, kh] = kh + 1.0
        real = ~np.isnan(b.v_cache[:, :, kh])
        b.v_cache[:, :, kh][real] = kh + 1.0
    out = run(b)
    for h in range(kv_heads * group):
        np.testing.assert_allclose(out[:, h], h // group + 1.0, rtol=1e-6)


# --- write_kv -----------------------------------------------------------------------------------


def write_kv_npkd(k_cache, v_cache, k_new, v_new, slots):
    """`write_kv` on [N, P, K, D] caches (the layout these tests index), via the kernel layout."""
    k_out, v_out = write_kv(
        jnp.asarray(to_kernel(k_cache)),
        jnp.asarray(to_kernel(v_cache)),
        jnp.asarray(k_new),
        jnp.asarray(v_new),
        jnp.asarray(slots),
    )
    return from_kernel(k_out), from_kernel(v_out)


def _write_kv_case(rng, *, distinct_padding: bool, cache_dtype=np.float32):
    n, p, k, d = 6, 4, 2, 8
    real_tokens, pad_tokens = 9, 3
    k_cache = rng.standard_normal((n, p, k, d)).astype(cache_dtype)
    v_cache = rng.standard_normal((n, p, k, d)).astype(cache_dtype)
    k_new = rng.standard_normal((real_tokens + pad_tokens, k, d)).astype(np.float32)
    v_new = rng.standard_normal((real_tokens + pad_tokens, k, d)).astype(np.float32)
    real_slots = rng.choice(np.arange(p, n * p), real_tokens, replace=False)  # blocks >= 1
    if distinct_padding:
        pad_slots = rng.choice(p, pad_tokens, replace=False)
    else:
        pad_slots = np.zeros(pad_tokens, np.int64)
    slots = np.concatenate([real_slots, pad_slots]).astype(np.int32)
    return k_cache, v_cache, k_new, v_new, slots


def test_write_kv_distinct_slots():
    rng = np.random.default_rng(1)
    k_cache, v_cache, k_new, v_new, slots = _write_kv_case(rng, distinct_padding=True)
    k_out, v_out = write_kv_npkd(k_cache, v_cache, k_new, v_new, slots)
    assert k_out.shape == k_cache.shape and k_out.dtype == k_cache.dtype
    n, p = k_cache.shape[:2]
    for cache, new, got in ((k_cache, k_new, k_out), (v_cache, v_new, v_out)):
        expected = cache.copy().reshape(n * p, *cache.shape[2:])
        for t, slot in enumerate(slots):
            expected[slot] = new[t]
        np.testing.assert_array_equal(np.asarray(got), expected.reshape(cache.shape))
        # and the same thing by block/offset
        for t, slot in enumerate(slots):
            np.testing.assert_array_equal(np.asarray(got)[slot // p, slot % p], new[t])


def test_write_kv_padding_only_touches_block_0():
    rng = np.random.default_rng(2)
    k_cache, v_cache, k_new, v_new, slots = _write_kv_case(rng, distinct_padding=False)
    k_out, v_out = write_kv_npkd(k_cache, v_cache, k_new, v_new, slots)
    n, p = k_cache.shape[:2]
    real = slots >= p
    for cache, new, got in ((k_cache, k_new, k_out), (v_cache, v_new, v_out)):
        got = np.asarray(got)
        expected = cache.copy().reshape(n * p, *cache.shape[2:])
        for t in np.flatnonzero(real):
            expected[slots[t]] = new[t]
        expected = expected.reshape(cache.shape)
        np.testing.assert_array_equal(got[1:], expected[1:])  # blocks >= 1: exactly as expected
        np.testing.assert_array_equal(got[0, 1:], cache[0, 1:])  # untouched rest of block 0
        # slot 0 holds one of the padding tokens' values (duplicate-scatter winner unspecified)
        assert any(np.array_equal(got[0, 0], new[t]) for t in np.flatnonzero(~real))


def test_write_kv_casts_to_cache_dtype():
    rng = np.random.default_rng(4)
    k_cache, v_cache, k_new, v_new, slots = _write_kv_case(rng, distinct_padding=True)
    k_out, v_out = write_kv_npkd(
        jnp.asarray(k_cache, jnp.bfloat16), jnp.asarray(v_cache, jnp.bfloat16), k_new, v_new, slots
    )
    assert k_out.dtype == jnp.bfloat16 and v_out.dtype == jnp.bfloat16
    p = k_cache.shape[1]
    for new, got in ((k_new, k_out), (v_new, v_out)):
        for t, slot in enumerate(slots):
            np.testing.assert_array_equal(
                np.asarray(got[slot // p, slot % p], np.float32),
                np.asarray(jnp.asarray(new[t], jnp.bfloat16), np.float32),
            )


def test_write_kv_then_attend_from_cache():
    """Writing a prefill's K/V and then decoding one more token reads them back correctly."""
    rng = np.random.default_rng(9)
    b = make_batch(
        rng,
        [(3, 6), (0, 5)],
        padded_seqs=1,
        pad_tokens=2,
        block_size=4,
        kv_heads=2,
        group=2,
        head_dim=16,
    )
    p = b.k_cache.shape[1]
    slots = np.zeros(b.q.shape[0], np.int32)  # padding -> slot 0 of block 0
    for s in range(2):
        start, end = b.query_start_loc[s], b.query_start_loc[s + 1]
        prior = b.context_lens[s] - (end - start)
        for i, t in enumerate(range(start, end)):
            pos = prior + i
            slots[t] = b.block_tables[s, pos // p] * p + pos % p
    k_cache, v_cache = write_kv_npkd(b.k_cache, b.v_cache, b.k_new, b.v_new, slots)
    # Decode step: the next token of each real sequence; the cache now holds everything before it.
    ctx = b.context_lens.copy()
    ctx[:2] += 1
    q = rng.standard_normal((3, *b.q.shape[1:])).astype(np.float32)
    kn = rng.standard_normal((3, *b.k_new.shape[1:])).astype(np.float32)
    vn = rng.standard_normal((3, *b.v_new.shape[1:])).astype(np.float32)
    decode = Batch(
        q,
        kn,
        vn,
        np.asarray(k_cache),
        np.asarray(v_cache),
        b.block_tables,
        ctx,
        np.array([0, 1, 2, 2], np.int32),
        b.scale,
    )
    expected = numpy_attention(decode)
    for decode_only in (False, True):
        assert_close(run(decode, decode_only=decode_only), expected)


# --- jit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("decode_only,window,cap", [(False, None, None), (True, 4, 3.0)])
def test_jit_matches_eager(decode_only, window, cap):
    rng = np.random.default_rng(13)
    seqs = [(10, 1), (0, 1), (33, 1)] if decode_only else [(10, 12), (0, 1), (33, 4)]
    b = make_batch(
        rng,
        seqs,
        padded_seqs=2,
        pad_tokens=2 if decode_only else 4,
        block_size=8,
        kv_heads=2,
        group=2,
        head_dim=16,
    )
    kwargs = {
        "scale": b.scale,
        "decode_only": decode_only,
        "sliding_window": window,
        "soft_cap": cap,
    }
    args = b.args()
    eager = np.asarray(paged_attention(*args, **kwargs))
    jitted = np.asarray(jax.jit(functools.partial(paged_attention, **kwargs))(*args))
    np.testing.assert_allclose(jitted, eager, atol=1e-6, rtol=1e-6)
    assert_close(jitted, numpy_attention(b, sliding_window=window, soft_cap=cap))
    assert_padding_zero(b, jitted)
