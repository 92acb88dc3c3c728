"""The int8 CPU kernel behind `jax.ffi` (jaxinfer/kernels/cpu/int8_matmul.cc) against numpy float64.

Tolerance, derived rather than measured: the kernel forms each product x*w exactly inside a fused
multiply-add, adds the `in` of them to one accumulator in increasing i (one rounding each) and
multiplies by the scale, so with u = 2^-24 (float32 rounding) the standard bound for recursive
summation gives |y - y_exact| <= k u / (1 - k u) * scale * sum_i |x_i w_i|, k = in + 1. The test
asserts that bound element by element (measured errors sit far below it), so a lost element, a
wrong scale, a swapped channel or a misread panel fails while float32 rounding cannot.

Invariance: a row's result must be bitwise the same whatever the row count and the row's position
(row tiles of up to 6, lone rows over 2 panels, chunks of 64 rows and panel blocks must not change
its summation order), and the AVX2 and portable builds of the same source must give the AVX-512
build's bits.
"""

from __future__ import annotations

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.kernels import int8_matmul as kernel_module
from jaxinfer.kernels.int8_matmul import (
    SOURCE,
    TARGET,
    cpu_kernel_enabled,
    int8_matmul,
    pack_panels,
    unpack_panels,
)
from jaxinfer.kernels.native_build import KERNEL_CACHE_ENV, build_shared_library
from jaxinfer.models.quantization import QuantizedWeight, quantized_matmul

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the int8 kernel is registered for XLA:CPU only"
)


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    if not cpu_kernel_enabled():
        pytest.fail("the int8 CPU kernel did not build here (g++ is on every machine we run on)")


def _problem(rows: int, in_features: int, out_features: int, seed: int = 0):
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((rows, in_features)).astype(np.float32)
    values = gen.integers(-127, 128, size=(out_features, in_features)).astype(np.int8)
    scale = (gen.random(out_features) * 0.02 + 1e-3).astype(np.float32)
    return x, values, scale


def _kernel(x, values, scale, **options) -> np.ndarray:
    """The kernel on int8 rows [out, in], packed into its panels here."""
    product = jax.jit(lambda x, p, s: int8_matmul(x, p, s, **options))
    return np.asarray(product(x, pack_panels(values), scale))


def _assert_within_float32_bound(got, x, values, scale) -> None:
    exact = x.astype(np.float64) @ (values.astype(np.float64) * scale[:, None]).T
    k = x.shape[1] + 1
    u = 2.0**-24
    bound = (
        k * u / (1 - k * u) * (np.abs(x).astype(np.float64) @ np.abs(values.astype(np.float64)).T)
    )
    bound *= scale
    assert got.shape == exact.shape
    assert got.dtype == np.float32
    excess = np.abs(got - exact) - bound
    assert (excess <= 0).all(), f"max error over the bound {excess.max()}"


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 64, 65])
@pytest.mark.parametrize(
    ("in_features", "out_features"),
    # outputs below, at, just above and well past one panel of 64 (a ragged last panel)
    [(576, 1536), (37, 9), (5, 3), (20, 64), (70, 65), (100, 333)],
)
def test_kernel_matches_float64_within_the_float32_summation_bound(rows, in_features, out_features):
    x, values, scale = _problem(rows, in_features, out_features, seed=rows + in_features)
    got = _kernel(x, values, scale)
    _assert_within_float32_bound(got, x, values, scale)


def test_a_rows_result_is_bitwise_the_same_whatever_the_batch():
    # 1000 outputs: 16 panels, the last ragged, so the lone row's 2-panel tiles leave one over;
    # batches cross the row tiles (up to 6 rows) and the 64-row chunks.
    x, values, scale = _problem(130, 200, 1000, seed=3)
    row = x[0]
    alone = _kernel(row[None], values, scale)[0]
    cases = [(2, 1), (3, 2), (4, 3), (5, 4), (6, 5), (7, 6), (16, 9), (64, 63), (65, 64), (130, 77)]
    for count, position in cases:
        batch = x[:count].copy()
        batch[[0, position]] = batch[[position, 0]]
        got = _kernel(batch, values, scale)
        np.testing.assert_array_equal(got[position], alone, err_msg=f"T={count} row {position}")
    for threads in (1, 2):  # one thread or two share the blocks differently
        np.testing.assert_array_equal(_kernel(x, values, scale, max_threads=threads)[0], alone)


def test_panels_hold_each_output_channels_weights_input_by_input():
    values = np.arange(-100, 95, dtype=np.int8).reshape(65, 3)  # 2 panels, the second 1 channel
    panels = pack_panels(values)
    assert panels.shape == (2, 3, 64) and panels.dtype == np.int8
    assert panels[1, 2, 0] == values[64, 2] and panels[0, 1, 63] == values[63, 1]
    assert not panels[1, :, 1:].any()  # the padding
    np.testing.assert_array_equal(unpack_panels(panels, 65), values)
    np.testing.assert_array_equal(np.asarray(unpack_panels(jnp.asarray(panels), 65)), values)


@pytest.mark.parametrize(
    ("isa", "flags"),
    [("avx2", ("-mno-avx512f",)), ("portable", ("-mno-avx2", "-mno-fma", "-mno-avx512f"))],
)
def test_other_instruction_sets_give_the_same_bits(isa, flags):
    """The source's AVX2 and plain C++ paths (machines without AVX-512 or without a vector
    unit take them) compute the same summation sequence as the one this machine runs."""
    import ctypes

    path = build_shared_library(SOURCE, (jax.ffi.include_dir(),), extra_flags=flags)
    assert path is not None
    library = ctypes.CDLL(str(path))
    library.JaxinferInt8MatmulIsa.restype = ctypes.c_char_p
    assert library.JaxinferInt8MatmulIsa().decode() == isa
    target = f"{TARGET}_test_{isa}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(library.JaxinferInt8Matmul), "cpu")
    x, values, scale = _problem(7, 45, 85, seed=11)  # 7 rows: a 6-row tile (AVX-512) and a lone row
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((7, 85), jnp.float32))
    got = np.asarray(jax.jit(lambda *a: call(*a, max_threads=0))(x, pack_panels(values), scale))
    np.testing.assert_array_equal(got, _kernel(x, values, scale))


def _compiled_text(monkeypatch, kernels: str) -> tuple[str, np.ndarray]:
    monkeypatch.setenv("JAXINFER_CPU_KERNELS", kernels)
    x, values, scale = _problem(3, 64, 300, seed=5)
    w = QuantizedWeight.from_rows(values, scale, transposed=True, dtype_name="float32")
    # A new function per call: jit caches traces by function, and the choice is made when tracing.
    jitted = jax.jit(lambda x, w: quantized_matmul(x, w))
    return jitted.lower(x, w).compile().as_text(), np.asarray(jitted(x, w))


def test_quantized_matmul_takes_the_kernel_on_cpu_and_the_blocked_path_when_switched_off(
    monkeypatch,
):
    with_kernel, kernel_result = _compiled_text(monkeypatch, "1")
    without, xla_result = _compiled_text(monkeypatch, "0")
    assert f'custom_call_target="{TARGET}"' in with_kernel
    assert TARGET not in without and "convert" in without
    np.testing.assert_allclose(kernel_result, xla_result, rtol=1e-5, atol=1e-5)


def test_a_missing_compiler_or_a_failed_build_is_one_warning_and_no_library(
    monkeypatch, tmp_path, caplog
):
    monkeypatch.setenv(KERNEL_CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with caplog.at_level(logging.WARNING, logger="jaxinfer"):
        assert build_shared_library(SOURCE) is None
    assert "no C++ compiler found" in caplog.text
    monkeypatch.delenv("CXX")
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxinfer"):
        assert build_shared_library(broken) is None
    assert "building broken.cc failed" in caplog.text
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".*"))


def test_editing_a_header_beside_the_source_names_a_new_library(monkeypatch, tmp_path):
    """The cached library's name hashes the headers in the source's folder too (both kernels
    include cpu/lanes.h and cpu/tiles.h): after a header edit the library built before it must
    not be loaded, and undoing the edit finds that library again without a build."""
    sources = tmp_path / "cpu"
    shutil.copytree(SOURCE.parent, sources)
    monkeypatch.setenv(KERNEL_CACHE_ENV, str(tmp_path / "cache"))
    source, header = sources / SOURCE.name, sources / "lanes.h"
    original = header.read_text()
    first = build_shared_library(source, (jax.ffi.include_dir(),))
    assert first is not None
    built_at = first.stat().st_mtime_ns
    header.write_text(original + "\n// an edit the compiler ignores still names a new library\n")
    second = build_shared_library(source, (jax.ffi.include_dir(),))
    assert second is not None and second != first and second.exists()
    header.write_text(original)
    assert build_shared_library(source, (jax.ffi.include_dir(),)) == first
    assert first.stat().st_mtime_ns == built_at
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == sorted(
        [first.name, second.name]
    )


def test_when_the_kernel_is_unavailable_quantized_matmul_keeps_the_xla_path(monkeypatch):
    monkeypatch.setattr(kernel_module._LIBRARY, "load", lambda: None)  # a failed build
    assert not cpu_kernel_enabled()
    x, values, scale = _problem(2, 40, 10, seed=9)
    w = QuantizedWeight.from_rows(values, scale, transposed=True, dtype_name="float32")
    jitted = jax.jit(lambda x, w: quantized_matmul(x, w))
    assert TARGET not in jitted.lower(x, w).compile().as_text()
    _assert_within_float32_bound(np.asarray(jitted(x, w)), x, values, scale)


def test_a_bfloat16_model_gets_bfloat16_out_of_the_kernel_path():
    """x in the model's dtype is widened to float32 for the kernel; the result is rounded back to
    it (or kept float32 when asked, as the lm_head's logits are)."""
    x, values, scale = _problem(3, 48, 20, seed=13)
    w = QuantizedWeight.from_rows(values, scale, transposed=True, dtype_name="bfloat16")
    x16 = jnp.asarray(x, dtype=jnp.bfloat16)
    wide = np.asarray(x16.astype(jnp.float32))
    expected = _kernel(wide, values, scale)
    got = jax.jit(lambda x, w: quantized_matmul(x, w))(x16, w)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(expected, jnp.bfloat16)))
    logits = jax.jit(lambda x, w: quantized_matmul(x, w, jnp.float32))(x16, w)
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(logits), expected)
