"""OPT (facebook/opt-*): learned positions, LayerNorm, an ungated ReLU MLP, biases everywhere.

Peculiarities kept from fairseq: the position table starts 2 rows in; opt-350m embeds words in a
smaller space (`word_embed_proj_dim`) with `project_in`/`project_out` around the decoder, and
normalizes after each residual add (`do_layer_norm_before=False`, no final norm).

Dimension legend: T tokens, E hidden, P word embedding width, V vocabulary.
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

ARCHITECTURES = ("OPTForCausalLM",)

POSITION_OFFSET = 2


@dataclass(frozen=True, kw_only=True)
class OPTConfig(DecoderShape):
    ffn_dim: int
    activation: str
    word_embed_proj_dim: int
    layer_norm_before: bool  # False: post-norm (opt-350m)
    final_norm: bool
    bias: bool
    norm_affine: bool  # LayerNorms carry a weight and bias
    layer_norm_eps: float = 1e-5  # torch's LayerNorm default; OPT's config has no field for it

    @classmethod
    def from_hf(cls, hf_config) -> OPTConfig:
        num_heads = hf_config.num_attention_heads
        hidden = hf_config.hidden_size
        if hidden % num_heads:
            raise ValueError(f"OPT hidden_size {hidden} is not a multiple of {num_heads} heads")
        pre_norm = bool(hf_config.do_layer_norm_before)
        return cls(
            architecture="OPTForCausalLM",
            vocab_size=hf_config.vocab_size,
            hidden_size=hidden,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=hidden // num_heads,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            ffn_dim=hf_config.ffn_dim,
            activation=check_activation(hf_config.activation_function, "OPTForCausalLM"),
            word_embed_proj_dim=hf_config.word_embed_proj_dim or hidden,
            layer_norm_before=pre_norm,
            final_norm=pre_norm and not getattr(hf_config, "_remove_final_layer_norm", False),
            bias=bool(getattr(hf_config, "enable_bias", True)),
            norm_affine=bool(getattr(hf_config, "layer_norm_elementwise_affine", True)),
        )


DecoderConfig = OPTConfig  # the name the loader looks up


def declare_weights(cfg: OPTConfig) -> dict[str, WeightSpec]:
    """Every parameter, keyed by its path in the parameter pytree ("layers.3.q")."""
    e, f, v, p = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.word_embed_proj_dim
    top = "model.decoder"
    affine = {"weight": cfg.norm_affine, "bias": cfg.norm_affine}
    specs = {
        "embed": WeightSpec(f"{top}.embed_tokens.weight", (v, p), ("vocab", "embed")),
        "positions": WeightSpec(
            f"{top}.embed_positions.weight",
            (cfg.max_position_embeddings + POSITION_OFFSET, e),
            (None, "embed"),
        ),
    }
    if p != e:
        specs["project_in"] = WeightSpec(f"{top}.project_in.weight", (p, e), (None, "embed"), True)
        specs["project_out"] = WeightSpec(
            f"{top}.project_out.weight", (e, p), ("embed", None), True
        )
    if cfg.final_norm:
        specs.update(norm_specs(f"{top}.final_layer_norm", e, name="final_norm", **affine))
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = WeightSpec("lm_head.weight", (p, v), ("embed", "vocab"), transpose=True)
    for i in range(cfg.num_layers):
        hf = f"{top}.layers.{i}"
        attn = f"{hf}.self_attn"
        layer = {
            **norm_specs(f"{hf}.self_attn_layer_norm", e, name="attn_norm", **affine),
            **linear_specs(f"{attn}.q_proj", (e, e), ("embed", "q_heads"), name="q", bias=cfg.bias),
            **linear_specs(
                f"{attn}.k_proj", (e, e), ("embed", "kv_heads"), name="k", bias=cfg.bias
            ),
            **linear_specs(
                f"{attn}.v_proj", (e, e), ("embed", "kv_heads"), name="v", bias=cfg.bias
            ),
            **linear_specs(
                f"{attn}.out_proj", (e, e), ("q_heads", "embed"), name="o", bias=cfg.bias
            ),
            **norm_specs(f"{hf}.final_layer_norm", e, name="mlp_norm", **affine),
            **linear_specs(f"{hf}.fc1", (e, f), ("embed", "mlp"), name="up", bias=cfg.bias),
            **linear_specs(f"{hf}.fc2", (f, e), ("mlp", "embed"), name="down", bias=cfg.bias),
        }
        specs.update({f"layers.{i}.{name}": spec for name, spec in layer.items()})
    return specs


def rename_tensors(
    cfg: OPTConfig, tensors: Iterator[tuple[str, np.ndarray]]
) -> Iterator[tuple[str, np.ndarray]]:
    """The facebook/opt-* uploads were saved from OPTModel: "decoder.*" without the "model."
    prefix that OPTForCausalLM writes; some also store the tied lm_head."""
    for name, array in tensors:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        yield ("model." + name if name.startswith("decoder.") else name), array


def _norm(cfg: OPTConfig, tree: dict, name: str, x: jax.Array) -> jax.Array:
    return layer_norm(x, tree.get(name), tree.get(f"{name}_bias"), cfg.layer_norm_eps)


EMBED_PARAMS = ("embed", "project_in", "positions")


def embed(params: dict, cfg: OPTConfig, token_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """Word embeddings (projected in, for opt-350m) plus learned positions [T, E]."""
    x = params["embed"][token_ids]  # [T, P]
    if "project_in" in params:
        x = matmul(x, params["project_in"])
    return x + learned_positions(params["positions"], positions, POSITION_OFFSET)


def decoder_layer(
    layer: dict,
    cfg: OPTConfig,
    index: int,
    x: jax.Array,  # [T, E]
    layer_cache: tuple[jax.Array, jax.Array],
    positions: jax.Array,
    attention: Callable,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """-> (the layer's output [T, E], its new (k, v) [T, H, D]); pre- or post-norm."""
    pre = cfg.layer_norm_before
    h = _norm(cfg, layer, "attn_norm", x) if pre else x
    attn_out, kv = self_attention(cfg, layer, h, layer_cache, attention)
    x = x + attn_out
    if not pre:
        x = _norm(cfg, layer, "attn_norm", x)
    h = _norm(cfg, layer, "mlp_norm", x) if pre else x
    x = x + dense_mlp(h, layer, cfg.activation)
    if not pre:
        x = _norm(cfg, layer, "mlp_norm", x)
    return x, kv


def logits(params: dict, cfg: OPTConfig, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V]: final norm (pre-norm models), project_out, lm_head."""
    x = _norm(cfg, params, "final_norm", hidden) if cfg.final_norm else hidden
    if "project_out" in params:
        x = matmul(x, params["project_out"])
    lm_head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return matmul(x, lm_head, preferred_element_type=jnp.float32)
