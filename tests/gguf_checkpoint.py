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


def write_llama_gguf(
    checkpoint: Path, file: Path, *, matrix_type: str = "F32", **metadata: int
) -> Path:
    """`checkpoint` (a float32 Llama folder from tests/checkpoints.py) as one GGUF `file`.

    `matrix_type`: "Q8_0", "Q4_0", ...: every 2-D tensor quantized to that ggml type by gguf-py
    (as llama.cpp's quantize would store it); norms stay F32.

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
        if matrix_type != "F32" and array.ndim == 2:
            qtype = gguf.GGMLQuantizationType[matrix_type]
            writer.add_tensor(_gguf_name(hf_name), gguf.quants.quantize(array, qtype), None, qtype)
        else:
            writer.add_tensor(_gguf_name(hf_name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file
