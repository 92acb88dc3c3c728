"""Llama-family models through the paged engine vs transformers (PyTorch, float32).

Tolerance: prefill logits within 1e-4 absolute of transformers (both float32); greedy tokens equal.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxinfer import Engine, EngineConfig
from tests.checkpoints import hf_model, hf_prefill_logits, tiny_checkpoint
from tests.parity import engine_prefill_logits

LOGIT_ATOL = 1e-4

rng = np.random.default_rng(0)
PROMPTS = [rng.integers(5, 512, size=n).tolist() for n in (1, 7, 33, 120)]

VARIANTS = {
    "llama-gqa": {"family": "llama"},
    "llama-tied-mha": {"family": "llama", "tie_word_embeddings": True, "num_kv_heads": 4},
    "llama-mqa-llama3-rope": {"family": "llama", "num_kv_heads": 1, "rope_scaling": "llama3"},
    "llama-sharded": {"family": "llama", "shards": 2, "num_hidden_layers": 3},
    "mistral": {"family": "mistral"},
    "qwen2-bias": {"family": "qwen2"},
    "qwen3-qknorm": {"family": "qwen3", "tie_word_embeddings": True},
}


def _engine(path, **kw) -> Engine:
    return Engine(
        EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64, max_model_len=256, **kw)
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_logits_match_transformers(variant):
    path = tiny_checkpoint(**VARIANTS[variant])
    reference = hf_model(path)
    engine = _engine(path)
    ours = engine_prefill_logits(engine, PROMPTS)
    for prompt, logits in zip(PROMPTS, ours, strict=True):
        expected = hf_prefill_logits(reference, prompt)
        np.testing.assert_allclose(logits, expected, atol=LOGIT_ATOL, rtol=0)
    assert (
        engine.llm_engine.block_manager.num_free_blocks
        == engine.llm_engine.block_manager.num_usable_blocks
    )


def test_chunked_prefill_reads_earlier_chunks_from_the_cache(tiny_llama):
    reference = hf_model(tiny_llama)
    engine = _engine(tiny_llama)
    ours = engine_prefill_logits(engine, PROMPTS, chunk_size=10)
    for prompt, logits in zip(PROMPTS, ours, strict=True):
        np.testing.assert_allclose(
            logits, hf_prefill_logits(reference, prompt), atol=LOGIT_ATOL, rtol=0
        )


def test_bfloat16_checkpoint_loads_as_auto_dtype():
    path = tiny_checkpoint("llama", dtype="bfloat16")
    engine = Engine(EngineConfig(model=str(path), num_kv_blocks=16, max_model_len=128))
    assert engine.llm_engine.model.dtype == "bfloat16"
    assert engine.llm_engine.model.params["layers"][0]["q"].dtype.name == "bfloat16"
    as_f32 = Engine(
        EngineConfig(model=str(path), dtype="float32", num_kv_blocks=16, max_model_len=128)
    )
    assert as_f32.llm_engine.model.params["embed"].dtype.name == "float32"


def test_pre_5x_config_with_top_level_rope_theta(tmp_path):
    """Older config.json files keep rope_theta at top level and scaling under rope_scaling."""
    import json
    import shutil

    path = tiny_checkpoint("llama", rope_scaling="llama3")
    old_style = tmp_path / "old-style"
    shutil.copytree(path, old_style)
    config = json.loads((old_style / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (old_style / "config.json").write_text(json.dumps(config))
    engine = _engine(old_style)
    assert dict(engine.llm_engine.model.model_config.rope_parameters)["rope_type"] == "llama3"
    ours = engine_prefill_logits(engine, PROMPTS[-1:])[0]
    expected = hf_prefill_logits(hf_model(path), PROMPTS[-1])
    np.testing.assert_allclose(ours, expected, atol=LOGIT_ATOL, rtol=0)
