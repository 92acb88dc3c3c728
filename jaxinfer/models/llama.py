"""Llama, Mistral, Qwen2 and Qwen3: one decoder, four sets of switches (phi3.py and gemma.py
build on it too).

Weights are declared once (`declare_weights`): the loader maps Hugging Face tensors through these
declarations, checks every shape, and a later sharding pass reads the logical axes from them.

Dimension legend: T tokens, S sequences, E hidden, H query heads, K kv heads, D head dim,
F MLP width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.models.family import DecoderShape, WeightSpec
from jaxinfer.models.invariant import matmul
from jaxinfer.models.layers import gated_mlp, rms_norm, rope_inverse_frequencies, self_attention

ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


@dataclass(frozen=True, kw_only=True)
class DecoderConfig(DecoderShape):
    """The model's shape and switches, hashable so a compiled step can close over it.

    `sliding_window` (from DecoderShape) is Mistral's.
    """

    intermediate_size: int
    rms_norm_eps: float
    rope_parameters: tuple[tuple[str, object], ...]
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rotary

    @classmethod
    def from_hf(cls, hf_config) -> DecoderConfig:
        from jaxinfer.models.registry import architectures_of

        architecture = architectures_of(hf_config)[0]
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError(f"{architecture} with mlp_bias=True is not supported")
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {act!r} is not supported for {architecture}; only 'silu'")
        hf_config.standardize_rope_params()
        rope = dict(hf_config.rope_parameters)
        sliding_window = None
        if architecture == "MistralForCausalLM":
            sliding_window = getattr(hf_config, "sliding_window", None)
        elif architecture == "Qwen2ForCausalLM" and getattr(hf_config, "use_sliding_window", False):
            raise ValueError("Qwen2 with use_sliding_window=True is not supported yet")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        return cls(
            architecture=architecture,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_parameters=tuple(sorted((k, v) for k, v in rope.items() if v is not None)),
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=architecture == "Qwen2ForCausalLM"
            or bool(getattr(hf_config, "attention_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            sliding_window=sliding_window,
        )

    @property
    def inv_freq(self) -> np.ndarray:
        return rope_inverse_frequencies(self.head_dim, dict(self.rope_parameters))


def declare_weights(cfg: DecoderConfig) -> dict[str, WeightSpec]:
    """Every parameter of the model, keyed by its path in the parameter pytree ("layers.3.q")."""
    e, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    specs = {
        "embed": WeightSpec("model.embed_tokens.weight", (v, e), ("vocab", "embed")),
        "final_norm": WeightSpec("model.norm.weight", (e,), ("embed",)),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = WeightSpec("lm_head.weight", (e, v), ("embed", "vocab"), transpose=True)
    for i in range(cfg.num_layers):
        hf = f"model.layers.{i}"
        layer = {
            "attn_norm": WeightSpec(f"{hf}.input_layernorm.weight", (e,), ("embed",)),
            "q": WeightSpec(
                f"{hf}.self_attn.q_proj.weight", (e, q_out), ("embed", "q_heads"), True
            ),
            "k": WeightSpec(
                f"{hf}.self_attn.k_proj.weight", (e, kv_out), ("embed", "kv_heads"), True
            ),
            "v": WeightSpec(
                f"{hf}.self_attn.v_proj.weight", (e, kv_out), ("embed", "kv_heads"), True
            ),
            "o": WeightSpec(
                f"{hf}.self_attn.o_proj.weight", (q_out, e), ("q_heads", "embed"), True
            ),
            "mlp_norm": WeightSpec(f"{hf}.post_attention_layernorm.weight", (e,), ("embed",)),
            "gate": WeightSpec(f"{hf}.mlp.gate_proj.weight", (e, f), ("embed", "mlp"), True),
            "up": WeightSpec(f"{hf}.mlp.up_proj.weight", (e, f), ("embed", "mlp"), True),
            "down": WeightSpec(f"{hf}.mlp.down_proj.weight", (f, e), ("mlp", "embed"), True),
        }
        if cfg.attention_bias:
            layer["q_bias"] = WeightSpec(f"{hf}.self_attn.q_proj.bias", (q_out,), ("q_heads",))
            layer["k_bias"] = WeightSpec(f"{hf}.self_attn.k_proj.bias", (kv_out,), ("kv_heads",))
            layer["v_bias"] = WeightSpec(f"{hf}.self_attn.v_proj.bias", (kv_out,), ("kv_heads",))
        if cfg.qk_norm:
            layer["q_norm"] = WeightSpec(f"{hf}.self_attn.q_norm.weight", (cfg.head_dim,), (None,))
            layer["k_norm"] = WeightSpec(f"{hf}.self_attn.k_norm.weight", (cfg.head_dim,), (None,))
        specs.update({f"layers.{i}.{name}": spec for name, spec in layer.items()})
    return specs


EMBED_PARAMS = ("embed",)  # what `embed` reads: a pipeline's first stage holds these


def embed(
    params: dict, cfg: DecoderConfig, token_ids: jax.Array, positions: jax.Array
) -> jax.Array:
    """Token embeddings [T, E] (positions enter through rotary, inside each layer)."""
    return params["embed"][token_ids]


def decoder_layer(
    layer: dict,
    cfg: DecoderConfig,
    index: int,  # the layer's index in the whole model
    x: jax.Array,  # [T, E]
    layer_cache: tuple[jax.Array, jax.Array],  # (k, v): [K, N, P, D]
    positions: jax.Array,  # [T]
    attention: Callable,  # (q, k_new, v_new, (k_cache, v_cache)) -> out [T, H, D]
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """-> (the layer's output [T, E], its new (k, v) [T, K, D]).

    The cache is only read here; the runner writes the new K/V into it in a separate donated call.
    """
    normed = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
    attn_out, kv = self_attention(
        cfg,
        layer,
        normed,
        layer_cache,
        attention,
        rotary=(positions, jnp.asarray(cfg.inv_freq)),
        qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None,
    )
    x = x + attn_out
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
    return x + gated_mlp(h, layer), kv


def logits(params: dict, cfg: DecoderConfig, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V] of last-layer hidden states [..., E] (final norm, then lm_head)."""
    x = rms_norm(hidden, params["final_norm"], cfg.rms_norm_eps)
    lm_head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return matmul(x, lm_head, preferred_element_type=jnp.float32)
