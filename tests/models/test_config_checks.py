"""config.json values are checked before anything is built from them, naming the file and field
(models/config_checks.py), and a length the config leaves out is logged with the default used."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time

import pytest

from jaxinfer import LLM
from tests.gguf_checkpoint import write_llama_gguf


def _with_config(tiny_llama, tmp_path, **changes):
    """A copy of the tiny checkpoint whose config.json has `changes` (None: the key removed)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "field, value",
    [("max_position_embeddings", -5), ("num_attention_heads", 0), ("hidden_size", 64.5)],
)
def test_bad_sizes_name_config_json_and_the_field(tiny_llama, tmp_path, field, value):
    folder = _with_config(tiny_llama, tmp_path, **{field: value})
    where = re.escape(str(folder / "config.json"))
    with pytest.raises(ValueError, match=f"{where}: {field}={value} must be a positive integer"):
        LLM(model=str(folder))


def test_kv_heads_must_divide_heads(tiny_llama, tmp_path):
    folder = _with_config(tiny_llama, tmp_path, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of .*=3"):
        LLM(model=str(folder))


def test_layer_count_against_the_tensors_before_any_layer_is_built(tiny_llama, tmp_path):
    folder = _with_config(tiny_llama, tmp_path, num_hidden_layers=10**6)
    started = time.perf_counter()
    with pytest.raises(
        ValueError, match=r"num_hidden_layers=1000000, but the checkpoint's tensors hold 2 layers"
    ):
        LLM(model=str(folder))
    assert time.perf_counter() - started < 30  # was minutes and gigabytes: it fails up front


def test_absurd_max_position_embeddings_is_refused_at_start_naming_it(tiny_llama, tmp_path):
    """vLLM's rule: max_model_len defaults to the config's length, and an engine whose KV cache
    cannot hold one such sequence is refused at start-up, with the numbers."""
    folder = _with_config(tiny_llama, tmp_path, max_position_embeddings=2**40)
    with pytest.raises(
        ValueError,
        match=r"max_model_len was not given, so it is the model's max_position_embeddings="
        rf"{2**40} .*the KV cache holds \d+ tokens .*lower max_model_len to at most \d+",
    ):
        LLM(model=str(folder), max_num_seqs=2)
    # A length the user chose is all that matters then.
    with LLM(model=str(folder), max_model_len=64, num_kv_blocks=8, max_num_seqs=2) as llm:
        assert llm.config.max_model_len == 64


def test_missing_length_logs_the_default_used(tiny_llama, tmp_path, caplog):
    folder = _with_config(tiny_llama, tmp_path, max_position_embeddings=None)
    caplog.set_level(logging.WARNING, logger="jaxinfer")
    with LLM(model=str(folder), num_kv_blocks=300, max_num_seqs=2) as llm:
        assert llm.config.max_model_len == 2048  # LlamaConfig's default
    (record,) = [r for r in caplog.records if "max_position_embeddings" in r.getMessage()]
    assert record.getMessage().startswith(
        f"{folder / 'config.json'} states no max_position_embeddings; using the config "
        "class's default 2048"
    )


def test_gguf_metadata_is_checked_the_same_way(tiny_llama, tmp_path):
    file = write_llama_gguf(tiny_llama, tmp_path / "zero-heads.gguf", **{"attention.head_count": 0})
    with pytest.raises(
        ValueError, match=re.escape(f"{file} (GGUF metadata): num_attention_heads=0 must be")
    ):
        LLM(model=str(file), tokenizer=str(tiny_llama))
    file = write_llama_gguf(tiny_llama, tmp_path / "deep.gguf", block_count=10**6)
    with pytest.raises(ValueError, match=re.escape(f"{file}: num_hidden_layers=1000000, but")):
        LLM(model=str(file), tokenizer=str(tiny_llama))
