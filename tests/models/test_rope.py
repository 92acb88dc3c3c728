"""Rotary embedding: `rope_tables` + `rotate` against the formula written out, and the CPU
program shape that keeps cos / sin out of the per-element loops (models/layers.py says why)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models.layers import rope_tables, rotate


def _inputs(tokens=37, heads=5, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((tokens, heads, dim)), jnp.float32)
    positions = jnp.asarray(rng.integers(0, 4000, tokens), jnp.int32)
    inv_freq = jnp.asarray(1.0 / 10000.0 ** (np.arange(0, dim, 2) / dim), jnp.float32)
    return x, positions, inv_freq


def test_rotation_matches_the_rotate_half_formula_and_float64():
    x, positions, inv_freq = _inputs()
    got = np.asarray(jax.jit(lambda x, p, f: rotate(x, *rope_tables(p, f)))(x, positions, inv_freq))
    angles = np.asarray(positions, np.float64)[:, None] * np.asarray(inv_freq, np.float64)[None]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    first, second = np.split(np.asarray(x, np.float64), 2, axis=-1)
    want = np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    # float32 angles of positions up to 4000 carry ~2.4e-4 absolute error; |x| < ~5.
    np.testing.assert_allclose(got, want, atol=5e-3, rtol=0)
    assert np.abs(got - want).max() > 0  # float32 all the same: the check above is not vacuous

    def plain(x, positions, inv_freq):  # the formula with no conditional around cos / sin
        angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
        return rotate(x, jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :])

    np.testing.assert_array_equal(got, np.asarray(jax.jit(plain)(x, positions, inv_freq)))


@pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="only XLA:CPU computes cos / sin inside the conditional (models/layers.py); the "
    "rotation itself is checked on every backend by the test above",
)
def test_cos_and_sin_are_computed_apart_from_the_rotation_on_cpu():
    x, positions, inv_freq = _inputs()

    def q_and_k(x, positions, inv_freq):
        cos, sin = rope_tables(positions, inv_freq)
        return rotate(x, cos, sin), rotate(x[:, :2], cos, sin)

    text = jax.jit(q_and_k).lower(x, positions, inv_freq).compile().as_text()
    assert "conditional(" in text
    # Every cosine sits in a branch computation, none in a fusion with the rotation's concatenate.
    for computation in re.split(r"\n(?=\S)", text):
        if "cosine(" in computation:
            assert "concatenate(" not in computation, computation[:400]
