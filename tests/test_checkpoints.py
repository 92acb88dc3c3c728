"""Sanity checks of the tiny-checkpoint helper itself (tests/checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.checkpoints import (
    FAMILIES,
    build_checkpoint,
    hf_greedy,
    hf_model,
    hf_prefill_logits,
    tiny_checkpoint,
)

PROMPT = list(range(10, 30))  # 20 tokens


def _tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names.update(f.keys())
    return names


def test_every_family_loads_offline(tiny_family: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_family, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_family, local_files_only=True)
    config = model.config
    assert config.model_type == tiny_family.name.split("-")[0]
    assert config.vocab_size == len(tokenizer) == 512
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        64,
        4,
        2,
    )
    assert config.head_dim == 16
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    assert getattr(config, "sliding_window", None) is None
    generation = json.loads((tiny_family / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    # AutoTokenizer picks Qwen2Tokenizer for model_type "qwen2", which rebuilds the pipeline around
    # the vocab: every family must still encode exactly like the raw tokenizer.json.
    raw = Tokenizer.from_file(str(tiny_family / "tokenizer.json"))
    text = "It's 2024:\n\n  don't   RUN!! wörld 🙂 <|im_start|>user<|im_end|>"
    assert tokenizer(text)["input_ids"] == raw.encode(text).ids
    names = _tensor_names(tiny_family)
    if config.model_type == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in names
    if config.model_type == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in names


def test_tokenizer_round_trip_and_chat_template(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama, local_files_only=True)
    text = "The quick brown fox, 42 times: wörld 🙂"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    messages = [{"role": "user", "content": "Hello there."}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|bos|><|im_start|>user\nHello there.<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert chat_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_shards_write_an_index(tmp_path: Path) -> None:
    folder = build_checkpoint(tmp_path, "qwen3", shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) >= 2
    assert set(index["weight_map"].values()) == {f.name for f in files}
    single = tiny_checkpoint("qwen3")
    assert set(index["weight_map"]) == _tensor_names(single)
    logits = hf_prefill_logits(folder, PROMPT)
    np.testing.assert_array_equal(logits, hf_prefill_logits(single, PROMPT))


def test_llama3_rope_round_trips() -> None:
    folder = tiny_checkpoint("llama", rope_scaling="llama3")
    saved = json.loads((folder / "config.json").read_text())["rope_parameters"]
    expected = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    assert saved == expected
    assert AutoConfig.from_pretrained(folder).rope_parameters == expected
    model = hf_model(folder)
    assert model.model.rotary_emb.rope_type == "llama3"
    # Same weights (same seed), different rope: the logits must differ.
    plain = hf_prefill_logits(tiny_checkpoint("llama"), PROMPT)
    assert not np.allclose(hf_prefill_logits(model, PROMPT), plain)


def test_tied_embeddings_store_no_lm_head() -> None:
    folder = tiny_checkpoint("llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in _tensor_names(folder)
    assert "lm_head.weight" in _tensor_names(tiny_checkpoint("llama"))
    model = hf_model(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_bfloat16_checkpoint() -> None:
    folder = tiny_checkpoint("qwen2", dtype="bfloat16")
    tensors = load_file(next(folder.glob("*.safetensors")))
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_greedy_is_exact_and_varied(family: str) -> None:
    model = hf_model(tiny_checkpoint(family))
    tokens = hf_greedy(model, PROMPT, max_new_tokens=16)
    assert len(tokens) == 16
    assert len(set(tokens)) > 1
    # Greedy means argmax of the full-prefix logits at every step.
    sequence = list(PROMPT)
    for _ in range(4):
        sequence.append(int(hf_prefill_logits(model, sequence)[-1].argmax()))
    assert sequence[len(PROMPT) :] == tokens[:4]


def test_hf_greedy_does_not_stop_at_eos() -> None:
    model = hf_model(tiny_checkpoint("llama"))
    tokens = hf_greedy(model, PROMPT, max_new_tokens=8)
    # Pretend the first greedy token is EOS: generation must neither stop nor avoid it.
    model.generation_config.eos_token_id = tokens[0]
    assert hf_greedy(model, PROMPT, max_new_tokens=8) == tokens
    assert model.generation_config.eos_token_id == tokens[0]  # restored


def test_seed_changes_weights_and_cache_reuses_folders() -> None:
    assert tiny_checkpoint("mistral") == tiny_checkpoint("mistral")
    other = tiny_checkpoint("mistral", seed=1)
    assert other != tiny_checkpoint("mistral")
    a = hf_prefill_logits(tiny_checkpoint("mistral"), PROMPT)
    assert not np.allclose(a, hf_prefill_logits(other, PROMPT))
