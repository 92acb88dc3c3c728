"""Shared pure layers: norms, rotary embeddings, gated MLP. Every family builds from these.

Dimension legend: T tokens, E hidden, H query heads, K kv heads, D head dim, F MLP width.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as Hugging Face computes it: normalize in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


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


def apply_rope(
    x: jax.Array,  # [T, heads, D]
    positions: jax.Array,  # [T]
    inv_freq: jax.Array,  # [D / 2]
) -> jax.Array:
    """Rotary embedding in Hugging Face's rotate-half layout (first half / second half pairs)."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def gated_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """SwiGLU: down(silu(x @ gate) * (x @ up)). Weights are [in, out]."""
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down
