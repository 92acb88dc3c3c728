"""Shared pure layers: norms, activations, rotary and learned positions, attention, MLPs.

Every family builds from these. Layers take a layer's parameter dict and use what it declares: a
`q_bias` next to `q` is added, a fused `qkv` replaces `q`/`k`/`v`, so one function serves the
families that differ only in which tensors their checkpoints carry.

Dimension legend: T tokens, E hidden, H query heads, K kv heads, D head dim, F MLP width.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.models import invariant
from jaxinfer.models.family import DecoderShape
from jaxinfer.models.invariant import matmul

Activation = Callable[[jax.Array], jax.Array]

# Hugging Face's names (`hidden_act`, `activation_function`): "gelu_new" and "gelu_pytorch_tanh"
# are both the tanh approximation; plain "gelu" is the exact erf form.
ACTIVATIONS: dict[str, Activation] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def check_activation(name: str, architecture: str) -> str:
    """`name` if we implement it; at config time, so a wrong model fails at load, not at trace."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} is not supported for {architecture}; "
            f"supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    return name


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as Hugging Face computes it: normalize in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(invariant.mean(x32 * x32) + eps)
    return weight * normed.astype(x.dtype)


def rms_norm_plus_one(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: the weight is stored as an offset from 1, and the scale is applied in
    float32 before the cast back (Llama casts first), as transformers does for Gemma."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(invariant.mean(x32 * x32) + eps)
    return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def layer_norm(
    x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, eps: float
) -> jax.Array:
    """LayerNorm as torch computes it: statistics, scale and shift in float32, then cast back.

    `weight`/`bias` are None for norms without learned parameters (OPT's elementwise_affine=False).
    """
    x32 = x.astype(jnp.float32)
    mean = invariant.mean(x32)
    centered = x32 - mean
    normed = centered * jax.lax.rsqrt(invariant.mean(centered * centered) + eps)
    if weight is not None:
        normed = normed * weight.astype(jnp.float32)
    if bias is not None:
        normed = normed + bias.astype(jnp.float32)
    return normed.astype(x.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap): squashes logits smoothly into (-cap, cap) (Gemma 2); None is identity."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def rope_inverse_frequencies(head_dim: int, rope_parameters: Mapping) -> np.ndarray:
    """Inverse frequencies for the `default` and `llama3` rope types, in float32 like transformers.

    llama3 stretches the low frequencies by `factor` and interpolates the middle band, so that a model
    trained at `original_max_position_embeddings` keeps working at longer contexts.
    """
    rope_type = rope_parameters.get("rope_type", "default")
    base = float(rope_parameters["rope_theta"])
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(
            f"rope_parameters.rope_type {rope_type!r} is not supported; supported: 'default', 'llama3'"
        )
    factor = float(rope_parameters["factor"])
    low_freq_factor = float(rope_parameters["low_freq_factor"])
    high_freq_factor = float(rope_parameters["high_freq_factor"])
    old_context_len = float(rope_parameters["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of every token's rotary angles [T, 1, D/2], computed once for q and k.

    On the CPU they are computed inside a conditional whose two branches are the same function
    (so any predicate is right): XLA fuses an elementwise cos / sin into each consumer's loop,
    where it runs again for every element it feeds (9 query heads x 2 halves for SmolLM2), and
    XLA:CPU drops optimization barriers before fusing; a conditional's results are arrays.
    Measured on the 2-core CPU: q and k of a 512-token SmolLM2 step 1.17 -> 0.25-0.28 ms a layer,
    the same bits. Not on other backends: there a conditional reads its predicate back to the
    host, and the transcendental work is cheap."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]

    def tables(angles: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.cos(angles), jnp.sin(angles)

    if jax.default_backend() == "cpu":
        cos, sin = jax.lax.cond(positions[0] >= 0, tables, tables, angles)
    else:
        cos, sin = tables(angles)
    return cos[:, None, :], sin[:, None, :]


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:  # x [T, heads, D]
    """Rotary embedding in Hugging Face's rotate-half layout (first half / second half pairs),
    with `rope_tables`' cos and sin."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def learned_positions(
    table: jax.Array,  # [max_positions + offset, E]
    positions: jax.Array,  # [T]
    offset: int = 0,
) -> jax.Array:
    """Rows of a learned position table [T, E]. OPT's table starts `offset`=2 rows in: fairseq
    reserved the first rows for padding, and transformers keeps the layout."""
    return table[positions + offset]


def linear(x: jax.Array, layer: Mapping[str, jax.Array], name: str) -> jax.Array:
    """x @ layer[name], plus layer[name + "_bias"] when the checkpoint declared one. [in, out]."""
    y = matmul(x, layer[name])
    bias = layer.get(f"{name}_bias")
    return y if bias is None else y + bias


def project_qkv(
    cfg: DecoderShape, layer: Mapping[str, jax.Array], x: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> q [T, H, D], k [T, K, D], v [T, K, D] from separate `q`/`k`/`v` projections, or from
    one fused `qkv` whose output is [q | k | v] (GPT-2's c_attn, Phi-3's qkv_proj)."""
    num_tokens = x.shape[0]
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if "qkv" in layer:
        q, k, v = jnp.split(linear(x, layer, "qkv"), [q_out, q_out + kv_out], axis=-1)
    else:
        q, k, v = linear(x, layer, "q"), linear(x, layer, "k"), linear(x, layer, "v")
    return (
        q.reshape(num_tokens, cfg.num_heads, cfg.head_dim),
        k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim),
        v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim),
    )


def self_attention(
    cfg: DecoderShape,
    layer: Mapping[str, jax.Array],
    x: jax.Array,  # [T, E] normed hidden
    layer_cache: tuple[jax.Array, jax.Array],
    attention: Callable,
    *,
    rotary: tuple[jax.Array, jax.Array] | None = None,  # (positions [T], inv_freq [D/2])
    qk_norm_eps: float | None = None,
    **overrides: object,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """-> (attention output [T, E], the new (k, v) [T, K, D] for the cache).

    `rotary` None means the positions were already added to the embeddings (GPT-2, OPT).
    `qk_norm_eps` turns on Qwen3's RMSNorm of each head of q and k (`q_norm`, `k_norm`).
    `overrides` (`scale`, `sliding_window`, `soft_cap`) go to this layer's attention call.
    """
    q, k, v = project_qkv(cfg, layer, x)
    if qk_norm_eps is not None:
        q = rms_norm(q, layer["q_norm"], qk_norm_eps)
        k = rms_norm(k, layer["k_norm"], qk_norm_eps)
    if rotary is not None:
        cos, sin = rope_tables(*rotary)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    out = attention(q, k, v, layer_cache, **overrides)  # [T, H, D]
    return linear(out.reshape(x.shape[0], -1), layer, "o"), (k, v)


def gated_mlp(x: jax.Array, layer: Mapping[str, jax.Array], activation: str = "silu") -> jax.Array:
    """down(act(x @ gate) * (x @ up)): SwiGLU with silu, GeGLU with Gemma's gelu-tanh. A fused
    `gate_up` (Phi-3) holds [gate | up] in one matrix."""
    if "gate_up" in layer:
        gate, up = jnp.split(linear(x, layer, "gate_up"), 2, axis=-1)
    else:
        gate, up = linear(x, layer, "gate"), linear(x, layer, "up")
    return linear(ACTIVATIONS[activation](gate) * up, layer, "down")


def dense_mlp(x: jax.Array, layer: Mapping[str, jax.Array], activation: str) -> jax.Array:
    """down(act(x @ up)): the ungated two-layer MLP of GPT-2 and OPT, biases where declared."""
    return linear(ACTIVATIONS[activation](linear(x, layer, "up")), layer, "down")
