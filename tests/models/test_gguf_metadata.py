"""Tests for jaxinfer.models.gguf_metadata: GGUF config and tokenizer without torch (CPU only).

The references are transformers' own ``gguf_file=`` loaders (which need torch, in the test extra);
the torch-free path runs in a subprocess where ``import torch`` fails.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxinfer.models import gguf_metadata
from jaxinfer.models.gguf_reader import load_gguf_config, load_gguf_tokenizer, read_gguf_tensors

ROOT = Path(__file__).resolve().parents[2]

# Texts whose encodings must match transformers': spaces, newlines, tabs, specials, non-ASCII.
TEXTS = [
    "The capital of France is",
    "  two leading spaces\n\tand a tab",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "émoji 🤖, 中文, numbers 1234567 and code: def f(x): return x**2",
    "",
]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_metadata_matches_gguf_reader(tmp_path):
    """Every value type, a custom alignment and the tensor table, as gguf.GGUFReader reads them."""
    path = tmp_path / "kinds.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    writer.add_uint8("k.u8", 200)
    writer.add_int16("k.i16", -300)
    writer.add_uint32("k.u32", 4_000_000_000)
    writer.add_int64("k.i64", -(2**40))
    writer.add_float32("k.f32", 1e-5)
    writer.add_float64("k.f64", 0.1)
    writer.add_bool("k.bool", True)
    writer.add_string("k.str", "héllo")
    writer.add_array("k.ints", [1, -2, 3])
    writer.add_array("k.strs", ["a", "bé", ""])
    writer.add_array("k.skipped", ["x", "yy"])
    rng = np.random.default_rng(0)
    tensors = {
        "output_norm.weight": rng.standard_normal(64).astype(np.float32),
        "blk.0.ffn_up.weight": rng.standard_normal((6, 64)).astype(np.float16),
    }
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    meta = gguf_metadata.read_gguf_metadata(path, string_arrays=("k.strs",))
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the header's own counts, not metadata
        if key == "k.skipped":
            assert key not in meta.values and meta.array_lengths[key] == 2
            continue
        assert meta.values[key] == field.contents(), key
    assert meta.values["k.u8"] == 200 and meta.values["k.str"] == "héllo"
    assert meta.architecture == "llama"
    assert meta.tensor_names == tuple(t.name for t in reader.tensors)
    for ours, theirs in zip(meta.tensors, reader.tensors, strict=True):
        assert ours.offset == theirs.data_offset, ours.name
        assert ours.shape == tuple(int(d) for d in theirs.shape), ours.name
        assert ours.ggml_type == int(theirs.tensor_type), ours.name


def test_rejects_non_gguf_and_other_architectures(tmp_path):
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="magic"):
        gguf_metadata.read_gguf_metadata(bad)

    path = tmp_path / "g.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'gpt2'.*supported architectures: llama"):
        gguf_metadata.gguf_config_dict(gguf_metadata.read_gguf_metadata(path))

    # A download cut off inside the header says so instead of failing deep in struct.
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        gguf_metadata.read_gguf_metadata(cut)


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return smollm2_gguf.parent, smollm2_gguf


@pytest.fixture(scope="module")
def hf_config(smol):
    """transformers' own config for the file (its GGUF reader, with torch)."""
    from transformers import AutoConfig

    folder, file = smol
    return AutoConfig.from_pretrained(str(folder), gguf_file=file.name)


@pytest.fixture(scope="module")
def hf_tokenizer(smol):
    from transformers import AutoTokenizer

    folder, file = smol
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=file.name)


def test_real_config_equals_transformers(smol, hf_config):
    theirs = hf_config
    ours = load_gguf_config(*smol)
    assert type(ours) is type(theirs)
    assert ours.to_dict() == theirs.to_dict()
    assert ours.eos_token_id == 2 and ours.tie_word_embeddings


def test_real_tokenizer_equals_transformers(smol, hf_tokenizer):
    theirs = hf_tokenizer
    ours = load_gguf_tokenizer(*smol)
    assert type(ours) is type(theirs)
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    assert str(ours.added_tokens_decoder) == str(theirs.added_tokens_decoder)
    for attr in ("special_tokens_map", "all_special_ids", "chat_template", "eos_token_id"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.add_bos_token == theirs.add_bos_token
    for text in TEXTS:
        for special in (True, False):
            ids = theirs(text, add_special_tokens=special)["input_ids"]
            assert ours(text, add_special_tokens=special)["input_ids"] == ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            )
    render = {"tokenize": False, "add_generation_prompt": True}
    assert ours.apply_chat_template(MESSAGES, **render) == theirs.apply_chat_template(
        MESSAGES, **render
    )


# Run with torch unimportable (as after `pip install -e .` on a machine without torch): load the
# config, tokenizer, eos ids and weights through the engine's loader and print what the parent
# compares with its own (torch-available) transformers references.
_NO_TORCH_SCRIPT = """
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError, find_spec finds nothing
import hashlib, json
from pathlib import Path
import jax
import numpy as np
from jaxinfer.models import loader

file = Path(sys.argv[1])
source = loader.CheckpointSource.resolve(str(file))
config = loader.load_hf_config(source)
tokenizer = loader.load_tokenizer(source)
model = loader.load_model(source, "float32")
leaves = jax.tree_util.tree_leaves(model.params)
embedding = hashlib.sha256(np.asarray(model.params["embed"]).tobytes()).hexdigest()
texts = json.loads(sys.argv[2])
print(json.dumps({
    "config": config.to_dict(),
    "encodings": [tokenizer(t)["input_ids"] for t in texts],
    "decoded": [tokenizer.decode(tokenizer(t)["input_ids"]) for t in texts],
    "chat": tokenizer.apply_chat_template(
        json.loads(sys.argv[3]), tokenize=False, add_generation_prompt=True
    ),
    "eos": list(loader.load_eos_token_ids(source, config, tokenizer)),
    "num_weights": len(leaves),
    "embedding": embedding,
    "torch_loaded": sys.modules.get("torch") is not None,
}))
"""


def test_gguf_loads_without_torch(smol, hf_config, hf_tokenizer):
    """Config, tokenizer and weights of the default model load with torch unimportable, equal to
    transformers' config and tokenizer (torch present) and to the reader's weights."""
    file = smol[1]
    script = textwrap.dedent(_NO_TORCH_SCRIPT)
    args = [str(file), json.dumps(TEXTS), json.dumps(MESSAGES)]
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert not got["torch_loaded"]

    config, tokenizer = hf_config, hf_tokenizer
    assert got["config"] == json.loads(json.dumps(config.to_dict()))
    assert got["encodings"] == [tokenizer(t)["input_ids"] for t in TEXTS]
    assert got["decoded"] == [tokenizer.decode(tokenizer(t)["input_ids"]) for t in TEXTS]
    chat = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert got["chat"] == chat
    assert got["eos"] == [2]

    # Every weight loaded (30 layers x 9 tensors, the embedding, the final norm; lm_head is tied),
    # and the embedding bit for bit as the reader gives it with torch present.
    assert got["num_weights"] == 30 * 9 + 2
    embedding = read_gguf_tensors(file, config)["model.embed_tokens.weight"]
    assert got["embedding"] == hashlib.sha256(embedding.tobytes()).hexdigest()
