"""`jaxinfer/models/invariant.py`: outside its switch, the plain jnp operations; inside, the same
values (float32 rounding apart) with each row's result independent of the array's shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models import invariant

# Across XLA:CPU's strategy changes (measured: GEMM 1 | 2-32 | 33+ rows for K = 576; a sum of
# 128 changes between 16 and 32 rows, one of 1,536 between 2 and 3).
ROWS = (1, 3, 33, 64)


def _row_in_arrays(fn, row: np.ndarray, rng) -> list[np.ndarray]:
    """`fn` applied inside the switch to arrays of several row counts, `row` at varying places."""
    results = []
    for count in ROWS:
        x = rng.standard_normal((count, row.shape[-1])).astype(np.float32)
        at = count // 2
        x[at] = row
        with invariant.batch_invariant_ops():
            results.append(np.asarray(jax.jit(fn)(jnp.asarray(x)))[at])
    return results


@pytest.mark.parametrize(
    "name, fn, plain",
    [
        ("row_sum", invariant.row_sum, lambda x: jnp.sum(x, axis=-1)),
        ("mean", invariant.mean, lambda x: jnp.mean(x, axis=-1, keepdims=True)),
        ("log_softmax", invariant.log_softmax, lambda x: jax.nn.log_softmax(x, axis=-1)),
        ("cumsum", invariant.cumsum, lambda x: jnp.cumsum(x, axis=-1)),
    ],
)
@pytest.mark.parametrize("width", [128, 1536])
def test_reductions_are_row_invariant_and_right(name, fn, plain, width, monkeypatch):
    rng = np.random.default_rng(width)
    row = (rng.standard_normal(width) * 3).astype(np.float32)
    results = _row_in_arrays(fn, row, rng)
    for got in results[1:]:
        assert np.array_equal(got, results[0]), f"{name} of one row depends on the array's shape"
    want = np.asarray(plain(jnp.asarray(row[None])))[0]
    np.testing.assert_allclose(results[0], want, rtol=1e-5, atol=1e-5 * np.sqrt(width))
    # Outside the switch: exactly the plain operation (with the CPU kernels off: on, the
    # log-softmax of float32 logits takes the row-statistics kernel in both modes, whose rows
    # the first half of this test holds to the same tolerance).
    x = jnp.asarray(rng.standard_normal((5, width)).astype(np.float32))
    if name == "log_softmax":
        np.testing.assert_allclose(fn(x), plain(x), rtol=1e-5, atol=1e-5 * np.sqrt(width))
    monkeypatch.setenv("JAXINFER_CPU_KERNELS", "0")
    assert np.array_equal(np.asarray(fn(x)), np.asarray(plain(x)))


def test_matmul_rows_are_invariant_and_right():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((576, 1536)).astype(np.float32))
    row = rng.standard_normal(576).astype(np.float32)
    results = _row_in_arrays(lambda x: invariant.matmul(x, w), row, rng)
    for got in results[1:]:
        assert np.array_equal(got, results[0]), "a row's product depends on the row count"
    np.testing.assert_allclose(results[0], row @ np.asarray(w), rtol=1e-4, atol=1e-4)
    x = jnp.asarray(rng.standard_normal((3, 4, 576)).astype(np.float32))  # leading dims kept
    with invariant.batch_invariant_ops():
        tiled = invariant.matmul(x, w)
    assert tiled.shape == (3, 4, 1536)
    np.testing.assert_allclose(tiled, x @ w, rtol=1e-4, atol=1e-4)
