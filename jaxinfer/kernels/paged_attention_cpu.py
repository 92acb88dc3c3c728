"""Paged attention on XLA:CPU through a `jax.ffi` custom call (cpu/paged_attention.cc).

    paged_attention(q [T, H, D], k_new [T, K, D], v_new [T, K, D], k_cache [K, N, P, D],
                    v_cache [K, N, P, D], block_tables [S, B], context_lens [S],
                    query_start_loc [S + 1], *, scale, sliding_window, soft_cap) -> [T, H, D]

The signature and the result of `pallas_kernels.reference.paged_attention` (tokens past
`query_start_loc[S]` are padding and output zeros), for decode rows (row s owns exactly token s:
the reference's `decode_only=True`) and ragged prefill chunks alike, for a float32 or bfloat16
cache, or an 8-bit float one (kv_cache_dtype "fp8" / "fp8_e5m2", widened exactly in the kernel);
`supports(...)` says whether a call can take it.

Why: the reference's decode path gathers every sequence's context into float32 copies, chunk by
chunk, as far as the longest context in the step (attention was about half of a batched SmolLM2
decode step on the 2-core CPU), and its prefill path scores every token of the step against every
other and masks, a [T, T] product per head whatever the sequences (a third of an int8 SmolLM2
prefill step of 4 x 128 tokens). The kernel reads the cache blocks in place through the block
table and each token's own sequence only, and stops each token at its own position. It is built
on first use with the system compiler (kernels/native_build.py) and registered for the "cpu"
platform only; `cpu_kernel_enabled()` is false on another backend, when the build failed (one
warning, then the reference), or when `JAXINFER_CPU_KERNELS=0` switches the CPU kernels off.
runtime/attention_backend.py decides.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernels.native_build import FfiKernelLibrary

TARGETS = {  # cache dtype -> FFI target
    jnp.dtype(jnp.float32): "jaxinfer_paged_attention_f32",
    jnp.dtype(jnp.bfloat16): "jaxinfer_paged_attention_bf16",
    jnp.dtype(jnp.float8_e4m3fn): "jaxinfer_paged_attention_f8e4m3",  # kv_cache_dtype "fp8"
    jnp.dtype(jnp.float8_e5m2): "jaxinfer_paged_attention_f8e5m2",
}
THREADS_ENV = "JAXINFER_ATTENTION_KERNEL_THREADS"  # at most this many threads per call
SOURCE = Path(__file__).resolve().parent / "cpu" / "paged_attention.cc"

_LIBRARY = FfiKernelLibrary(
    SOURCE,
    {
        TARGETS[jnp.dtype(jnp.float32)]: "JaxinferPagedAttentionF32",
        TARGETS[jnp.dtype(jnp.bfloat16)]: "JaxinferPagedAttentionBF16",
        TARGETS[jnp.dtype(jnp.float8_e4m3fn)]: "JaxinferPagedAttentionF8E4M3",
        TARGETS[jnp.dtype(jnp.float8_e5m2)]: "JaxinferPagedAttentionF8E5M2",
    },
    "JaxinferPagedAttentionIsa",
)


def cpu_kernel_enabled() -> bool:
    """Whether attention traced now may go through the kernel: CPU, kernels not switched off, and
    the kernel built."""
    return _LIBRARY.enabled()


def kernel_isa() -> str | None:
    """Which of the source's implementations the build holds: avx512, avx2 or portable."""
    return _LIBRARY.isa()


def _element_type(k_cache: jax.Array, cache_dtype=None) -> jnp.dtype:
    """What the cache holds: `cache_dtype` for an 8-bit float cache kept as bytes (uint8)."""
    if cache_dtype is not None and k_cache.dtype == jnp.uint8:
        return jnp.dtype(cache_dtype)
    return jnp.dtype(k_cache.dtype)


def supports(k_cache: jax.Array, cache_dtype=None) -> bool:
    """Whether the kernel takes this cache (float32, bfloat16, float8 e4m3fn / e5m2, typed or as
    bytes with its `cache_dtype`; any query dtype)."""
    return _element_type(k_cache, cache_dtype) in TARGETS


def paged_attention(
    q: jax.Array,  # [T, H, D]
    k_new: jax.Array,  # [T, K, D]
    v_new: jax.Array,  # [T, K, D]
    k_cache: jax.Array,  # [K, N, P, D]
    v_cache: jax.Array,  # [K, N, P, D]
    block_tables: jax.Array,  # [S, B] int32
    context_lens: jax.Array,  # [S] int32: tokens after this step, the new ones included
    query_start_loc: jax.Array,  # [S + 1] int32
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    max_threads: int | None = None,
    cache_dtype=None,
) -> jax.Array:  # [T, H, D] in q's dtype
    """Attention of each new token over its own sequence's paged context and the step's earlier
    tokens of that sequence (see the module).

    `max_threads`: at most this many threads of XLA's intra-op pool (0: all of them; default:
    `$JAXINFER_ATTENTION_KERNEL_THREADS`, else 0), read when traced. `cache_dtype`: the element
    type of a cache given as bytes (an 8-bit float one, as the engine keeps it)."""
    max_threads = _LIBRARY.call_threads(max_threads, THREADS_ENV)
    element = _element_type(k_cache, cache_dtype)
    if element not in TARGETS or v_cache.dtype != k_cache.dtype:
        raise TypeError(
            f"the CPU paged-attention kernel takes a float32, bfloat16 or float8 cache, got "
            f"{k_cache.dtype} / {v_cache.dtype}"
        )
    if not q.shape[0] == k_new.shape[0] == v_new.shape[0]:
        raise ValueError(
            f"q, k_new and v_new must hold the same tokens, got {q.shape[0]}, {k_new.shape[0]} "
            f"and {v_new.shape[0]}"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or at least 1, got {sliding_window}")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"soft_cap must be None or positive, got {soft_cap}")
    if element.itemsize == 1:  # the fp8 handlers read bytes (XLA:CPU has no fp8 arithmetic)
        k_cache = jax.lax.bitcast_convert_type(k_cache, jnp.uint8)
        v_cache = jax.lax.bitcast_convert_type(v_cache, jnp.uint8)
    call = jax.ffi.ffi_call(
        TARGETS[element],
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        vmap_method="sequential",
    )
    out = call(
        q.astype(jnp.float32),
        k_new.astype(jnp.float32),
        v_new.astype(jnp.float32),
        k_cache,
        v_cache,
        block_tables.astype(jnp.int32),
        context_lens.astype(jnp.int32),
        query_start_loc.astype(jnp.int32),
        scale=np.float32(scale),
        sliding_window=np.int64(sliding_window or 0),
        soft_cap=np.float32(soft_cap or 0.0),
        max_threads=np.int64(max_threads),
    )
    return out.astype(q.dtype)
