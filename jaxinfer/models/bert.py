"""BERT-family encoders (`BertModel`): the token embeddings that `Engine.encode()` pools.

An encoder reads the whole padded sequence at once with bidirectional attention, so there is no
KV cache and no sampling: one compiled call per (batch, length) bucket maps token ids to hidden
states (see `runtime/encoder_runner.py`). Weights are declared once, as for the decoders, so the
loader checks every tensor.

Dimension legend: S sequences, L padded length, E hidden, H heads, D head dim, F MLP width,
V vocabulary, P positions, Y token types.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxinfer.models.family import WeightSpec, linear_specs, norm_specs
from jaxinfer.models.layers import check_activation, dense_mlp, layer_norm, linear

ARCHITECTURES = ("BertModel",)

# The loader builds an EncoderConfig (not a DecoderConfig) and the engine an encoder runner.
IS_ENCODER = True

# Tensors these checkpoints carry that the embeddings never read. The pooler (a tanh dense layer
# over [CLS]) is BERT's next-sentence head: sentence-transformers and vLLM's embedding pooling
# read the last hidden states instead. position_ids is a buffer older transformers saved.
IGNORED_TENSORS = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """The encoder's shape, hashable so a compiled call can close over it."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    activation: str = "gelu"  # Hugging Face's `hidden_act`; BERT's is the exact (erf) GELU

    @classmethod
    def from_hf(cls, hf_config) -> EncoderConfig:
        from jaxinfer.models.registry import architectures_of

        architecture = architectures_of(hf_config)[0]
        position_type = getattr(hf_config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"position_embedding_type {position_type!r} is not supported; only 'absolute'"
            )
        if getattr(hf_config, "is_decoder", False):
            raise ValueError(f"{architecture} with is_decoder=True is not an encoder")
        num_heads = hf_config.num_attention_heads
        return cls(
            architecture=architecture,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            head_dim=hf_config.hidden_size // num_heads,
            layer_norm_eps=float(hf_config.layer_norm_eps),
            max_position_embeddings=hf_config.max_position_embeddings,
            type_vocab_size=hf_config.type_vocab_size,
            activation=check_activation(getattr(hf_config, "hidden_act", "gelu"), architecture),
        )


def declare_weights(cfg: EncoderConfig) -> dict[str, WeightSpec]:
    """Every parameter, keyed by its path in the parameter pytree ("layers.3.q")."""
    e, f = cfg.hidden_size, cfg.intermediate_size
    specs = {
        "embed": WeightSpec(
            "embeddings.word_embeddings.weight", (cfg.vocab_size, e), ("vocab", "embed")
        ),
        "position_embed": WeightSpec(
            "embeddings.position_embeddings.weight",
            (cfg.max_position_embeddings, e),
            (None, "embed"),
        ),
        "token_type_embed": WeightSpec(
            "embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, e), (None, "embed")
        ),
        **norm_specs("embeddings.LayerNorm", e, name="embed_norm", bias=True),
    }
    for i in range(cfg.num_layers):
        hf = f"encoder.layer.{i}"
        attn = f"{hf}.attention"
        layer = {
            **linear_specs(f"{attn}.self.query", (e, e), ("embed", "q_heads"), name="q", bias=True),
            **linear_specs(f"{attn}.self.key", (e, e), ("embed", "q_heads"), name="k", bias=True),
            **linear_specs(f"{attn}.self.value", (e, e), ("embed", "q_heads"), name="v", bias=True),
            **linear_specs(
                f"{attn}.output.dense", (e, e), ("q_heads", "embed"), name="o", bias=True
            ),
            **norm_specs(f"{attn}.output.LayerNorm", e, name="attn_norm", bias=True),
            **linear_specs(
                f"{hf}.intermediate.dense", (e, f), ("embed", "mlp"), name="up", bias=True
            ),
            **linear_specs(f"{hf}.output.dense", (f, e), ("mlp", "embed"), name="down", bias=True),
            **norm_specs(f"{hf}.output.LayerNorm", e, name="mlp_norm", bias=True),
        }
        specs.update({f"layers.{i}.{name}": spec for name, spec in layer.items()})
    return specs


def _self_attention(
    cfg: EncoderConfig,
    layer: dict,
    x: jax.Array,  # [S, L, E]
    key_mask: jax.Array,  # [S, L] True where the token is real (not padding)
) -> jax.Array:
    s, length, _ = x.shape
    q, k, v = (
        linear(x, layer, name).reshape(s, length, cfg.num_heads, cfg.head_dim)  # [S, L, H, D]
        for name in ("q", "k", "v")
    )
    scores = jnp.einsum("sqhd,skhd->shqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * (cfg.head_dim**-0.5)
    # Padding keys get the most negative finite value (as transformers does), not -inf: a row
    # with no real token (batch padding) then stays finite instead of becoming NaN.
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("shqk,skhd->sqhd", probs, v).reshape(s, length, -1)  # [S, L, E]
    return linear(out, layer, "o")


def _norm(x: jax.Array, params: dict, name: str, eps: float) -> jax.Array:
    return layer_norm(x, params[name], params[f"{name}_bias"], eps)


def hidden_states(
    params: dict,
    cfg: EncoderConfig,
    token_ids: jax.Array,  # [S, L] right-padded
    lengths: jax.Array,  # [S] real tokens per row; 0 for a padding row
) -> jax.Array:
    """Last-layer hidden states [S, L, E], post-LN BERT; positions past a row's length are junk."""
    length, eps = token_ids.shape[1], cfg.layer_norm_eps
    key_mask = jnp.arange(length)[None, :] < lengths[:, None]  # [S, L]
    # Token type 0 everywhere: encode() embeds single texts, never sentence pairs.
    x = (
        params["embed"][token_ids]
        + params["token_type_embed"][0]
        + params["position_embed"][:length]
    )
    x = _norm(x, params, "embed_norm", eps)
    for layer in params["layers"]:
        x = _norm(x + _self_attention(cfg, layer, x, key_mask), layer, "attn_norm", eps)
        x = _norm(x + dense_mlp(x, layer, cfg.activation), layer, "mlp_norm", eps)
    return x
