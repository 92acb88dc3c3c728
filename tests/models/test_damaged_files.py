"""Damaged checkpoint files fail with a ValueError naming the file and what is wrong with it,
never with a library's bare struct.error, reshape error, UnicodeDecodeError or KeyError."""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest

from jaxinfer import LLM
from jaxinfer.models.gguf_metadata import read_gguf_metadata
from tests.gguf_checkpoint import write_llama_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory):
    return write_llama_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _copy_folder(tiny_llama, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_llama, folder)
    return folder


def test_gguf_cut_in_half(tiny_gguf, tiny_llama, tmp_path):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "half.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=re.escape(str(cut)) + r": truncated GGUF file: it has"
    ) as e:
        LLM(model=str(cut), tokenizer=str(tiny_llama))
    assert f"it has {len(data) // 2} bytes but its tensor table needs {len(data)}" in str(e.value)


def test_gguf_cut_inside_its_header(tiny_gguf, tiny_llama, tmp_path):
    header_end = min(t.offset for t in read_gguf_metadata(tiny_gguf).tensors)
    cut = tmp_path / "header.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: header_end // 2])
    with pytest.raises(
        ValueError, match=re.escape(str(cut)) + ": truncated or corrupt GGUF header: the file ends"
    ):
        LLM(model=str(cut), tokenizer=str(tiny_llama))


def test_tokenizer_json_of_random_bytes(tiny_llama, tmp_path):
    folder = _copy_folder(tiny_llama, tmp_path)
    noise = random.Random(0).randbytes(4096)
    (folder / "tokenizer.json").write_bytes(b"\xff" + noise)
    file = re.escape(str(folder / "tokenizer.json"))
    with pytest.raises(ValueError, match=file + " is not a valid tokenizer.json: .*UTF-8"):
        LLM(model=str(folder))


def test_tokenizer_json_of_the_wrong_shape(tiny_llama, tmp_path):
    folder = _copy_folder(tiny_llama, tmp_path)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    file = re.escape(str(folder / "tokenizer.json"))
    with pytest.raises(ValueError, match=file + " is not a valid tokenizer.json: Missing vocab"):
        LLM(model=str(folder))
