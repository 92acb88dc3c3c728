"""Paged attention whose every token's result is independent of the step it runs in.

Same arguments and layout contract as `reference.paged_attention` (read its legend), and the same
numbers up to float32 rounding; what differs is the order of the arithmetic. The reference scores
a token's new keys (this step's) first, in one contraction as long as the step, and its cached
keys after, so how a token's context is summed depends on the step's size and on where chunked
prefill cut the prompt. Here every token walks its whole context, cached and new alike, in chunks
of `CHUNK_POSITIONS` aligned to absolute positions, folding each into an online softmax in order.
Each chunk's contractions (over head_dim, and over the chunk's positions) measured row-invariant
at any batch shape on XLA:CPU, and a chunk a token cannot see adds exactly zero (scale 1, sum
+ 0), so the result depends only on the token's query, its context's K/V and its position: not on
the batch, its row, the bucket, the prefill's chunking, or whether its context was computed in
this step, an earlier one, or before a preemption. This is the attention of the batch-invariant
mode (`EngineConfig.batch_invariant`), together with `jaxinfer.models.matmul`'s fixed row tiles.

Queries go in tiles of `QUERY_TILE` consecutive tokens of one sequence (one token per tile in a
decode, `decode_only`), so a tile's queries share each gathered chunk of keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import reference
from pallas_kernels.reference import _MASKED, CHUNK_POSITIONS, _finish, _gather_context, _softcap

QUERY_TILE = 16


def tree_sum(x: jax.Array, axis: int = -1) -> jax.Array:
    """Sum along `axis` by repeated halving (zero-padded to a power of two): an order of additions
    fixed by the axis' length alone. XLA:CPU's own reduce is not: the same row of length 128 sums
    differently in a [16, 128] array than in a [32, 128] one (measured; the emitter's strategy
    follows the whole array's size). Elementwise adds are never reassociated, so this is exact
    to the bit in any batch."""
    axis = axis % x.ndim
    length = x.shape[axis]
    size = 1 << max(length - 1, 0).bit_length()
    if size != length:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, size - length)
        x = jnp.pad(x, widths)
    while size > 1:
        size //= 2
        x = jax.lax.slice_in_dim(x, 0, size, axis=axis) + jax.lax.slice_in_dim(
            x, size, 2 * size, axis=axis
        )
    return jnp.squeeze(x, axis)


def _absorb(state, scores: jax.Array, visible: jax.Array, contract):
    """`reference._absorb` (flash attention's rescaling) with the softmax sum a `tree_sum`."""
    return reference._absorb(state, scores, visible, contract, sum_keys=tree_sum)


def _tiles(query_start_loc: jax.Array, num_tokens: int, rows: int):
    """Cut each sequence's new tokens into tiles of `rows`: -> (tile's sequence [N], tile's first
    token within its sequence [N], tile is real [N], token's tile [T], token's slot in it [T])."""
    num_seqs = query_start_loc.shape[0] - 1
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    per_seq = (q_lens + rows - 1) // rows
    ends = jnp.cumsum(per_seq)
    firsts = ends - per_seq
    # A sequence adds at most one partial tile: this many tiles always suffice.
    num_tiles = num_tokens if rows == 1 else num_tokens // rows + num_seqs
    tile_ids = jnp.arange(num_tiles)
    tile_seq = jnp.minimum(jnp.searchsorted(ends, tile_ids, side="right"), num_seqs - 1)
    tile_real = tile_ids < ends[-1]
    tile_first = (tile_ids - firsts[tile_seq]) * rows
    token_idx = jnp.arange(num_tokens)
    token_seq = jnp.clip(jnp.searchsorted(query_start_loc, token_idx, side="right") - 1, 0, None)
    token_seq = jnp.minimum(token_seq, num_seqs - 1)
    local = token_idx - query_start_loc[token_seq]
    token_tile = jnp.clip(firsts[token_seq] + local // rows, 0, num_tiles - 1)
    return tile_seq, tile_first, tile_real, token_tile, local % rows


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
    """Causal attention of each new token over its own sequence's paged context (module doc)."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    kv_heads, _, block_size, _ = k_cache.shape
    group = num_heads // kv_heads
    rows = 1 if decode_only else QUERY_TILE
    tile_seq, tile_first, tile_real, token_tile, token_slot = _tiles(
        query_start_loc, num_tokens, rows
    )
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    cached_lens = (context_lens - q_lens)[tile_seq]  # [N]
    starts = query_start_loc[:-1][tile_seq]  # [N]: the tile's sequence's first row in q
    local = tile_first[:, None] + jnp.arange(rows)[None, :]  # [N, R] index among the new tokens
    query_real = tile_real[:, None] & (local < q_lens[tile_seq][:, None])
    query_pos = cached_lens[:, None] + local  # [N, R] absolute positions
    last_row = max(num_tokens - 1, 0)

    queries = q[jnp.clip(starts[:, None] + local, 0, last_row)].astype(jnp.float32) * scale
    queries = queries.reshape(*local.shape, kv_heads, group, head_dim)
    queries = queries.transpose(2, 0, 1, 3, 4)  # [K, N, R, G, D]

    chunk_blocks = max(1, CHUNK_POSITIONS // block_size)
    chunk_len = chunk_blocks * block_size
    pad = -block_tables.shape[1] % chunk_blocks
    tables = jnp.pad(block_tables, ((0, 0), (0, pad)))[tile_seq]  # [N, B'] (block 0: padding)
    context = cached_lens + q_lens[tile_seq]  # [N]

    def one_chunk(index: jax.Array, state):
        key_pos = index * chunk_len + jnp.arange(chunk_len)  # [C]
        blocks = jax.lax.dynamic_slice_in_dim(tables, index * chunk_blocks, chunk_blocks, 1)
        in_cache = key_pos[None, :] < cached_lens[:, None]  # [N, C]
        is_new = ~in_cache & (key_pos[None, :] < context[:, None])
        new_rows = jnp.clip(starts[:, None] + key_pos[None, :] - cached_lens[:, None], 0, last_row)

        def context_of(cache: jax.Array, new: jax.Array) -> jax.Array:  # -> [K, N, C, D]
            fresh = new[new_rows].astype(jnp.float32).transpose(2, 0, 1, 3)
            merged = jnp.where(is_new[None, :, :, None], fresh, _gather_context(cache, blocks))
            # Slots outside the context may hold anything (padding, stale or NaN data).
            return jnp.where((in_cache | is_new)[None, :, :, None], merged, 0.0)

        keys, values = context_of(k_cache, k_new), context_of(v_cache, v_new)
        visible = (
            query_real[:, :, None]
            & (in_cache | is_new)[:, None, :]
            & (key_pos[None, None, :] <= query_pos[:, :, None])
        )  # [N, R, C]
        if sliding_window is not None:
            visible &= key_pos[None, None, :] > query_pos[:, :, None] - sliding_window
        scores = _softcap(jnp.einsum("knrgd,kncd->knrgc", queries, keys), soft_cap)
        return _absorb(
            state,
            scores,
            visible[None, :, :, None, :],
            lambda w: jnp.einsum("knrgc,kncd->knrgd", w, values),
        )

    shape = queries.shape[:-1]  # [K, N, R, G]
    state = (jnp.full(shape, _MASKED), jnp.zeros(shape), jnp.zeros(queries.shape))
    num_chunks = (jnp.max(context_lens) + chunk_len - 1) // chunk_len
    state = jax.lax.fori_loop(0, num_chunks, one_chunk, state)
    out = _finish(state)[:, token_tile, token_slot]  # [K, T, G, D]
    is_real = jnp.arange(num_tokens) < query_start_loc[num_seqs]
    out = jnp.where(is_real[None, :, None, None], out, 0.0)
    return out.transpose(1, 0, 2, 3).reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
