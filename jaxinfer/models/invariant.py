"""The step's reductions and weight products, with a batch-invariant form behind one switch.

Why: on XLA:CPU a row's result depends on the shape of the array it is computed in. A GEMM blocks
its contracted axis by the row count: SmolLM2's `[T, 576] @ [576, 1536]` rounds a row one way at
T = 1 (a GEMV), another at 2..32 and a third from 33 (three classes, bitwise equal within each,
~1e-4 apart). A reduction along the last axis changes strategy with the whole array's size: a
row of 128 sums differently in [16, 128] than in [32, 128], a vocabulary row differently at 4 rows
than at 3. So a request's logprobs moved with the step's bucket, that is with what else ran.

Within `batch_invariant_ops()` (entered while the step is traced; the runner jits the invariant
step as a function of its own, so no trace is shared between the modes):
  * `matmul` runs as a loop of `[ROWS, E] @ [E, F]` GEMMs of one shape whatever T is (within one
    shape a row's result depends neither on its position nor on the other rows: measured);
  * `row_sum` / `mean` / `log_softmax` / `cumsum` add in an order fixed by the row's length alone
    (`tree_sum`; a Hillis-Steele scan for `cumsum`): elementwise adds, which XLA never reassociates.
    On XLA:CPU with the kernels on, `log_softmax` / `log_normalizer` of float32 logits take the
    row-statistics kernel in both modes (kernels/row_stats.py: its order is fixed per row).
Outside it they are the plain jnp operations, bit for bit what the step computed before.
The families call these instead of `@`, `jnp.mean`, ...: no flag is threaded through every layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import jax
import jax.numpy as jnp

from jaxinfer.kernels.gguf_matmul import gguf_kernel_enabled
from jaxinfer.kernels.int8_matmul import cpu_kernel_enabled
from jaxinfer.kernels.row_stats import cpu_kernel_enabled as row_stats_enabled
from jaxinfer.kernels.row_stats import row_stats
from jaxinfer.models.gguf_weight import GGUFBlockWeight, gguf_block_matmul
from jaxinfer.models.quantization import QuantizedWeight, quantized_matmul
from pallas_kernels.batch_invariant import tree_sum

# Rows per GEMM tile. 16: a one-sequence decode pays for 16 rows (the padding rows cost FLOPs,
# not weight reads), and a 512-token prefill runs 32 tiles of each product while the matrix stays
# in cache between them (benchmarks/batch_invariant.py measures the mode's cost).
ROWS = 16

_active: ContextVar[bool] = ContextVar("jaxinfer_batch_invariant", default=False)


@contextlib.contextmanager
def batch_invariant_ops(enabled: bool = True) -> Iterator[None]:
    """Within the block (while tracing), this module's operations take their invariant form."""
    token = _active.set(enabled)
    try:
        yield
    finally:
        _active.reset(token)


def matmul(
    x: jax.Array, w: jax.Array | QuantizedWeight | GGUFBlockWeight, preferred_element_type=None
) -> jax.Array:
    """x [..., E] @ w [E, F] -> [..., F]. `w` may be an int8 QuantizedWeight
    (models/quantization.py) or a GGUFBlockWeight (models/gguf_weight.py: the same two paths,
    with its own kernel).

    In the invariant form an int8 weight goes through the CPU kernel untiled when it applies (its
    per-row result depends on the row alone: kernels/cpu/int8_matmul.cc); otherwise it is
    dequantized once, before the tiles, which then run the float GEMM: with XLA's dequantizing
    product inside each tile, a row's logprobs still moved with the row count (~1e-6; the tokens
    held), so invariance is bought with one float copy per step.
    """
    if isinstance(w, QuantizedWeight):
        if not _active.get() or cpu_kernel_enabled():
            flat = quantized_matmul(x.reshape(-1, x.shape[-1]), w, preferred_element_type)
            return flat.reshape(*x.shape[:-1], w.shape[-1])
        w = jax.lax.optimization_barrier(w.dequantize())
    elif isinstance(w, GGUFBlockWeight):
        if not _active.get() or gguf_kernel_enabled():
            flat = gguf_block_matmul(x.reshape(-1, x.shape[-1]), w, preferred_element_type)
            return flat.reshape(*x.shape[:-1], w.shape[-1])
        w = jax.lax.optimization_barrier(w.dequantize())
    if not _active.get():
        return jnp.dot(x, w, preferred_element_type=preferred_element_type)
    leading, width = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, width)
    count = flat.shape[0]
    tiles = jnp.pad(flat, ((0, -count % ROWS), (0, 0))).reshape(-1, ROWS, width)
    # A loop, not one batched dot: XLA folds a batched [n, m, E] x [E, F] back into one GEMM.
    products = jax.lax.map(
        lambda tile: jnp.dot(tile, w, preferred_element_type=preferred_element_type), tiles
    )
    return products.reshape(-1, w.shape[-1])[:count].reshape(*leading, w.shape[-1])


def row_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis."""
    return tree_sum(x) if _active.get() else jnp.sum(x, axis=-1)


def mean(x: jax.Array) -> jax.Array:
    """Mean over the last axis, keeping it (the norms' statistics)."""
    if not _active.get():
        return jnp.mean(x, axis=-1, keepdims=True)
    return (tree_sum(x) / x.shape[-1])[..., None]


def log_softmax(x: jax.Array) -> jax.Array:
    """log_softmax over the last axis (as `jax.nn.log_softmax`: shift by the max, log-sum-exp)."""
    if not _active.get() and not _row_stats_kernel(x):
        return jax.nn.log_softmax(x, axis=-1)
    shift, log_sum = log_normalizer(x)
    return (x - shift) - log_sum


def _row_stats_kernel(x: jax.Array) -> bool:
    """Whether x's normalizer goes through the CPU row-statistics kernel (kernels/row_stats.py):
    float32 logits on XLA:CPU with the kernels on. Its sum is in a fixed order per row (batch
    invariant as it stands), so both modes take it."""
    return x.dtype == jnp.float32 and x.ndim >= 1 and x.shape[-1] > 0 and row_stats_enabled()


def log_normalizer(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(shift, log_sum), each [..., 1], with `log_softmax(x) == (x - shift) - log_sum` bit for bit
    in either mode: for the few entries of a wide row that are wanted (prompt logprobs), without
    writing the whole log-softmax out."""
    if _row_stats_kernel(x):
        stats = row_stats(x.reshape(-1, x.shape[-1]))
        keep = (*x.shape[:-1], 1)
        return stats.shift.reshape(keep), stats.log_sum.reshape(keep)
    top = jnp.max(x, axis=-1, keepdims=True)
    if not _active.get():  # jax.nn.log_softmax's own steps
        shifted = x - jax.lax.stop_gradient(top)
        return top, jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    return shift, jnp.log(tree_sum(jnp.exp(x - shift)))[..., None]


def cumsum(x: jax.Array) -> jax.Array:
    """Inclusive cumulative sum over the last axis."""
    if not _active.get():
        return jnp.cumsum(x, axis=-1)
    length, shift = x.shape[-1], 1
    while shift < length:  # Hillis-Steele: each element adds the partial sum `shift` before it
        before = jnp.pad(x[..., : length - shift], [(0, 0)] * (x.ndim - 1) + [(shift, 0)])
        x = x + before
        shift *= 2
    return x
