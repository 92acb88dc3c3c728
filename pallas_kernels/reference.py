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

Cache layout `[K, N, P, D]` (kv-head major): a gather by block table then yields `[K, S, L, D]`, so
every score and value contraction is a matmul batched over leading axes, with no transpose of the
gathered context, and the kv-head axis (the one tensor parallelism shards) comes first. Measured on
the 2-core CPU for SmolLM2 decode shapes (32 sequences x 1024 positions), this layout plus scoring
cache and new tokens separately took attention from ~40 ms to ~11 ms per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

_MASKED = -1e30


def write_kv(
    k_cache: jax.Array,  # [K, N, P, D]
    v_cache: jax.Array,  # [K, N, P, D]
    k_new: jax.Array,  # [T, K, D]
    v_new: jax.Array,  # [T, K, D]
    slot_mapping: jax.Array,  # [T] int32: block * P + offset; padding tokens point into block 0
) -> tuple[jax.Array, jax.Array]:
    """Scatter the step's new K/V into their cache slots (block 0 is the padding sink)."""
    kv_heads, num_blocks, block_size, head_dim = k_cache.shape
    flat_shape = (kv_heads, num_blocks * block_size, head_dim)

    def scatter(cache: jax.Array, new: jax.Array) -> jax.Array:
        flat = cache.reshape(flat_shape)
        flat = flat.at[:, slot_mapping].set(new.transpose(1, 0, 2).astype(cache.dtype))
        return flat.reshape(cache.shape)

    return scatter(k_cache, k_new), scatter(v_cache, v_new)


def _gather_context(cache: jax.Array, block_tables: jax.Array) -> jax.Array:
    """[K, N, P, D] x [S, B] -> [K, S, L, D]: each sequence's context, in position order."""
    kv_heads, _, block_size, head_dim = cache.shape
    seqs, blocks = block_tables.shape
    # Block ids are in range by construction (padding entries point at block 0): "clip" spares
    # the out-of-bounds fill that the default gather mode adds.
    gathered = jnp.take(cache, block_tables, axis=1, mode="clip")  # [K, S, B, P, D]
    return gathered.reshape(kv_heads, seqs, blocks * block_size, head_dim).astype(jnp.float32)


def _softcap(scores: jax.Array, soft_cap: float | None) -> jax.Array:
    return scores if soft_cap is None else soft_cap * jnp.tanh(scores / soft_cap)


# Online softmax state: running max [..., Q], running sum [..., Q], unnormalized output [..., Q, D],
# where Q indexes queries (query heads of a token) and the last score axis indexes keys.
_Running = tuple[jax.Array, jax.Array, jax.Array]
_Contract = Callable[[jax.Array], jax.Array]  # weights [..., keys] -> weighted values [..., D]


def _start(scores: jax.Array, visible: jax.Array, contract: _Contract) -> _Running:
    """The softmax state after a first set of keys (this step's new tokens)."""
    scores = jnp.where(visible, scores, _MASKED)
    top = scores.max(axis=-1)
    weights = jnp.where(visible, jnp.exp(scores - top[..., None]), 0.0)
    return top, weights.sum(axis=-1), contract(weights)


def _absorb(
    state: _Running,
    scores: jax.Array,
    visible: jax.Array,
    contract: _Contract,
    sum_keys: Callable[[jax.Array], jax.Array] = lambda weights: weights.sum(axis=-1),
) -> _Running:
    """Fold one more set of keys into the softmax state (flash attention's rescaling).
    `sum_keys`: how the weights are summed over keys (batch_invariant.py fixes the order)."""
    top, total, acc = state
    scores = jnp.where(visible, scores, _MASKED)
    new_top = jnp.maximum(top, scores.max(axis=-1))
    weights = jnp.where(visible, jnp.exp(scores - new_top[..., None]), 0.0)
    rescale = jnp.exp(top - new_top)
    return (
        new_top,
        total * rescale + sum_keys(weights),
        acc * rescale[..., None] + contract(weights),
    )


def _finish(state: _Running) -> jax.Array:
    _, total, acc = state
    return acc / jnp.where(total > 0, total, 1.0)[..., None]  # nothing visible (padding): zero


CHUNK_POSITIONS = 128  # cached context positions gathered per loop step


def _over_cached_chunks(
    state: _Running,
    k_cache: jax.Array,  # [K, N, P, D]
    v_cache: jax.Array,  # [K, N, P, D]
    block_tables: jax.Array,  # [S, B]
    cached_lens: jax.Array,  # [S]
    absorb_chunk: Callable[[_Running, jax.Array, jax.Array, jax.Array, jax.Array], _Running],
) -> _Running:
    """Run `absorb_chunk(state, keys, values, key_pos, in_cache)` over the cached context in chunks.

    keys/values: [K, S, C, D]; key_pos: [C]; in_cache: [S, C], which slots hold cached context.
    Values outside the cached context are zeroed here: those slots may hold anything (padding
    block, stale data of a freed block, NaN in the tests), and 0 * NaN is NaN.

    Why a loop: it runs only as far as the longest cached context in the step (zero times for a
    prefill of fresh prompts), not the bucket's table width, and each chunk's gathered K/V stays
    small enough for the CPU caches. On the 2-core CPU, SmolLM2 decode attention (32 sequences)
    took 6 ms per layer at 512 cached positions against 8-15 ms for one gather of the whole table,
    and 3.5 ms against 15 ms when the context filled a fifth of the table.
    """
    block_size = k_cache.shape[2]
    chunk_blocks = max(1, min(CHUNK_POSITIONS // block_size, block_tables.shape[1]))
    pad = -block_tables.shape[1] % chunk_blocks
    block_tables = jnp.pad(block_tables, ((0, 0), (0, pad)))  # block 0, never in_cache
    chunk_len = chunk_blocks * block_size

    def one_chunk(index: jax.Array, state: _Running) -> _Running:
        blocks = jax.lax.dynamic_slice_in_dim(block_tables, index * chunk_blocks, chunk_blocks, 1)
        key_pos = index * chunk_len + jnp.arange(chunk_len)
        in_cache = key_pos[None, :] < cached_lens[:, None]
        keys = _gather_context(k_cache, blocks)
        values = jnp.where(in_cache[None, :, :, None], _gather_context(v_cache, blocks), 0.0)
        return absorb_chunk(state, keys, values, key_pos, in_cache)

    num_chunks = (jnp.max(cached_lens) + chunk_len - 1) // chunk_len
    return jax.lax.fori_loop(0, num_chunks, one_chunk, state)


def paged_attention(
    q: jax.Array,  # [T, H, D]
    k_new: jax.Array,  # [T, K, D]
    v_new: jax.Array,  # [T, K, D]
    k_cache: jax.Array,  # [K, N, P, D]
    v_cache: jax.Array,  # [K, N, P, D]
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

    Keys come from two places: this step's tokens (`k_new`), scored first, and the cache
    (positions before them), folded in chunk by chunk with an online softmax.

    `decode_only` is a static promise that sequence s owns exactly token s (T == S); it selects a
    per-sequence batched formulation instead of scoring every token against every sequence's
    context and masking, and must give the same results.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    kv_heads = k_cache.shape[0]
    group = num_heads // kv_heads
    token_idx = jnp.arange(num_tokens)
    # Which sequence each token belongs to, and its position in that sequence.
    token_seq = jnp.searchsorted(query_start_loc, token_idx, side="right") - 1  # [T]
    is_real = token_idx < query_start_loc[num_seqs]
    token_seq = jnp.clip(token_seq, 0, num_seqs - 1)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    cached_lens = context_lens - q_lens  # [S]: positions already in the cache
    token_pos = cached_lens[token_seq] + token_idx - query_start_loc[token_seq]  # [T]

    qg = (q.astype(jnp.float32) * scale).reshape(num_tokens, kv_heads, group, head_dim)
    qg = qg.transpose(1, 0, 2, 3)  # [K, T, G, D]
    k_new = k_new.astype(jnp.float32).transpose(1, 0, 2)  # [K, T, D]
    # Padding tokens' values may be anything (NaN in the tests); zero them like the cache slots.
    v_new = jnp.where(is_real[:, None, None], v_new.astype(jnp.float32), 0.0)
    v_new = v_new.transpose(1, 0, 2)  # [K, T, D]

    def window(query_pos: jax.Array, key_pos: jax.Array) -> jax.Array:
        if sliding_window is None:
            return jnp.ones(jnp.broadcast_shapes(query_pos.shape, key_pos.shape), bool)
        return key_pos > query_pos - sliding_window

    def score(pattern: str, keys: jax.Array) -> jax.Array:
        return _softcap(jnp.einsum(pattern, qg, keys), soft_cap)

    if decode_only:
        # Token s is sequence s's only new token: batch over (kv head, sequence); keys axis last.
        own = score("ksgd,ksd->ksg", k_new)[..., None]  # [K, S, G, 1]
        state = _start(own, is_real[None, :, None, None], lambda w: w * v_new[:, :, None, :])

        def absorb_chunk(state, keys, values, key_pos, in_cache):
            visible = in_cache & window(token_pos[:, None], key_pos[None, :]) & is_real[:, None]
            scores = score("ksgd,kscd->ksgc", keys)  # [K, S, G, C]
            return _absorb(
                state,
                scores,
                visible[None, :, None, :],
                lambda w: jnp.einsum("ksgc,kscd->ksgd", w, values),
            )

    else:
        # Every token scores against every new token and every sequence's cached context; masks
        # keep its own sequence's positions. Per kv head these are plain matmuls.
        new_visible = (
            (token_seq[:, None] == token_seq[None, :])
            & (token_idx[None, :] <= token_idx[:, None])
            & window(token_pos[:, None], token_pos[None, :])
            & is_real[None, :]
            & is_real[:, None]
        )  # [T(query), T(key)]
        state = _start(
            score("ktgd,kud->ktgu", k_new),
            new_visible[None, :, None, :],
            lambda w: jnp.einsum("ktgu,kud->ktgd", w, v_new),
        )
        own_seq = token_seq[:, None] == jnp.arange(num_seqs)[None, :]  # [T, S]

        def absorb_chunk(state, keys, values, key_pos, in_cache):
            flat = (kv_heads, -1, head_dim)  # [K, S*C, D]
            visible = (
                own_seq[:, :, None]
                & in_cache[None, :, :]
                & window(token_pos[:, None, None], key_pos[None, None, :])
                & is_real[:, None, None]
            ).reshape(num_tokens, -1)  # [T, S*C]
            return _absorb(
                state,
                score("ktgd,kxd->ktgx", keys.reshape(flat)),
                visible[None, :, None, :],
                lambda w: jnp.einsum("ktgx,kxd->ktgd", w, values.reshape(flat)),
            )

    state = _over_cached_chunks(state, k_cache, v_cache, block_tables, cached_lens, absorb_chunk)
    out = jnp.where(is_real[None, :, None, None], _finish(state), 0.0)  # [K, T, G, D]
    return out.transpose(1, 0, 2, 3).reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
