"""Plain `jax.numpy` paged attention: the definition of what is right.

The Pallas kernels in this package take the same arguments and must agree with these functions.

Dimension legend:
  T  tokens in the step (ragged: the new tokens of every sequence, laid end to end, then padding)
  S  sequences in the step (padded sequences have no tokens and context length 0)
  B  blocks per block table          N  blocks in the cache       P  tokens per block
  H  query heads     K  kv heads     G  query heads per kv head (H = K * G)     D  head dim
  L  context positions of one sequence (B * P)

Layout contract: the new tokens of sequence s are `q[query_start_loc[s] : query_start_loc[s + 1]]`,
they are the *last* tokens of its context (positions `context_lens[s] - q_len .. context_lens[s] - 1`).
The cache holds the earlier positions; the new tokens' K/V arrive as `k_new`/`v_new` and are written
into the cache by `write_kv` after attention, in a separate donated call. (XLA:CPU copies the whole
cache when one computation both gathers from it and scatters into it, so read and write stay apart.)
Tokens past `query_start_loc[S]` are padding; their output is zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30


def write_kv(
    k_cache: jax.Array,  # [N, P, K, D]
    v_cache: jax.Array,  # [N, P, K, D]
    k_new: jax.Array,  # [T, K, D]
    v_new: jax.Array,  # [T, K, D]
    slot_mapping: jax.Array,  # [T] int32: block * P + offset; padding tokens point into block 0
) -> tuple[jax.Array, jax.Array]:
    """Scatter the step's new K/V into their cache slots (block 0 is the padding sink)."""
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    flat_shape = (num_blocks * block_size, kv_heads, head_dim)
    k_flat = k_cache.reshape(flat_shape).at[slot_mapping].set(k_new.astype(k_cache.dtype))
    v_flat = v_cache.reshape(flat_shape).at[slot_mapping].set(v_new.astype(v_cache.dtype))
    return k_flat.reshape(k_cache.shape), v_flat.reshape(v_cache.shape)


def _gather_context(cache: jax.Array, block_tables: jax.Array) -> jax.Array:
    """[N, P, K, D] x [S, B] -> [S, L, K, D]: each sequence's context, in position order."""
    seqs, blocks = block_tables.shape
    _, block_size, kv_heads, head_dim = cache.shape
    return cache[block_tables].reshape(seqs, blocks * block_size, kv_heads, head_dim)


def _softcap(scores: jax.Array, soft_cap: float | None) -> jax.Array:
    return scores if soft_cap is None else soft_cap * jnp.tanh(scores / soft_cap)


def paged_attention(
    q: jax.Array,  # [T, H, D]
    k_new: jax.Array,  # [T, K, D]
    v_new: jax.Array,  # [T, K, D]
    k_cache: jax.Array,  # [N, P, K, D]
    v_cache: jax.Array,  # [N, P, K, D]
    block_tables: jax.Array,  # [S, B] int32
    context_lens: jax.Array,  # [S] int32
    query_start_loc: jax.Array,  # [S + 1] int32
    *,
    scale: float,
    decode_only: bool = False,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:  # [T, H, D]
    """Causal attention of each new token over its own sequence's paged context.

    `decode_only` is a static promise that sequence s owns exactly token s (T == S); it selects a
    cheaper formulation (each query sees one gathered context) and must give identical results.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    token_idx = jnp.arange(num_tokens)
    # Which sequence each token belongs to, and its position in that sequence.
    token_seq = jnp.searchsorted(query_start_loc, token_idx, side="right") - 1  # [T]
    is_real = token_idx < query_start_loc[num_seqs]
    token_seq = jnp.clip(token_seq, 0, num_seqs - 1)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    first_pos = context_lens - q_lens  # [S]
    token_pos = first_pos[token_seq] + token_idx - query_start_loc[token_seq]  # [T]

    # Each sequence's context: earlier positions from the cache, this step's tokens from k_new/v_new.
    # Padding tokens scatter out of bounds and are dropped.
    context_len_max = block_tables.shape[1] * k_cache.shape[1]
    target_pos = jnp.where(is_real, token_pos, context_len_max)
    keys = _gather_context(k_cache, block_tables).astype(jnp.float32)  # [S, L, K, D]
    values = _gather_context(v_cache, block_tables).astype(jnp.float32)  # [S, L, K, D]
    keys = keys.at[token_seq, target_pos].set(k_new.astype(jnp.float32), mode="drop")
    values = values.at[token_seq, target_pos].set(v_new.astype(jnp.float32), mode="drop")
    key_pos = jnp.arange(context_len_max)  # [L]
    # Slots past a sequence's context may hold anything (padding block, stale or NaN data):
    # zero them so that even 0 * NaN cannot reach the output.
    in_context = key_pos[None, :] < context_lens[:, None]  # [S, L]
    values = jnp.where(in_context[:, :, None, None], values, 0.0)
    qg = q.astype(jnp.float32).reshape(num_tokens, kv_heads, group, head_dim) * scale

    visible = key_pos[None, :] <= token_pos[:, None]  # [T, L]
    if sliding_window is not None:
        visible &= key_pos[None, :] > token_pos[:, None] - sliding_window
    visible &= is_real[:, None]

    if decode_only:
        scores = jnp.einsum("tkgd,tlkd->tkgl", qg, keys)  # [T, K, G, L]
        scores = _softcap(scores, soft_cap)
        scores = jnp.where(visible[:, None, None, :], scores, _MASKED)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("tkgl,tlkd->tkgd", weights, values)
    else:
        # Every token scores against every sequence's context; a mask keeps its own sequence only.
        scores = jnp.einsum("tkgd,slkd->tkgsl", qg, keys)  # [T, K, G, S, L]
        scores = _softcap(scores, soft_cap)
        own_seq = token_seq[:, None] == jnp.arange(num_seqs)[None, :]  # [T, S]
        mask = own_seq[:, :, None] & visible[:, None, :]  # [T, S, L]
        scores = jnp.where(mask[:, None, None], scores, _MASKED)
        scores = scores.reshape(num_tokens, kv_heads, group, num_seqs * context_len_max)
        weights = jax.nn.softmax(scores, axis=-1)
        flat_values = values.reshape(num_seqs * context_len_max, kv_heads, head_dim)
        out = jnp.einsum("tkgx,xkd->tkgd", weights, flat_values)
    out = jnp.where(is_real[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
