"""What the GGUF block tests share (tests/test_gguf_native.py, tests/test_gguf_kquants.py): a
device weight from host blocks, the kernel's product, and the float32 summation bound.

The bound, derived: the kernel decodes each weight to the float32 value gguf-py gives (exact: see
kernels/cpu/gguf_matmul.cc), forms each x * w exactly in a fused multiply-add, adds ceil(in / 16)
of them per lane and the 16 lanes in a 4-level tree, so with u = 2^-24 the recursive-summation
bound is |y - y_exact| <= k u / (1 - k u) * sum_i |x_i w_i|, k = ceil(in / 16) + 5, against the
float64 product of the dequantized matrix. XLA's float32 dot (the jnp path) sums no worse.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernels.gguf_matmul import gguf_matmul
from jaxinfer.models.gguf_blocks import GGUFBlocks
from jaxinfer.models.gguf_weight import GGUFBlockWeight


def block_weight(blocks: GGUFBlocks, transposed: bool = True) -> GGUFBlockWeight:
    """Host blocks as a float32 GGUFBlockWeight on the default device."""
    quants, scales, mins, sub_scales = (
        None if a is None else jnp.asarray(a) for a in blocks.arrays
    )
    return GGUFBlockWeight(
        quants=quants,
        scales=scales,
        mins=mins,
        sub_scales=sub_scales,
        qtype=blocks.qtype,
        transposed=transposed,
        dtype_name="float32",
    )


_PRODUCT = jax.jit(gguf_matmul, static_argnames=("qtype", "max_threads"))


def kernel_product(blocks: GGUFBlocks, x: np.ndarray, max_threads: int | None = None) -> np.ndarray:
    """x [T, in] @ W.T through the kernel, W given by `blocks` [out, in]."""
    product = _PRODUCT(blocks.qtype, x, *blocks.arrays, max_threads=max_threads)
    return np.asarray(product)


def assert_within_float32_bound(got: np.ndarray, x: np.ndarray, values: np.ndarray) -> None:
    """Element by element: |got - x @ values.T (float64)| within the bound above."""
    exact = x.astype(np.float64) @ values.astype(np.float64).T
    k = math.ceil(x.shape[1] / 16) + 5
    u = 2.0**-24
    bound = k * u / (1 - k * u) * (np.abs(x).astype(np.float64) @ np.abs(values).T)
    assert got.shape == exact.shape and got.dtype == np.float32
    excess = np.abs(got - exact) - bound
    assert (excess <= 0).all(), f"max error over the bound {excess.max()}"
