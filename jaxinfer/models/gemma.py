"""Gemma and Gemma 2: Llama's layout with Gemma's numerics, and Gemma 2's per-layer attention.

Both: embeddings scaled by sqrt(hidden) (the scale rounded to the model dtype, as transformers
does), RMSNorm weights stored as an offset from 1, a gelu-tanh gated MLP, head_dim from the config.
Gemma 2 adds a norm after attention and after the MLP ("sandwich" norms), soft caps on attention
scores and on the final logits, `query_pre_attn_scalar` instead of head_dim for the attention
scale, and a sliding window on the layers `layer_types` marks "sliding_attention".

Dimension legend: T tokens, E hidden, K kv heads, D head dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxinfer.models import llama
from jaxinfer.models.family import WeightSpec
from jaxinfer.models.invariant import matmul
from jaxinfer.models.layers import (
    check_activation,
    gated_mlp,
    rms_norm_plus_one,
    self_attention,
    soft_cap,
)

ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM")

_LAYER_WINDOWED = {"sliding_attention": True, "full_attention": False}


@dataclass(frozen=True, kw_only=True)
class GemmaConfig(llama.DecoderConfig):
    """Llama's fields plus Gemma's switches. `sliding_window` stays None: in Gemma 2 only some
    layers slide, and those carry their window in `layer_windows`."""

    activation: str
    attention_scale: float
    layer_windows: tuple[int | None, ...]
    sandwich_norms: bool = False  # Gemma 2
    attn_soft_cap: float | None = None  # Gemma 2
    final_soft_cap: float | None = None  # Gemma 2

    @classmethod
    def from_hf(cls, hf_config) -> GemmaConfig:
        from jaxinfer.models.registry import architectures_of

        architecture = architectures_of(hf_config)[0]
        gemma2 = architecture == "Gemma2ForCausalLM"
        if getattr(hf_config, "use_bidirectional_attention", None):
            raise ValueError(f"{architecture} with use_bidirectional_attention is not supported")
        # Gemma's MLP reads `hidden_act`, Gemma 2's `hidden_activation`.
        activation = hf_config.hidden_activation if gemma2 else hf_config.hidden_act
        hf_config.standardize_rope_params()
        rope = dict(hf_config.rope_parameters)
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        num_layers = hf_config.num_hidden_layers
        layer_windows: tuple[int | None, ...] = (None,) * num_layers
        if gemma2:
            layer_types = list(hf_config.layer_types)
            unknown = sorted(set(layer_types) - set(_LAYER_WINDOWED))
            if unknown or len(layer_types) != num_layers:
                raise ValueError(
                    f"{architecture}: layer_types must name {num_layers} layers, each one of "
                    f"{sorted(_LAYER_WINDOWED)}; got {layer_types}"
                )
            window = hf_config.sliding_window
            layer_windows = tuple(window if _LAYER_WINDOWED[t] else None for t in layer_types)
        cfg = cls(
            architecture=architecture,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_parameters=tuple(sorted((k, v) for k, v in rope.items() if v is not None)),
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
            activation=check_activation(activation, architecture),
            attention_scale=float(hf_config.query_pre_attn_scalar if gemma2 else head_dim) ** -0.5,
            layer_windows=layer_windows,
            sandwich_norms=gemma2,
            attn_soft_cap=getattr(hf_config, "attn_logit_softcapping", None) if gemma2 else None,
            final_soft_cap=getattr(hf_config, "final_logit_softcapping", None) if gemma2 else None,
        )
        cfg.inv_freq  # noqa: B018 (an unsupported rope type fails here, at load, not at trace)
        return cfg


DecoderConfig = GemmaConfig  # the name the loader looks up


def declare_weights(cfg: GemmaConfig) -> dict[str, WeightSpec]:
    """Llama's tensor names; Gemma 2 adds two norms per layer and renames one.

    Beware the name clash: in Gemma 2 `post_attention_layernorm` normalizes the attention output
    (our `post_attn_norm`), while the norm before the MLP is `pre_feedforward_layernorm`; in Gemma
    and Llama `post_attention_layernorm` is the norm before the MLP.
    """
    specs = llama.declare_weights(cfg)
    if cfg.sandwich_norms:
        renamed = {
            "post_attn_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
            "post_mlp_norm": "post_feedforward_layernorm",
        }
        for i in range(cfg.num_layers):
            for name, hf_name in renamed.items():
                specs[f"layers.{i}.{name}"] = WeightSpec(
                    f"model.layers.{i}.{hf_name}.weight", (cfg.hidden_size,), ("embed",)
                )
    return specs


EMBED_PARAMS = ("embed",)


def embed(params: dict, cfg: GemmaConfig, token_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """Token embeddings scaled by sqrt(hidden) [T, E]."""
    table = params["embed"]
    return table[token_ids] * jnp.asarray(cfg.hidden_size**0.5, table.dtype)


def layer_kind(cfg, index: int):
    """Layers differ by their sliding window (None: global attention). (family.py's `layer_kind`)"""
    return cfg.layer_windows[index]


def decoder_layer(
    layer: dict,
    cfg: GemmaConfig,
    index: int,
    x: jax.Array,  # [T, E]
    layer_cache: tuple[jax.Array, jax.Array],
    positions: jax.Array,  # [T]
    attention: Callable,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """-> (the layer's output [T, E], its new (k, v) [T, K, D]); layer `index` picks the window."""
    eps = cfg.rms_norm_eps
    attn_out, kv = self_attention(
        cfg,
        layer,
        rms_norm_plus_one(x, layer["attn_norm"], eps),
        layer_cache,
        attention,
        rotary=(positions, jnp.asarray(cfg.inv_freq)),
        scale=cfg.attention_scale,
        sliding_window=cfg.layer_windows[index],
        soft_cap=cfg.attn_soft_cap,
    )
    if cfg.sandwich_norms:
        attn_out = rms_norm_plus_one(attn_out, layer["post_attn_norm"], eps)
    x = x + attn_out
    mlp_out = gated_mlp(rms_norm_plus_one(x, layer["mlp_norm"], eps), layer, cfg.activation)
    if cfg.sandwich_norms:
        mlp_out = rms_norm_plus_one(mlp_out, layer["post_mlp_norm"], eps)
    return x + mlp_out, kv


def logits(params: dict, cfg: GemmaConfig, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V]: final norm, lm_head, then Gemma 2's final soft cap."""
    x = rms_norm_plus_one(hidden, params["final_norm"], cfg.rms_norm_eps)
    lm_head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return soft_cap(matmul(x, lm_head, preferred_element_type=jnp.float32), cfg.final_soft_cap)
