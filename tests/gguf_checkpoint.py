"""A tiny Llama GGUF written from a tiny Hugging Face checkpoint, as llama.cpp's converter would.

Float32 tensors under llama.cpp's names, q/k rows permuted for its rotary layout, and the config
under its metadata keys; no vocabulary (pass `tokenizer=` the Hugging Face folder). Loading it
must give back the checkpoint's own weights: the reader undoes the permutation.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from tests.gguf_kquant_encode import ENCODERS as K_ENCODERS

_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rows -> GGUF rotary rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        index, rest = stem[len("model.layers.") :].split(".", 1)
        return f"blk.{index}.{_LAYER_NAMES[rest]}.{kind}"
    return f"{_GLOBAL_NAMES[stem]}.{kind}"


def _quantize(array: np.ndarray, qtype: str) -> np.ndarray:
    if qtype in K_ENCODERS:  # gguf-py has no quantize for the K-quants
        return K_ENCODERS[qtype](array)
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType[qtype])


def write_llama_gguf(
    checkpoint: Path,
    file: Path,
    *,
    matrix_type: str = "F32",
    matrix_types: dict[str, str] | None = None,
    **metadata: int,
) -> Path:
    """`checkpoint` (a float32 Llama folder from tests/checkpoints.py) as one GGUF `file`.

    `matrix_type`: "Q8_0", "Q4_0", "Q4_K", ...: every 2-D tensor quantized to that ggml type by
    gguf-py (the K-quants by tests/gguf_kquant_encode.py), as llama.cpp's quantize would store it;
    norms stay F32. `matrix_types`: a type per llama.cpp tensor kind instead (`{"attn_v": "Q6_K",
    "output": "Q6_K"}`: llama.cpp's Q4_K_M mixes Q4_K and Q6_K that way).

    `metadata`: values written instead of the config's, by llama.cpp's key after "llama."
    (`block_count=3`; dotted keys through a dict: `**{"attention.head_count": 0}`), to make a file
    whose metadata disagrees with its tensors."""
    config = json.loads((checkpoint / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    values = {
        "context_length": config["max_position_embeddings"],
        "block_count": config["num_hidden_layers"],
        "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"],
        "attention.head_count": heads,
        "attention.head_count_kv": kv_heads,
        "rope.dimension_count": config["head_dim"],
        "vocab_size": config["vocab_size"],
        **metadata,
    }
    writer = gguf.GGUFWriter(str(file), "llama")
    for key, value in values.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    for hf_name, array in sorted(load_file(checkpoint / "model.safetensors").items()):
        if hf_name.endswith("q_proj.weight"):
            array = _permute(array, heads)
        elif hf_name.endswith("k_proj.weight"):
            array = _permute(array, kv_heads)
        array = np.ascontiguousarray(array, np.float32)
        name = _gguf_name(hf_name)
        kind = name.split(".")[-2]  # blk.0.attn_v.weight -> attn_v, output.weight -> output
        qtype = (matrix_types or {}).get(kind, matrix_type)
        if qtype != "F32" and array.ndim == 2:
            ggml_type = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, _quantize(array, qtype), None, ggml_type)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file
