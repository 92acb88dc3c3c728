"""Products with a GGUF weight kept in its Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K blocks, on XLA:CPU
through `jax.ffi` custom calls (cpu/gguf_matmul.cc).

    gguf_matmul(qtype, x [T, in], quants, scales, mins, sub_scales) -> float32 [T, out] = x @ W.T

with W [out, in] the float32 matrix gguf-py's `dequantize` gives for those blocks (the layout of
the split arrays: models/gguf_blocks.py, models/gguf_kquants.py). Why a kernel: decode reads every
weight once per step, and the blocks are 0.56 to 1.06 bytes per weight (Q4_K 0.56, Q6_K 0.82)
against 4 for the dequantized float32 matrix.

Built on first use like the int8 kernel (kernels/native_build.py), registered for "cpu" only;
`gguf_kernel_enabled()` is false on another backend, when the build failed (one warning) or with
`JAXINFER_CPU_KERNELS=0`, and then models/gguf_weight.py dequantizes with jnp instead. A row's
result depends on that row and `in` alone (fixed summation order), so the product is batch
invariant as it stands.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from jaxinfer.kernels.int8_matmul import THREADS_ENV
from jaxinfer.kernels.native_build import FfiKernelLibrary

SOURCE = Path(__file__).resolve().parent / "cpu" / "gguf_matmul.cc"
# GGUF type name -> (FFI target, symbol in the library).
TARGETS = {
    "Q8_0": ("jaxinfer_gguf_q8_0_matmul", "JaxinferQ8_0Matmul"),
    "Q4_0": ("jaxinfer_gguf_q4_0_matmul", "JaxinferQ4_0Matmul"),
    "Q4_1": ("jaxinfer_gguf_q4_1_matmul", "JaxinferQ4_1Matmul"),
    "Q4_K": ("jaxinfer_gguf_q4_k_matmul", "JaxinferQ4_KMatmul"),
    "Q6_K": ("jaxinfer_gguf_q6_k_matmul", "JaxinferQ6_KMatmul"),
}
_WITH_MINS = ("Q4_1", "Q4_K")
_WITH_SUB_SCALES = ("Q4_K", "Q6_K")

_LIBRARY = FfiKernelLibrary(SOURCE, dict(TARGETS.values()), "JaxinferGgufMatmulIsa")


def gguf_kernel_enabled() -> bool:
    """Whether a product traced now goes through the kernel (as int8's `cpu_kernel_enabled`)."""
    return _LIBRARY.enabled()


def kernel_isa() -> str | None:
    """Which implementation the build holds: avx512, avx2 or portable."""
    return _LIBRARY.isa()


def gguf_matmul(
    qtype: str,
    x: jax.Array,
    quants: jax.Array,
    scales: jax.Array,
    mins: jax.Array | None = None,
    sub_scales: jax.Array | None = None,
    max_threads: int | None = None,
) -> jax.Array:
    """x [T, in] (cast to float32) @ W.T -> float32 [T, out], W given by its blocks.

    `quants`: int8 [out, in] (Q8_0) or uint8 [out, in / 2] (Q4_0, Q4_1), [out, in / 2] (Q4_K),
    [out, in * 3 / 4] (Q6_K); `scales` and (Q4_1, Q4_K) `mins`: float16 [out, blocks];
    `sub_scales` (K-quants): uint8 [out, in / 256 * 12] (Q4_K) or int8 [out, in / 16] (Q6_K).
    `max_threads`: as `int8_matmul`'s."""
    if qtype not in TARGETS:
        raise ValueError(f"gguf_matmul: qtype must be one of {sorted(TARGETS)}, got {qtype!r}")
    if (mins is not None) != (qtype in _WITH_MINS):
        raise ValueError(f"gguf_matmul: mins go with {_WITH_MINS} only (qtype {qtype!r})")
    if (sub_scales is not None) != (qtype in _WITH_SUB_SCALES):
        raise ValueError(f"gguf_matmul: sub_scales go with {_WITH_SUB_SCALES} only ({qtype!r})")
    max_threads = _LIBRARY.call_threads(max_threads, THREADS_ENV)
    rows, out = x.shape[0], quants.shape[0]
    call = jax.ffi.ffi_call(
        TARGETS[qtype][0], jax.ShapeDtypeStruct((rows, out), jnp.float32), vmap_method="sequential"
    )
    quant_dtype = jnp.int8 if qtype == "Q8_0" else jnp.uint8
    operands = [x.astype(jnp.float32), quants.astype(quant_dtype), scales.astype(jnp.float16)]
    if mins is not None:
        operands.append(mins.astype(jnp.float16))
    if sub_scales is not None:
        operands.append(sub_scales.astype(jnp.int8 if qtype == "Q6_K" else jnp.uint8))
    return call(*operands, max_threads=max_threads)
