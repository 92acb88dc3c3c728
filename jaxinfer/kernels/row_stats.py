"""Per-row argmax, maximum, finiteness and log-softmax normalizer of logits on XLA:CPU, through a
`jax.ffi` custom call (cpu/row_stats.cc), and a second call for each row's token logprob, rank
and top-k logprobs (the sampler's logprobs and the prompt scorer's).

    row_stats(x [S, V]) -> RowStats(argmax [S] int32, max [S], shift [S, 1], log_sum [S, 1],
                                     finite [S] bool)
    log_softmax(x) == (x - shift) - log_sum

Why: XLA:CPU reduces along the last axis one element at a time, and the sampler's reductions over
the vocabulary (argmax, finite check, log-softmax's max and sum) cost more than some decode
steps' weight reads (cpu/row_stats.cc has the numbers). One call does them all in two vectorized
passes per row; XLA's CSE merges the calls that `argmax` and `log_normalizer` make on one array.
The prompt scorer's rank count and top-k over [T, V] were the same kind of cost (at T = 512
tokens of SmolLM2: ~65 ms for the rank, ~55 ms for `lax.top_k`): `top_logprobs` does both in
one pass per row, the top k through a running list and a block maximum that skips most blocks.

Where the kernel does not apply (another backend, `JAXINFER_CPU_KERNELS=0`, a failed build),
`runtime/sampling.logit_stats` computes the same quantities with `jax.numpy` (argmax through
`lax.top_k`, the normalizer as `models/invariant.log_normalizer`). The kernel's normalizer is its own sum (16 lanes, then a
fixed tree: batch invariant by construction) with its own exp (~2 ulp), so its log-softmax
differs from `jax.nn.log_softmax`'s in the last bits; every log-softmax the step computes on the
CPU goes through the same kernel, so the sampled token's logprob, the top logprobs and the prompt
logprobs agree bit for bit with one another.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernels.native_build import FfiKernelLibrary

TARGET = "jaxinfer_row_stats"
TOP_TARGET = "jaxinfer_top_logprobs"
THREADS_ENV = "JAXINFER_ROW_STATS_THREADS"  # at most this many threads per call (benchmarks)
SOURCE = Path(__file__).resolve().parent / "cpu" / "row_stats.cc"

_LIBRARY = FfiKernelLibrary(
    SOURCE, {TARGET: "JaxinferRowStats", TOP_TARGET: "JaxinferTopLogprobs"}, "JaxinferRowStatsIsa"
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class RowStats:
    """`finite` is of the raw row; the others of the row after its bitmask."""

    argmax: jax.Array  # [S] int32: the first maximum (the first NaN if any), as jnp.argmax
    max: jax.Array  # [S] f32: the row's maximum (NaN if any)
    shift: jax.Array  # [S, 1] f32: the maximum where finite, else 0
    log_sum: jax.Array  # [S, 1] f32: log(sum(exp(x - shift)))
    finite: jax.Array  # [S] bool: every entry finite


def cpu_kernel_enabled() -> bool:
    """Whether a call traced now goes through the kernel: CPU, kernels not switched off, and the
    kernel built."""
    return _LIBRARY.enabled()


def kernel_isa() -> str | None:
    """Which instruction set the build targets: avx512, avx2 or portable."""
    return _LIBRARY.isa()


def row_stats(
    x: jax.Array, bitmask: jax.Array | None = None, max_threads: int | None = None
) -> RowStats:
    """The statistics of each row of x [S, V] (cast to float32), through the kernel: `finite` of
    the row as it is, the others of the row with every entry whose bit is clear in `bitmask`
    [S, ceil(V / 32)] int32 set to -inf (sampling.apply_token_bitmask's packing; None: all
    allowed).

    `max_threads`: at most this many threads of XLA's intra-op pool (0: all of them; default:
    `$JAXINFER_ROW_STATS_THREADS`, else 0), read when traced."""
    max_threads = _LIBRARY.call_threads(max_threads, THREADS_ENV)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"row_stats takes x [S, V] with V >= 1, got shape {x.shape}")
    rows, vocab = x.shape
    words = -(-vocab // 32)
    if bitmask is None:
        bitmask = jnp.full((rows, words), -1, jnp.int32)
    if bitmask.shape != (rows, words):
        raise ValueError(f"bitmask must be [{rows}, {words}] for x {x.shape}, got {bitmask.shape}")
    s32 = jax.ShapeDtypeStruct((rows,), jnp.int32)
    f32 = jax.ShapeDtypeStruct((rows,), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, (s32, f32, f32, f32, s32), vmap_method="sequential")
    argmax, top, shift, log_sum, finite = call(
        x.astype(jnp.float32), bitmask.astype(jnp.int32), max_threads=np.int64(max_threads)
    )
    return RowStats(
        argmax=argmax,
        max=top,
        shift=shift[:, None],
        log_sum=log_sum[:, None],
        finite=finite.astype(bool),
    )


def top_logprobs(
    x: jax.Array,  # [T, V] f32 logits
    tokens: jax.Array,  # [T] int32
    shift: jax.Array,  # [T, 1] f32, RowStats.shift of x
    log_sum: jax.Array,  # [T, 1] f32, RowStats.log_sum of x
    k: int,  # static, 0 <= k <= V
    max_threads: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """-> (token_logprob [T], rank [T] int32, top_ids [T, k] int32, top_logprobs [T, k]) through
    the kernel: `sampling.top_logprobs_of_logits`' quantities, bitwise its logprobs and ranks for
    the same normalizer, with the top k in `lax.top_k`'s order (cpu/row_stats.cc)."""
    max_threads = _LIBRARY.call_threads(max_threads, THREADS_ENV)
    rows, vocab = x.shape
    if not 0 <= k <= vocab:
        raise ValueError(f"k must be in [0, {vocab}], got {k}")
    call = jax.ffi.ffi_call(
        TOP_TARGET,
        (
            jax.ShapeDtypeStruct((rows,), jnp.float32),
            jax.ShapeDtypeStruct((rows,), jnp.int32),
            jax.ShapeDtypeStruct((rows, k), jnp.int32),
            jax.ShapeDtypeStruct((rows, k), jnp.float32),
        ),
        vmap_method="sequential",
    )
    return call(
        x.astype(jnp.float32),
        tokens.astype(jnp.int32),
        shift.reshape(rows).astype(jnp.float32),
        log_sum.reshape(rows).astype(jnp.float32),
        max_threads=np.int64(max_threads),
    )
