"""Which paged-attention implementation the compiled step calls.

`EngineConfig.attention_backend`:
  * "auto": the Pallas kernel on GPU when it supports the model's head dim (and this jax still has
    Pallas' Triton backend), else the jnp reference (XLA:CPU runs the reference far faster than
    interpreted Pallas).
  * "pallas": the Pallas kernel, compiled for the GPU; an error anywhere it cannot run.
  * "pallas_interpret": the same kernel in Pallas' interpret mode: slow, but it runs on CPU, so CI
    checks the kernel end to end through the engine.
  * "reference": `pallas_kernels.reference.paged_attention` under XLA; on the CPU, every call,
    decode rows and prefill chunks alike, goes instead to the C++ kernel
    `kernels/paged_attention_cpu.py` (same signature and result; it reads the cache blocks in
    place, each token only its own sequence's keys up to its own position), when it built, the
    cache is float32 or bfloat16, and `JAXINFER_CPU_KERNELS=0` does not switch the CPU kernels
    off. Chosen when traced.
The runner itself picks "batch_invariant" (`pallas_kernels.batch_invariant.paged_attention`) when
`EngineConfig.batch_invariant` is on: the jnp formulation whose per-token result is independent of
the step it runs in.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
from jax.sharding import Mesh, PartitionSpec

from jaxinfer.config import ATTENTION_BACKENDS as BACKENDS
from jaxinfer.kernels import paged_attention_cpu
from jaxinfer.runtime import kv_cache
from pallas_kernels import batch_invariant, reference
from pallas_kernels import paged_attention as kernel

logger = logging.getLogger("jaxinfer")


def resolve_backend(requested: str, head_dim: int, platform: str | None = None) -> str:
    """-> the concrete backend: "pallas", "pallas_interpret" or "reference"."""
    if requested not in BACKENDS:
        raise ValueError(
            f"EngineConfig.attention_backend must be one of {BACKENDS}, got {requested!r}"
        )
    platform = platform or jax.default_backend()
    supported = kernel.supported_head_dim(head_dim)
    compiled = kernel.TRITON_AVAILABLE  # jax >= 0.11 deprecates it; a later jax drops it
    if requested == "auto":
        chosen = "pallas" if platform == "gpu" and supported and compiled else "reference"
        if platform == "gpu" and not compiled:
            logger.warning(
                "jax %s has no Pallas Triton backend: using the jnp reference attention",
                jax.__version__,
            )
        if platform == "gpu" and not supported:
            logger.warning(
                "head_dim %d is not supported by the Pallas kernel (powers of two 16..256): "
                "using the jnp reference attention",
                head_dim,
            )
        return chosen
    if requested == "pallas":
        if platform != "gpu":
            raise ValueError(
                "EngineConfig.attention_backend='pallas' needs a GPU (this is "
                f"{platform!r}); use 'pallas_interpret' to run the kernel on CPU, or 'reference'"
            )
        if not supported:
            raise ValueError(
                f"EngineConfig.attention_backend='pallas' supports head_dim 16..256, a power of "
                f"two; this model has head_dim {head_dim}"
            )
        if not compiled:
            raise ValueError(
                "EngineConfig.attention_backend='pallas' compiles through Pallas' Triton "
                f"backend, which jax {jax.__version__} no longer has; use 'reference' "
                "(pallas_kernels/README.md: the kernel's move to Mosaic GPU)"
            )
    return requested


def reference_or_cpu_kernel(
    q: jax.Array,  # [T, H, D]
    k_new: jax.Array,  # [T, K, D]
    v_new: jax.Array,  # [T, K, D]
    k_cache: jax.Array,  # [K, N, P, D]
    v_cache: jax.Array,  # [K, N, P, D]
    block_tables: jax.Array,  # [S, B] int32
    context_lens: jax.Array,  # [S] int32
    query_start_loc: jax.Array,  # [S + 1] int32
    *,
    scale: float,
    decode_only: bool = False,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    cache_dtype=None,
) -> jax.Array:  # [T, H, D]
    """The "reference" backend: the CPU kernel where it can run (decode rows and prefill chunks;
    `decode_only` is only the reference's hint), else the jnp reference. Decided when traced
    (the cache dtype, and whether the kernel is enabled then), so `JAXINFER_CPU_KERNELS=0` set
    before a compile takes the reference for comparisons."""
    args = (q, k_new, v_new, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    options = {"scale": scale, "sliding_window": sliding_window, "soft_cap": soft_cap}
    if (
        paged_attention_cpu.supports(k_cache, cache_dtype)
        and paged_attention_cpu.cpu_kernel_enabled()
    ):
        return paged_attention_cpu.paged_attention(*args, cache_dtype=cache_dtype, **options)
    return _typed_caches(reference.paged_attention, cache_dtype)(
        *args, decode_only=decode_only, **options
    )


def _typed_caches(attention: Callable, cache_dtype) -> Callable:
    """`attention` (a jnp or Pallas backend) given an 8-bit float cache's bytes as that type."""

    def typed(q, k_new, v_new, k_cache, v_cache, *rest, **static):
        k_cache = kv_cache.typed_view(k_cache, cache_dtype)
        v_cache = kv_cache.typed_view(v_cache, cache_dtype)
        return attention(q, k_new, v_new, k_cache, v_cache, *rest, **static)

    return typed


def _keys_as_stored(attention: Callable, cache_dtype) -> Callable:
    """`attention` with the step's own K/V rounded to the cache's type first when that is an
    8-bit float (kv_cache_dtype "fp8..."), so every key and value is seen as stored, in the step
    that writes it as in every later one: as in vLLM, whose attention reads the new tokens from
    the fp8 cache too. Otherwise a prompt's keys would be exact within its own prefill chunk and
    rounded in later chunks, and outputs would depend on how the scheduler chunked the prompt."""
    if not kv_cache.is_fp8(cache_dtype):
        return attention

    def rounded(q, k_new, v_new, k_cache, v_cache, *rest, **static):
        k_new = k_new.astype(cache_dtype).astype(k_new.dtype)
        v_new = v_new.astype(cache_dtype).astype(v_new.dtype)
        return attention(q, k_new, v_new, k_cache, v_cache, *rest, **static)

    return rounded


def attention_fn(backend: str, mesh: Mesh | None = None, cache_dtype=None) -> Callable:
    """The paged-attention function of a resolved backend (same signature as the reference).

    On a mesh it runs under `shard_map`, each device on its own query and kv heads: attention
    never mixes heads, so no collective is needed, and the kernel sees ordinary unsharded arrays.
    This is the one place the model's sharding meets an explicit per-device program.

    `cache_dtype`: the cache's element type where it is an 8-bit float, whose arrays then hold
    its bytes (`kv_cache.storage_dtype`); the step's own keys and values are rounded to it.
    """
    if backend == "reference":
        local = functools.partial(reference_or_cpu_kernel, cache_dtype=cache_dtype)
    elif backend == "batch_invariant":
        local = _typed_caches(batch_invariant.paged_attention, cache_dtype)
    else:
        pallas = functools.partial(kernel.paged_attention, interpret=backend == "pallas_interpret")
        local = _typed_caches(pallas, cache_dtype)
    local = _keys_as_stored(local, cache_dtype)
    if mesh is None:
        return local
    heads = PartitionSpec(None, "model", None)  # [T, H or K, D]
    cache = PartitionSpec("model")  # [K, N, P, D]
    batch = PartitionSpec()  # block tables and lengths: every device sees all of them

    def sharded(q, k_new, v_new, k_cache, v_cache, block_tables, context_lens, qsl, **static):
        return jax.shard_map(
            functools.partial(local, **static),
            mesh=mesh,
            in_specs=(heads, heads, heads, cache, cache, batch, batch, batch),
            out_specs=heads,
            check_vma=False,
        )(q, k_new, v_new, k_cache, v_cache, block_tables, context_lens, qsl)

    return sharded
