"""The int8 weight product on XLA:CPU through a `jax.ffi` custom call (cpu/int8_matmul.cc).

    int8_matmul(x [T, in] float32, panels [ceil(out / 64), in, 64] int8, scale [out] float32)
    -> [T, out] float32 = x @ (W * scale[:, None]).T,  panels = pack_panels(W [out, in])

Panels of 64 output channels, each stored input by input, are the layout the kernel streams at a
core's read bandwidth (cpu/int8_matmul.cc says why); `pack_panels` makes them once, at load.

Why: XLA:CPU converts an int8 weight into a float32 copy before its dot, so the int8 model read
more bytes per step than the float32 one (benchmarks/RESULTS.md, "Weight-only int8"); the kernel
reads the int8 rows themselves. It is built on first use with the system compiler
(kernels/native_build.py) and registered for the "cpu" platform only. `cpu_kernel_enabled()` is
what `models/quantization.quantized_matmul` asks at trace time: false on another backend, when
the build failed (one warning, then XLA's blocked path), or when `JAXINFER_CPU_KERNELS=0`
forces that path (tests of the fallback, comparisons).

A row's result depends on that row and `in` alone (the summation order is fixed in the source),
so the product is batch invariant as it stands.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernels.native_build import FfiKernelLibrary

TARGET = "jaxinfer_int8_matmul"
THREADS_ENV = "JAXINFER_INT8_KERNEL_THREADS"  # at most this many threads per product (benchmarks)
SOURCE = Path(__file__).resolve().parent / "cpu" / "int8_matmul.cc"
PANEL = 64  # output channels per panel (cpu/int8_matmul.cc's kPanel)

_LIBRARY = FfiKernelLibrary(SOURCE, {TARGET: "JaxinferInt8Matmul"}, "JaxinferInt8MatmulIsa")


def cpu_kernel_enabled() -> bool:
    """Whether a product traced now goes through the kernel: CPU, kernels not switched off, and
    the kernel built."""
    return _LIBRARY.enabled()


def kernel_isa() -> str | None:
    """Which of the source's implementations the build holds: avx512, avx2 or portable."""
    return _LIBRARY.isa()


def pack_panels(rows: np.ndarray) -> np.ndarray:
    """W [out, in] -> panels [ceil(out / PANEL), in, PANEL]: panel p, row i holds
    W[PANEL * p : PANEL * (p + 1), i], the last panel padded with zeros. Host numpy, at load."""
    out_features, in_features = rows.shape
    padded = np.zeros((-(-out_features // PANEL) * PANEL, in_features), dtype=rows.dtype)
    padded[:out_features] = rows
    panels = padded.reshape(-1, PANEL, in_features).transpose(0, 2, 1)
    return np.ascontiguousarray(panels)


def unpack_panels(panels: jax.Array, out_features: int) -> jax.Array:
    """pack_panels' inverse (jnp or numpy): panels [P, in, PANEL] -> W [out, in]."""
    count, in_features, width = panels.shape
    rows = panels.transpose(0, 2, 1).reshape(count * width, in_features)
    return rows[:out_features]


def int8_matmul(
    x: jax.Array, panels: jax.Array, scale: jax.Array, max_threads: int | None = None
) -> jax.Array:
    """x [T, in] (cast to float32) @ (W int8 * scale [out]).T -> float32 [T, out], for
    panels = pack_panels(W).

    `max_threads`: at most this many threads of XLA's intra-op pool (0: all of them; default:
    `$JAXINFER_INT8_KERNEL_THREADS`, else 0), read when traced."""
    max_threads = _LIBRARY.call_threads(max_threads, THREADS_ENV)
    rows, out = x.shape[0], scale.shape[0]
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct((rows, out), jnp.float32), vmap_method="sequential"
    )
    return call(
        x.astype(jnp.float32),
        panels.astype(jnp.int8),
        scale.astype(jnp.float32),
        max_threads=max_threads,
    )
