"""GPT-2: learned positions, pre-LayerNorm blocks, a fused qkv projection, a gelu-tanh MLP.

GPT-2's checkpoints store their projections as Conv1D weights, already [in, out]: the one family
whose linear weights load without a transpose.

Dimension legend: T tokens, E hidden, H heads, D head dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.models.family import DecoderShape, WeightSpec, linear_specs, norm_specs
from jaxinfer.models.invariant import matmul
from jaxinfer.models.layers import (
    check_activation,
    dense_mlp,
    layer_norm,
    learned_positions,
    self_attention,
)

ARCHITECTURES = ("GPT2LMHeadModel",)


@dataclass(frozen=True, kw_only=True)
class GPT2Config(DecoderShape):
    intermediate_size: int
    activation: str
    layer_norm_eps: float
    layer_scales: tuple[float, ...]  # attention scale of each layer

    @classmethod
    def from_hf(cls, hf_config) -> GPT2Config:
        if getattr(hf_config, "add_cross_attention", False):
            raise ValueError("GPT2LMHeadModel with add_cross_attention=True is not supported")
        hidden, num_heads = hf_config.hidden_size, hf_config.num_attention_heads
        head_dim = hidden // num_heads
        num_layers = hf_config.num_hidden_layers
        scale = head_dim**-0.5 if getattr(hf_config, "scale_attn_weights", True) else 1.0
        if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
            layer_scales = tuple(scale / (i + 1) for i in range(num_layers))
        else:
            layer_scales = (scale,) * num_layers
        return cls(
            architecture="GPT2LMHeadModel",
            vocab_size=hf_config.vocab_size,
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            intermediate_size=getattr(hf_config, "n_inner", None) or 4 * hidden,
            activation=check_activation(hf_config.activation_function, "GPT2LMHeadModel"),
            layer_norm_eps=float(hf_config.layer_norm_epsilon),
            layer_scales=layer_scales,
        )


DecoderConfig = GPT2Config  # the name the loader looks up


def declare_weights(cfg: GPT2Config) -> dict[str, WeightSpec]:
    """Every parameter, keyed by its path in the parameter pytree ("layers.3.qkv")."""
    e, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    specs = {
        "embed": WeightSpec("transformer.wte.weight", (v, e), ("vocab", "embed")),
        "positions": WeightSpec(
            "transformer.wpe.weight", (cfg.max_position_embeddings, e), (None, "embed")
        ),
        **norm_specs("transformer.ln_f", e, name="final_norm", bias=True),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = WeightSpec("lm_head.weight", (e, v), ("embed", "vocab"), transpose=True)
    conv1d = {"bias": True, "transpose": False}  # Conv1D: [in, out] already, always a bias
    for i in range(cfg.num_layers):
        hf = f"transformer.h.{i}"
        layer = {
            **norm_specs(f"{hf}.ln_1", e, name="attn_norm", bias=True),
            **linear_specs(
                f"{hf}.attn.c_attn", (e, 3 * e), ("embed", "qkv_heads"), name="qkv", **conv1d
            ),
            **linear_specs(f"{hf}.attn.c_proj", (e, e), ("q_heads", "embed"), name="o", **conv1d),
            **norm_specs(f"{hf}.ln_2", e, name="mlp_norm", bias=True),
            **linear_specs(f"{hf}.mlp.c_fc", (e, f), ("embed", "mlp"), name="up", **conv1d),
            **linear_specs(f"{hf}.mlp.c_proj", (f, e), ("mlp", "embed"), name="down", **conv1d),
        }
        specs.update({f"layers.{i}.{name}": spec for name, spec in layer.items()})
    return specs


def rename_tensors(
    cfg: GPT2Config, tensors: Iterator[tuple[str, np.ndarray]]
) -> Iterator[tuple[str, np.ndarray]]:
    """openai-community/gpt2 and other early uploads were saved from GPT2Model: no "transformer."
    prefix, and they carry the causal-mask buffers `attn.bias` / `attn.masked_bias`."""
    for name, array in tensors:
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        yield name, array


def _norm(cfg: GPT2Config, tree: dict, name: str, x: jax.Array) -> jax.Array:
    return layer_norm(x, tree[name], tree[f"{name}_bias"], cfg.layer_norm_eps)


EMBED_PARAMS = ("embed", "positions")


def embed(params: dict, cfg: GPT2Config, token_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """Word plus learned position embeddings [T, E]."""
    return params["embed"][token_ids] + learned_positions(params["positions"], positions)


def layer_kind(cfg, index: int):
    """Layers differ by their attention scale (scale_attn_by_inverse_layer_idx). (family.py's `layer_kind`)"""
    return cfg.layer_scales[index]


def decoder_layer(
    layer: dict,
    cfg: GPT2Config,
    index: int,
    x: jax.Array,  # [T, E]
    layer_cache: tuple[jax.Array, jax.Array],
    positions: jax.Array,
    attention: Callable,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """-> (the layer's output [T, E], its new (k, v) [T, H, D]); layer `index` picks the scale."""
    h = _norm(cfg, layer, "attn_norm", x)
    attn_out, kv = self_attention(
        cfg, layer, h, layer_cache, attention, scale=cfg.layer_scales[index]
    )
    x = x + attn_out
    return x + dense_mlp(_norm(cfg, layer, "mlp_norm", x), layer, cfg.activation), kv


def logits(params: dict, cfg: GPT2Config, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V] of last-layer hidden states [..., E] (final norm, then lm_head)."""
    x = _norm(cfg, params, "final_norm", hidden)
    lm_head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return matmul(x, lm_head, preferred_element_type=jnp.float32)
