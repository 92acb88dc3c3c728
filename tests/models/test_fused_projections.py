"""Fused q/k/v and gate/up of quantized weights (models/fused_projections.py): the fused product
is the separate products side by side, bit for bit, on the kernels the engine calls (CPU: int8
and GGUF kernels behind `jax.ffi`), and what cannot be fused is left apart.

Bitwise, not within a tolerance: every output channel of a quantized weight has its own scale or
blocks and the kernels sum a channel's products in a fixed order, so fusing must change no value
(the engine's int8 and GGUF tests then compare the fused models with transformers' references).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models.fused_projections import fuse_projections
from jaxinfer.models.gguf_weight import GGUFBlockWeight, gguf_block_matmul
from jaxinfer.models.quantization import QuantizedWeight, quantize_int8, quantized_matmul

IN = 64
gen = np.random.default_rng(7)


def _int8(out_features: int) -> QuantizedWeight:
    values, scale = quantize_int8(gen.standard_normal((out_features, IN)).astype(np.float32))
    return QuantizedWeight.from_rows(values, scale, transposed=True, dtype_name="float32")


def _gguf(qtype: str, out_features: int) -> GGUFBlockWeight:
    blocks = IN // 32
    scales = jnp.asarray(gen.uniform(0.01, 0.1, (out_features, blocks)).astype(np.float16))
    if qtype == "Q8_0":
        quants = gen.integers(-127, 128, (out_features, IN), dtype=np.int8)
        mins = None
    else:  # Q4_1: two 4-bit values per byte, a float16 min per block
        quants = gen.integers(0, 256, (out_features, blocks * 16), dtype=np.uint8)
        mins = jnp.asarray(gen.uniform(-0.5, 0.0, (out_features, blocks)).astype(np.float16))
    return GGUFBlockWeight(
        quants=jnp.asarray(quants),
        scales=scales,
        mins=mins,
        qtype=qtype,
        transposed=True,
        dtype_name="float32",
    )


def _products_side_by_side(matmul, weights, x):
    return np.concatenate([np.asarray(matmul(x, w)) for w in weights], axis=-1)


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_fused_products_equal_the_separate_ones_bitwise(rows):
    """q 40 rows and k/v 24: none fills a panel of 64, so the fused panels are packed anew."""
    q, k, v, gate, up = _int8(40), _int8(24), _int8(24), _int8(96), _int8(96)
    biases = {
        f"{n}_bias": jnp.asarray(gen.standard_normal(w.shape[1]), jnp.float32)
        for n, w in (("q", q), ("k", k), ("v", v))
    }
    layer = {"q": q, "k": k, "v": v, "gate": gate, "up": up, "norm": jnp.ones(IN), **biases}
    (fused,) = fuse_projections({"layers": (layer,), "embed": "kept"})["layers"]
    assert sorted(fused) == ["gate_up", "norm", "qkv", "qkv_bias"]
    assert fused["qkv"].values.shape == (2, IN, 64) and fused["qkv"].shape == (IN, 88)
    x = jnp.asarray(gen.standard_normal((rows, IN)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(quantized_matmul(x, fused["qkv"])),
        _products_side_by_side(quantized_matmul, (q, k, v), x),
    )
    np.testing.assert_array_equal(
        np.asarray(quantized_matmul(x, fused["gate_up"])),
        _products_side_by_side(quantized_matmul, (gate, up), x),
    )
    np.testing.assert_array_equal(
        np.asarray(fused["qkv_bias"]), np.concatenate([np.asarray(b) for b in biases.values()])
    )


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_gguf_fused_products_equal_the_separate_ones_bitwise(qtype):
    q, k, v = _gguf(qtype, 64), _gguf(qtype, 32), _gguf(qtype, 32)
    (fused,) = fuse_projections({"layers": ({"q": q, "k": k, "v": v},)})["layers"]
    assert list(fused) == ["qkv"] and fused["qkv"].qtype == qtype
    x = jnp.asarray(gen.standard_normal((3, IN)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(gguf_block_matmul(x, fused["qkv"])),
        _products_side_by_side(gguf_block_matmul, (q, k, v), x),
    )


def test_what_cannot_be_fused_stays_apart():
    mixed_types = {"q": _gguf("Q4_1", 64), "k": _gguf("Q8_0", 32), "v": _gguf("Q4_1", 32)}
    some_biases = {"q": _int8(64), "k": _int8(32), "v": _int8(32), "q_bias": jnp.zeros(64)}
    floats = {"gate": jnp.ones((IN, 96)), "up": jnp.ones((IN, 96))}  # float weights: TP splits them
    mixed_kinds = {"gate": _int8(96), "up": jnp.ones((IN, 96))}
    no_v = {"q": _int8(64), "k": _int8(32)}
    layers = (mixed_types, some_biases, floats, mixed_kinds, no_v)
    for before, after in zip(layers, fuse_projections({"layers": layers})["layers"], strict=True):
        assert sorted(after) == sorted(before)
        assert all(after[name] is before[name] for name in before)
