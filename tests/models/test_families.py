"""OPT, GPT-2, Gemma, Gemma 2 and Phi-3 through the paged engine vs transformers (PyTorch, float32).

Tolerance: prefill logits within 1e-4 absolute of transformers (both float32); greedy tokens equal
for a batch of mixed-length prompts. Each variant builds one tiny checkpoint and one engine, shared
by its tests; the engine has one sequence bucket and two token buckets, so it compiles one prefill
and one decode shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, Phi3Config, PretrainedConfig

from jaxinfer import Engine, EngineConfig, SamplingParams
from jaxinfer.models import gemma, phi3
from jaxinfer.models.loader import CheckpointSource, load_model
from jaxinfer.models.registry import model_family
from tests.checkpoints import hf_greedy, hf_model, hf_prefill_logits, tiny_checkpoint
from tests.parity import engine_prefill_logits

LOGIT_ATOL = 1e-4
NEW_TOKENS = 12

rng = np.random.default_rng(0)
# 110 tokens: one prefill step of the 128-token bucket. Gemma 2's window is 12 tokens.
PROMPTS = [rng.integers(5, 512, size=n).tolist() for n in (1, 9, 30, 70)]

VARIANTS = {
    "opt": {"family": "opt", "tie_word_embeddings": True},
    # opt-350m's layout (post-norm blocks, no final norm, project_in/out), an untied lm_head, and
    # no linear biases (enable_bias=False).
    "opt-postnorm-projected": {
        "family": "opt",
        "do_layer_norm_before": False,
        "word_embed_proj_dim": 32,
        "enable_bias": False,
    },
    # Per-layer attention scales (head_dim**-0.5 / (layer + 1)) reach the attention call.
    "gpt2": {
        "family": "gpt2",
        "tie_word_embeddings": True,
        "scale_attn_by_inverse_layer_idx": True,
    },
    "gemma-mqa": {"family": "gemma", "tie_word_embeddings": True, "num_kv_heads": 1},
    "gemma2": {"family": "gemma2", "tie_word_embeddings": True},
    "phi3-window": {"family": "phi3", "sliding_window": 20},
}


# Every family; opt-postnorm-projected decodes through plain OPT's code path, and compiling its
# sampling step would cost ~8 s of the 2-core CI machine.
GREEDY_VARIANTS = sorted(set(VARIANTS) - {"opt-postnorm-projected"})


@pytest.fixture(scope="module")
def variant(request) -> tuple[Path, object, Engine]:
    """(checkpoint folder, transformers model, engine) of one variant, shared by its tests."""
    path = tiny_checkpoint(**VARIANTS[request.param])
    config = EngineConfig(
        model=str(path),
        dtype="float32",
        num_kv_blocks=32,
        max_model_len=256,
        max_num_seqs=4,
        max_num_batched_tokens=128,
        seq_buckets=(4,),
        token_buckets=(16, 128),
    )
    return path, hf_model(path), Engine(config)


@pytest.mark.parametrize("variant", sorted(VARIANTS), indirect=True)
def test_prefill_logits_match_transformers(variant):
    _, reference, engine = variant
    ours = engine_prefill_logits(engine, PROMPTS)
    for prompt, logits in zip(PROMPTS, ours, strict=True):
        expected = hf_prefill_logits(reference, prompt)
        np.testing.assert_allclose(logits, expected, atol=LOGIT_ATOL, rtol=0)
    assert (
        engine.llm_engine.block_manager.num_free_blocks
        == engine.llm_engine.block_manager.num_usable_blocks
    )


@pytest.mark.parametrize("variant", GREEDY_VARIANTS, indirect=True)
def test_greedy_tokens_match_transformers(variant):
    _, reference, engine = variant
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = engine.generate(PROMPTS, greedy, use_tqdm=False)
    expected = [hf_greedy(reference, prompt, NEW_TOKENS) for prompt in PROMPTS]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    # Not a degenerate model that says one token whatever the prompt.
    assert len({tuple(tokens) for tokens in expected}) > 1
    assert len({token for tokens in expected for token in tokens}) > 2


def test_gemma2_window_and_soft_caps_bind():
    """Each Gemma 2 feature changes transformers' logits on these prompts, so the parity tests
    above would fail for an engine that ignored any one of them."""
    path = tiny_checkpoint(**VARIANTS["gemma2"])
    cfg = gemma.GemmaConfig.from_hf(AutoConfig.from_pretrained(path, local_files_only=True))
    assert cfg.layer_windows == (12, None)  # layer_types: sliding, then full
    assert (cfg.attn_soft_cap, cfg.final_soft_cap) == (5.0, 3.0)
    assert cfg.attention_scale == pytest.approx(24**-0.5)

    model = hf_model(path)  # a copy of its own: the switches below are flipped on it
    prompt = PROMPTS[-1]
    base = hf_prefill_logits(model, prompt)
    assert 2.5 < np.abs(base).max() < 3.0

    def changed(obj, attr, value) -> float:
        saved = getattr(obj, attr)
        setattr(obj, attr, value)
        try:
            return float(np.abs(hf_prefill_logits(model, prompt) - base).max())
        finally:
            setattr(obj, attr, saved)

    assert changed(model.config, "final_logit_softcapping", None) > 1.0
    assert changed(model.model.layers[0].self_attn, "attn_logit_softcapping", None) > 1e-2
    assert changed(model.config, "sliding_window", 4096) > 1e-2


def _rewrite_names(folder: Path, rename, extra: dict[str, np.ndarray]) -> None:
    file = folder / "model.safetensors"
    tensors = {rename(name): array for name, array in load_file(file).items()}
    save_file({**tensors, **extra}, file)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_legacy_tensor_names_load_the_same_params(family, tmp_path):
    """facebook/opt-* and openai-community/gpt2 were saved from the bare model: no "model." /
    "transformer." prefix, a stored tied lm_head, GPT-2's causal-mask buffers."""
    path = tiny_checkpoint(**VARIANTS[family])
    legacy = tmp_path / family
    shutil.copytree(path, legacy)
    tensors = load_file(path / "model.safetensors")
    if family == "opt":
        embed = tensors["model.decoder.embed_tokens.weight"]
        _rewrite_names(legacy, lambda n: n.removeprefix("model."), {"lm_head.weight": embed})
    else:
        mask = np.tril(np.ones((1, 1, 8, 8), np.float32))
        buffers = {"h.0.attn.bias": mask, "h.1.attn.masked_bias": np.float32([-1e4])}
        _rewrite_names(legacy, lambda n: n.removeprefix("transformer."), buffers)
    names = set(load_file(legacy / "model.safetensors"))
    assert not any(n.startswith(("model.", "transformer.")) for n in names)

    expected = load_model(CheckpointSource.resolve(str(path)), "float32").params
    loaded = load_model(CheckpointSource.resolve(str(legacy)), "float32").params
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for ours, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(ours, want)


def test_phi3_longrope_is_rejected_clearly():
    config = Phi3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        original_max_position_embeddings=256,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 8,
            "long_factor": [2.0] * 8,
        },
        architectures=["Phi3ForCausalLM"],
    )
    with pytest.raises(ValueError, match="rope_type 'longrope'.*not supported"):
        phi3.Phi3Config.from_hf(config)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match="FalconForCausalLM") as error:
        model_family(PretrainedConfig(architectures=["FalconForCausalLM"]))
    for name in (
        "OPTForCausalLM",
        "GPT2LMHeadModel",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Phi3ForCausalLM",
        "LlamaForCausalLM",
    ):
        assert name in str(error.value)


def test_every_variant_keeps_its_distinguishing_tensors():
    """The checkpoints hold what makes each family itself (a builder that silently fell back to
    defaults would make the parity tests above weaker than they look)."""
    expected = {
        "opt": {"model.decoder.embed_positions.weight", "model.decoder.layers.0.fc1.bias"},
        "opt-postnorm-projected": {"model.decoder.project_in.weight", "lm_head.weight"},
        "gpt2": {"transformer.wpe.weight", "transformer.h.0.attn.c_attn.bias"},
        "gemma2": {"model.layers.1.post_feedforward_layernorm.weight"},
        "phi3-window": {"model.layers.0.self_attn.qkv_proj.weight"},
    }
    for name, wanted in expected.items():
        path = tiny_checkpoint(**VARIANTS[name])
        assert wanted <= set(load_file(path / "model.safetensors")), name
    postnorm = tiny_checkpoint(**VARIANTS["opt-postnorm-projected"])
    assert json.loads((postnorm / "config.json").read_text())["do_layer_norm_before"] is False
    names = set(load_file(postnorm / "model.safetensors"))
    assert not {"model.decoder.final_layer_norm.weight", "model.decoder.layers.0.fc1.bias"} & names
