"""The Pallas paged-attention kernel against the jnp reference: compiled for the GPU where JAX's
default device is one (`benchmarks/gpu_check.sh` runs this file there), in interpret mode elsewhere.

Batches come from `make_batch`: every cache slot that is not a real earlier position of its
sequence is NaN, so a read outside a sequence's own blocks (or of a page another split owns)
shows up. Tolerances per input dtype: float32 1e-5 (both accumulate in float32; only the
summation order differs); float16 5e-3 and bfloat16 3e-2 absolute, because the kernel feeds the
probabilities to the value matmul in the input dtype (as flash attention does on tensor cores)
while the reference keeps them in float32: a relative error of one rounding, 2^-11 or 2^-8, on
outputs of size ~1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import paged_attention as kernel
from pallas_kernels import reference
from tests.kernels.test_reference import Batch, assert_padding_zero, make_batch, numpy_attention

TOLERANCE = {jnp.float32: 1e-5, jnp.float16: 5e-3, jnp.bfloat16: 3e-2}

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# The real kernel on a GPU; the same kernel body, interpreted, on CPU. (On a GPU, tests/kernels/
# conftest.py makes float32 dots full float32, so the float32 tolerance means the same there.)
INTERPRET = jax.default_backend() != "gpu"


@functools.cache
def _kernel(**static):
    return jax.jit(functools.partial(kernel.paged_attention, interpret=INTERPRET, **static))


@functools.cache
def _reference(**static):
    return jax.jit(functools.partial(reference.paged_attention, **static))


def compare(b: Batch, dtype=jnp.float32, **static) -> np.ndarray:
    """Kernel vs reference on the same inputs; -> the kernel's output as float64."""
    tiling = {k: static.pop(k) for k in list(static) if k in TILING_KNOBS}
    args = b.args(dtype)
    got = _kernel(scale=b.scale, **static, **tiling)(*args)
    want = _reference(scale=b.scale, **static)(*args)
    assert got.dtype == dtype and got.shape == b.q.shape
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "NaN/inf leaked into the kernel's output"
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    assert_padding_zero(b, got)
    return got


TILING_KNOBS = ("tokens_per_tile", "pages_per_step", "new_keys_per_step", "num_splits")

# (kv heads, query heads per kv head, head dim): every GQA ratio 1..8 and head dims 64/128/256.
HEAD_CONFIGS = [
    (2, 1, 64),
    (1, 2, 128),
    (2, 3, 64),
    (1, 4, 64),
    (1, 5, 64),
    (1, 8, 64),
    (1, 4, 256),
]


@st.composite
def kernel_cases(draw):
    """A ragged batch (decode-shaped or mixed) plus dtype, masks and tiling knobs."""
    decode = draw(st.booleans())
    n_real = draw(st.integers(1, 16))
    n_pad = draw(st.integers(0, 2))
    long_context = st.integers(0, 2047)
    seqs = []
    for _ in range(n_real):
        q_len = 1 if decode else draw(st.sampled_from([1, 2, 7, 16, 33]))
        prior = draw(st.one_of(st.just(0), st.integers(0, 40), long_context))
        seqs.append((min(prior, 2048 - q_len), q_len))
    kv_heads, group, head_dim = draw(st.sampled_from(HEAD_CONFIGS))
    batch = make_batch(
        np.random.default_rng(draw(st.integers(0, 2**32 - 1))),
        seqs,
        padded_seqs=n_pad,
        pad_tokens=n_pad if decode else draw(st.integers(0, 9)),
        token_multiple=1 if decode else 16,
        block_size=draw(st.sampled_from([16, 32, 64])),
        kv_heads=kv_heads,
        group=group,
        head_dim=head_dim,
        spare_blocks=draw(st.integers(0, 3)),
        pad_value=draw(st.sampled_from([1.0, np.nan])),
    )
    static = {
        "decode_only": decode,
        "sliding_window": draw(st.sampled_from([None, None, 1, 5, 100])),
        "soft_cap": draw(st.sampled_from([None, None, 2.0, 30.0])),
        "num_splits": draw(st.sampled_from([None, 1, 2, 3])),
        "pages_per_step": draw(st.sampled_from([None, 1, 2])),
        "tokens_per_tile": None if decode else draw(st.sampled_from([None, 1, 4])),
    }
    dtype = draw(st.sampled_from([jnp.float32, jnp.float32, jnp.bfloat16, jnp.float16]))
    return batch, dtype, {k: v for k, v in static.items() if v is not None}


@SETTINGS
@given(kernel_cases())
def test_kernel_matches_reference(case):
    b, dtype, static = case
    compare(b, dtype, **static)


def test_kernel_matches_float64_numpy():
    """One mixed batch against the independent float64 numpy attention as well."""
    rng = np.random.default_rng(0)
    b = make_batch(
        rng,
        [(37, 1), (0, 23), (12, 9), (300, 1), (1000, 40)],
        padded_seqs=1,
        pad_tokens=5,
        block_size=16,
        kv_heads=2,
        group=4,
        head_dim=64,
        pad_value=np.nan,
    )
    for window, cap in [(None, None), (50, 20.0)]:
        got = compare(b, sliding_window=window, soft_cap=cap, num_splits=2)
        np.testing.assert_allclose(
            got, numpy_attention(b, sliding_window=window, soft_cap=cap), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_splits_agree(num_splits):
    """Split-K over a long context gives the single-split answer (to float32 rounding)."""
    rng = np.random.default_rng(1)
    b = make_batch(
        rng,
        [(2000, 1), (5, 1), (0, 1), (700, 1)],
        padded_seqs=2,
        pad_tokens=2,
        block_size=32,
        kv_heads=2,
        group=2,
        head_dim=64,
    )
    compare(b, decode_only=True, num_splits=num_splits)


def test_all_padding_batch_is_zero():
    rng = np.random.default_rng(5)
    b = make_batch(
        rng, [], padded_seqs=3, pad_tokens=3, block_size=16, kv_heads=2, group=2, head_dim=64
    )
    for decode_only in (False, True):
        assert np.all(compare(b, decode_only=decode_only) == 0.0)


def test_default_tiling_is_legal_for_triton():
    """Every tile the engine can pick has power-of-two blocks with at least 16 rows and keys."""
    for group in range(1, 9):
        for block_size in (8, 16, 32, 64, 128):
            for decode_only in (False, True):
                t = kernel.default_tiling(
                    group=group,
                    block_size=block_size,
                    decode_only=decode_only,
                    table_positions=4096,
                )
                rows = t["tokens_per_tile"] * (1 << (group - 1).bit_length())
                keys = t["pages_per_step"] * block_size
                for n in (rows, keys, t["new_keys_per_step"]):
                    assert n >= kernel.MIN_DOT_DIM and n & (n - 1) == 0


def test_supported_head_dims():
    assert [d for d in range(1, 513) if kernel.supported_head_dim(d)] == [16, 32, 64, 128, 256]
