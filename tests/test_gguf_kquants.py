"""`quantization="gguf"` with the K-quants Q4_K and Q6_K kept in their 256-element super-blocks
(issue 20; models/gguf_kquants.py, kernels/cpu/gguf_matmul.cc).

References nobody here wrote: gguf-py's `dequantize` (llama.cpp's own Python port of the formats)
for the values, numpy float64 for the products, and the engine's dequantize-first path for a tiny
Llama GGUF. gguf-py has no K-quant `quantize`, so the blocks are random bytes with finite float16
d / dmin (zeros, negatives and subnormals among them), or tests/gguf_kquant_encode.py's encoding.

Tolerances: the dequantized values must equal gguf-py's bit for bit (the products in them are
exact in float32: models/gguf_kquants.py); products stay within the float32 summation bound of
tests/gguf_block_checks.py, element by element. The tiny engine's logits, measured: the block
and float paths multiply the same float32 weights in another summation order (sums of 256 terms),
max |dlogit| 1.1e-4 over both prompts (max |logit| 14.4, ~7e-6 relative, as SmolLM2's Q4_1 in
tests/test_gguf_native.py); asserted <= 1e-3, greedy tokens equal. The module takes ~20 s on the
2-core machine with warm compilation and kernel caches (the first run builds the kernel and its
AVX2 / portable variants, ~25 s more, shared with tests/test_gguf_native.py).
"""

from __future__ import annotations

import ctypes

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import LLM, EngineConfig, SamplingParams
from jaxinfer.kernels.gguf_matmul import SOURCE, TARGETS
from jaxinfer.kernels.native_build import build_shared_library
from jaxinfer.models.gguf_blocks import LAYOUTS, GGUFBlocks
from jaxinfer.models.gguf_weight import GGUFBlockWeight, dequantize_blocks, gguf_block_matmul
from tests.checkpoints import tiny_checkpoint
from tests.gguf_block_checks import assert_within_float32_bound, block_weight, kernel_product
from tests.gguf_checkpoint import write_llama_gguf
from tests.gguf_kquant_encode import ENCODERS
from tests.parity import engine_prefill_logits

K_QUANTS = ("Q4_K", "Q6_K")
on_cpu = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the GGUF block kernels are registered for XLA:CPU"
)


def _stored(qtype: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random K-quant bytes [rows, cols / 256 * block bytes] with finite float16 d (and dmin)."""
    gen = np.random.default_rng(seed)
    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    blocks = gen.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    halves = (0.01 * gen.standard_normal((rows, cols // 256, 2))).astype(np.float16)
    halves.flat[::7] = np.float16(3e-7)  # subnormal in float16 (the portable build's own convert)
    halves.flat[1::11] = np.float16(-6e-8)
    halves.flat[2::13] = 0
    at = LAYOUTS[qtype].scale  # d, then Q4_K's dmin right after it
    width = 4 if qtype == "Q4_K" else 2
    blocks[..., at : at + width] = halves.view(np.uint8)[..., :width]
    return blocks.reshape(rows, -1)


def _gguf_values(stored: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[qtype])


def _bits(values) -> np.ndarray:
    return np.asarray(values, np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_split_keeps_the_files_bytes_and_dequantizes_as_gguf_py(qtype):
    stored = _stored(qtype, 7, 512, seed=1)
    blocks = GGUFBlocks.split(stored, qtype)
    assert blocks.shape == (7, 512) and blocks.nbytes == stored.nbytes
    # Put every array back where the layout says it came from: each byte exactly once.
    layout, size = LAYOUTS[qtype], stored.shape[1] // 2
    rebuilt = np.zeros((7, 2, size), np.uint8)
    covered = np.zeros(size, int)
    places = [(blocks.quants, layout.quants), (blocks.sub_scales, layout.sub_scales)]
    places += [(blocks.scales, (layout.scale, layout.scale + 2))]
    if layout.min is not None:
        places.append((blocks.mins, (layout.min, layout.min + 2)))
    assert (blocks.mins is not None) == (qtype == "Q4_K")
    for array, (start, stop) in places:
        rebuilt[..., start:stop] = np.ascontiguousarray(array).view(np.uint8).reshape(7, 2, -1)
        covered[start:stop] += 1
    assert (covered == 1).all()
    np.testing.assert_array_equal(rebuilt.reshape(7, -1), stored)

    values = _gguf_values(stored, qtype)
    assert np.isfinite(values).all() and (values != 0).mean() > 0.8  # not a vacuous test
    np.testing.assert_array_equal(_bits(blocks.dequantize()), _bits(values))
    on_device = jax.jit(dequantize_blocks, static_argnums=0)(qtype, *blocks.arrays)
    np.testing.assert_array_equal(_bits(on_device), _bits(values))
    # Rows of a token table, gathered and dequantized on the device; rows permuted on the host.
    ids = jnp.asarray([[3, 0], [6, 3]])
    table = block_weight(blocks, transposed=False)
    gathered = jax.jit(lambda t, i: t[i])(table, ids)
    np.testing.assert_array_equal(_bits(gathered), _bits(values[np.asarray(ids)]))
    reversed_rows = blocks.map_rows(lambda a: a[::-1]).dequantize()
    np.testing.assert_array_equal(_bits(reversed_rows), _bits(values[::-1]))


@on_cpu
@pytest.mark.parametrize("qtype", K_QUANTS)
def test_the_kernel_decodes_gguf_pys_values(qtype):
    """x = I reads the kernel's decoded weights back: each sum is one weight plus exact zeros."""
    stored = _stored(qtype, 21, 512, seed=2)
    decoded = kernel_product(GGUFBlocks.split(stored, qtype), np.eye(512, dtype=np.float32))
    np.testing.assert_array_equal(decoded, _gguf_values(stored, qtype).T)


@on_cpu
@pytest.mark.parametrize("qtype", K_QUANTS)
@pytest.mark.parametrize("rows", [1, 3, 16, 65])
@pytest.mark.parametrize(("in_features", "out_features"), [(256, 3), (512, 333), (1536, 576)])
def test_kernel_matches_float64_within_the_float32_summation_bound(
    qtype, rows, in_features, out_features
):
    stored = _stored(qtype, out_features, in_features, seed=rows + in_features)
    x = np.random.default_rng(rows).standard_normal((rows, in_features)).astype(np.float32)
    got = kernel_product(GGUFBlocks.split(stored, qtype), x)
    assert_within_float32_bound(got, x, _gguf_values(stored, qtype))


@on_cpu
@pytest.mark.parametrize("qtype", K_QUANTS)
def test_a_rows_result_is_bitwise_the_same_for_any_row_count_and_thread_count(qtype):
    """Row tiles of 4, chunks of 64 rows and channel blocks must not change a row's sums."""
    blocks = GGUFBlocks.split(_stored(qtype, 700, 512, seed=3), qtype)
    x = np.random.default_rng(4).standard_normal((130, 512)).astype(np.float32)
    whole = kernel_product(blocks, x)
    for count in (1, 2, 3, 4, 5, 17, 64, 65):
        np.testing.assert_array_equal(kernel_product(blocks, x[:count]), whole[:count], f"{count}")
    for threads in (1, 2):
        np.testing.assert_array_equal(kernel_product(blocks, x, max_threads=threads), whole)


@on_cpu
@pytest.mark.parametrize(
    ("isa", "flags"),
    [
        ("avx2", ("-mno-avx512f",)),
        ("portable", ("-mno-avx2", "-mno-fma", "-mno-avx512f", "-mno-f16c")),
    ],
)
def test_other_instruction_sets_give_the_same_bits(isa, flags):
    """The same builds test_gguf_native builds (cached): their K-quant paths against the host's,
    on x = I too (the decoded weights themselves)."""
    path = build_shared_library(SOURCE, (jax.ffi.include_dir(),), extra_flags=flags)
    assert path is not None
    library = ctypes.CDLL(str(path))
    library.JaxinferGgufMatmulIsa.restype = ctypes.c_char_p
    assert library.JaxinferGgufMatmulIsa().decode() == isa
    x = np.random.default_rng(6).standard_normal((7, 512)).astype(np.float32)
    x = np.concatenate([x, np.eye(512, dtype=np.float32)])
    for qtype in K_QUANTS:
        target, symbol = TARGETS[qtype]
        name = f"{target}_test_{isa}"
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), "cpu")
        stored = _stored(qtype, 21, 512, seed=5)
        blocks = GGUFBlocks.split(stored, qtype)
        call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((x.shape[0], 21), jnp.float32))
        arrays = [a for a in blocks.arrays if a is not None]
        got = np.asarray(jax.jit(lambda *a, c=call: c(*a, max_threads=0))(x, *arrays))
        expected = kernel_product(blocks, x)
        np.testing.assert_array_equal(got, expected, err_msg=qtype)
        assert_within_float32_bound(expected, x, _gguf_values(stored, qtype))


@on_cpu
@pytest.mark.parametrize("qtype", K_QUANTS)
def test_the_jnp_path_without_the_kernel_is_correct_too(monkeypatch, qtype):
    """`JAXINFER_CPU_KERNELS=0` (and any other backend): 128 channels dequantized at a time (the
    weights themselves are gguf-py's bitwise: the split test above)."""
    stored = _stored(qtype, 300, 512, seed=8)  # two whole steps of 128 and a tail
    blocks, values = GGUFBlocks.split(stored, qtype), _gguf_values(stored, qtype)
    x = np.random.default_rng(9).standard_normal((3, 512)).astype(np.float32)
    for kernels in ("1", "0"):
        monkeypatch.setenv("JAXINFER_CPU_KERNELS", kernels)
        jitted = jax.jit(lambda x, w: gguf_block_matmul(x, w))  # a new function: a new trace
        compiled = jitted.lower(x, block_weight(blocks)).compile().as_text()
        assert (f'custom_call_target="{TARGETS[qtype][0]}"' in compiled) == (kernels == "1")
        assert_within_float32_bound(np.asarray(jitted(x, block_weight(blocks))), x, values)


def test_the_test_encoder_round_trips_through_gguf_py():
    """tests/gguf_kquant_encode.py writes what gguf-py reads: 4-bit steps of a 32-weight range
    (Q4_K) and 6-bit steps of a 16-weight range (Q6_K) keep the relative RMS error near
    step / sqrt(12) / std (measured 0.077 and 0.019 on Gaussian rows)."""
    matrix = 0.2 * np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    for qtype, limit in (("Q4_K", 0.1), ("Q6_K", 0.03)):
        back = _gguf_values(ENCODERS[qtype](matrix), qtype)
        error = np.sqrt(np.mean((back - matrix) ** 2) / np.mean(matrix**2))
        assert error < limit, (qtype, error)


@pytest.fixture(scope="module")
def tiny_kquant_gguf(tmp_path_factory):
    """A tiny Llama whose every width is 256 (K-quant rows are whole super-blocks), stored as
    llama.cpp's Q4_K_M mixes: Q4_K, with attn_v, ffn_down and the untied output in Q6_K."""
    checkpoint = tiny_checkpoint("llama", hidden_size=256, intermediate_size=256, head_dim=64)
    file = tmp_path_factory.mktemp("kquant-gguf") / "tiny-Q4_K_M.gguf"
    six = {"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}
    return checkpoint, write_llama_gguf(checkpoint, file, matrix_type="Q4_K", matrix_types=six)


def test_a_tiny_q4_k_m_gguf_in_blocks_matches_its_dequantized_self(tiny_kquant_gguf):
    checkpoint, file = tiny_kquant_gguf
    prompts = [[5, 17, 300, 2], list(range(40, 73))]
    base = {"tokenizer": str(checkpoint), "max_model_len": 64, "num_kv_blocks": 32}
    runs = []
    for quantization in (None, "gguf"):
        llm = LLM(EngineConfig(model=str(file), quantization=quantization, **base))
        try:
            params = llm.llm_engine.model.params
            if quantization == "gguf":
                layer = params["layers"][1]
                assert isinstance(layer["q"], GGUFBlockWeight) and layer["q"].qtype == "Q4_K"
                assert layer["v"].qtype == "Q6_K" and layer["down"].qtype == "Q6_K"
                assert params["embed"].qtype == "Q4_K" and params["lm_head"].qtype == "Q6_K"
            sampling = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling)
            tokens = [list(o.outputs[0].token_ids) for o in outputs]
            runs.append((tokens, engine_prefill_logits(llm, prompts)))
        finally:
            llm.shutdown()
    (float_tokens, float_logits), (block_tokens, block_logits) = runs
    assert block_tokens == float_tokens
    for ours, reference in zip(block_logits, float_logits, strict=True):
        np.testing.assert_allclose(ours, reference, atol=1e-3, rtol=0)
