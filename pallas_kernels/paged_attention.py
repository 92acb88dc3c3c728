"""PagedAttention as one Pallas GPU kernel: ragged prefill and decode over block tables.

Same arguments and results as `reference.paged_attention` (which defines what is right), plus
static tuning knobs. Lowered through Pallas' Triton backend (see README.md for why, and how the
kernel would move to Mosaic GPU); runs on CPU with `interpret=True`.

How the work is cut:
  * Query tiles. Each sequence's new tokens are cut into tiles of `tokens_per_tile` tokens; a tile
    holds those tokens' query heads of one kv head, `rows = tokens_per_tile * G'` rows (G' is the
    GQA group padded to a power of two), so K/V pages are loaded once per kv head and reused by
    every query head that reads them. The grid is (tile, kv head, split); tile i belongs to the
    sequence s whose tiles start at `query_start_loc[s] // tokens_per_tile + s` (at most that many
    tiles precede it), so the grid size is static while the batch stays ragged. Tiles a sequence
    does not need do nothing.
  * Keys come from two places, as in the reference: the cached context (positions before this
    step's tokens) by gathering `pages_per_step` pages through the block table in-kernel, then this
    step's own tokens (`k_new`), causally masked.
  * Split-K. The cached pages of a sequence are divided among `num_splits` programs (decode at long
    context: one sequence alone would otherwise occupy a single streaming multiprocessor per kv
    head); each split writes its normalized output with its softmax max and sum, and a few jnp
    lines combine them. The new tokens' keys are folded in by the last split.

Every key slot outside a sequence's context is masked *and* its value zeroed before the
probability-weighted sum: unused cache blocks may hold anything (NaN in the tests), and 0 * NaN is
NaN.

Dimension legend as in reference.py: T tokens, S sequences, B table width, N cache blocks,
P block size, H query heads, K kv heads, G = H / K, D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # Pallas' Triton backend: deprecated since jax 0.11, to be removed (README.md)
    from jax.experimental.pallas import triton as plt
except ImportError:
    plt = None
# Whether this jax can compile the kernel for a GPU; interpret mode needs no Triton.
TRITON_AVAILABLE = plt is not None

_MASKED = -1e30
MIN_DOT_DIM = 16  # Triton's tl.dot needs at least 16 along every dimension


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def supported_head_dim(head_dim: int) -> bool:
    """Head dims the GPU kernel compiles for: powers of two from 16 to 256 (64/128/256 in practice).

    Triton blocks must be powers of two; a 96 or 80 head dim would need a padded cache layout.
    """
    return MIN_DOT_DIM <= head_dim <= 256 and head_dim == _next_power_of_two(head_dim)


def default_tiling(
    *,
    group: int,
    block_size: int,
    decode_only: bool,
    table_positions: int,
    num_seqs: int | None = None,
    kv_heads: int | None = None,
) -> dict[str, int]:
    """Tile sizes for a shape: ~16 query rows for decode (one token: rows are its query heads,
    padded up to tl.dot's minimum) and ~64 for prefill; ~64 keys per step; and for decode one split
    per 2048 positions of table width, so a long context spreads over more programs (up to 8, or
    16 when the batch has at most 64 (sequence, kv head) pairs: too few programs to fill a GPU's
    132 multiprocessors otherwise).

    Decode loads its pages without Triton's software pipelining (`num_stages=1`): on the H200 the
    long-context cells read 3-4% faster so (benchmarks/paged_attention_sweep.py, 2026-12-04:
    64 x 32k 2.94 vs 3.06 ms, 256 x 8k 2.85 vs 2.95 ms).
    """
    padded_group = _next_power_of_two(group)
    rows = MIN_DOT_DIM if decode_only else 64
    few_programs = num_seqs is not None and kv_heads is not None and num_seqs * kv_heads <= 64
    max_splits = 16 if few_programs else 8
    return {
        "tokens_per_tile": max(1, rows // padded_group),
        "pages_per_step": max(1, 64 // block_size),
        "new_keys_per_step": MIN_DOT_DIM if decode_only else 64,
        "num_splits": max(1, min(max_splits, table_positions // 2048)) if decode_only else 1,
        "num_warps": 4,
        "num_stages": 1 if decode_only else 2,
    }


def _sequence_of(starts: jax.Array, index: jax.Array, num_seqs: int) -> jax.Array:
    """The sequence each index falls in, for non-decreasing sequence starts (the last start <=
    index), clipped to [0, num_seqs). One fused comparison rather than `searchsorted`'s default binary
    search, which XLA runs as a loop of small kernels (a launch each on a GPU); the grids here are
    at most a few thousand by a few hundred."""
    below = (starts[None, :] <= index[:, None]).sum(axis=1)
    return jnp.clip(below - 1, 0, num_seqs - 1).astype(jnp.int32)


def _tile_layout(query_start_loc: jax.Array, num_tiles: int, tokens_per_tile: int):
    """-> per tile (sequence, first token, token count), and per sequence its first tile."""
    num_seqs = query_start_loc.shape[0] - 1
    first_tile = query_start_loc[:-1] // tokens_per_tile + jnp.arange(num_seqs)  # [S], increasing
    tiles = jnp.arange(num_tiles)
    tile_seq = _sequence_of(first_tile, tiles, num_seqs)
    first_token = query_start_loc[tile_seq] + (tiles - first_tile[tile_seq]) * tokens_per_tile
    count = jnp.clip(query_start_loc[tile_seq + 1] - first_token, 0, tokens_per_tile)
    return (
        tile_seq.astype(jnp.int32),
        first_token.astype(jnp.int32),
        count.astype(jnp.int32),
        (first_tile),
    )


def _kernel(
    # per tile [tiles]
    tile_seq_ref,
    tile_first_ref,
    tile_count_ref,
    # per sequence
    query_start_ref,  # [S + 1]
    context_lens_ref,  # [S]
    block_tables_ref,  # [S, B + pages_per_step]
    # this kv head's slices
    q_ref,  # [T' * G', D]: token t's query heads at rows t * G' .. t * G' + G - 1
    k_new_ref,  # [T', D]
    v_new_ref,  # [T', D]
    k_cache_ref,  # [N, P, D]
    v_cache_ref,  # [N, P, D]
    # outputs of this (tile, kv head, split)
    out_ref,  # [rows, D]
    max_ref,  # [rows]
    sum_ref,  # [rows]
    *,
    scale: float,
    group: int,
    padded_group: int,
    tokens_per_tile: int,
    pages_per_step: int,
    new_keys_per_step: int,
    num_splits: int,
    sliding_window: int | None,
    soft_cap: float | None,
):
    tile, split = pl.program_id(0), pl.program_id(2)
    rows = tokens_per_tile * padded_group
    block_size, head_dim = k_cache_ref.shape[1], k_cache_ref.shape[2]
    keys_per_step = pages_per_step * block_size

    seq = tile_seq_ref[tile]
    first_token, count = tile_first_ref[tile], tile_count_ref[tile]
    seq_start = query_start_ref[seq]
    q_len = query_start_ref[seq + 1] - seq_start
    cached = context_lens_ref[seq] - q_len  # positions already in the cache

    row = jnp.arange(rows)
    row_token = row // padded_group  # token within the tile
    row_real = (row_token < count) & (row % padded_group < group)
    local = first_token - seq_start  # first token's index among the sequence's new tokens
    query_pos = cached + local + row_token  # [rows]

    q = q_ref[pl.ds(first_token * padded_group, rows), :]
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def scores_of(keys):  # [rows, D] x [C, D] -> [rows, C], float32
        s = jax.lax.dot_general(
            q,
            keys,
            (((1,), (1,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        s = s * scale
        return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)

    def absorb(state, keys, values, key_pos, key_ok):
        """Fold keys [C, D] / values [C, D] at positions key_pos [C] into the softmax state."""
        top, total, acc = state
        visible = key_ok[None, :] & row_real[:, None] & (key_pos[None, :] <= query_pos[:, None])
        if sliding_window is not None:
            visible &= key_pos[None, :] > query_pos[:, None] - sliding_window
        s = jnp.where(visible, scores_of(keys), _MASKED)
        new_top = jnp.maximum(top, s.max(axis=1))
        weights = jnp.where(visible, jnp.exp(s - new_top[:, None]), 0.0)
        values = jnp.where(key_ok[:, None], values, jnp.zeros_like(values))
        weighted = jax.lax.dot_general(
            weights.astype(values.dtype),
            values,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        rescale = jnp.exp(top - new_top)
        return new_top, total * rescale + weights.sum(axis=1), acc * rescale[:, None] + weighted

    state = (
        jnp.full((rows,), _MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )

    # 1. Cached context: this split's share of the pages the tile's queries can see.
    lowest_pos = cached + local  # the tile's first query
    first_page = 0
    if sliding_window is not None:
        first_page = jnp.maximum(lowest_pos - sliding_window + 1, 0) // block_size
    cached_pages = (cached + block_size - 1) // block_size
    per_split = (jnp.maximum(cached_pages - first_page, 0) + num_splits - 1) // num_splits
    begin = first_page + split * per_split
    end = jnp.minimum(begin + per_split, cached_pages)
    end_pos = jnp.minimum(end * block_size, cached)

    def cached_step(i, state):
        page0 = begin + i * pages_per_step
        pages = block_tables_ref[seq, pl.ds(page0, pages_per_step)]
        # An fp8 cache (kv_cache_dtype) is widened to the query's type for the dots.
        keys = k_cache_ref[pages].reshape(keys_per_step, head_dim).astype(q.dtype)
        values = v_cache_ref[pages].reshape(keys_per_step, head_dim).astype(q.dtype)
        key_pos = page0 * block_size + jnp.arange(keys_per_step)
        return absorb(state, keys, values, key_pos, key_pos < end_pos)

    steps = (jnp.maximum(end - begin, 0) + pages_per_step - 1) // pages_per_step
    steps = jnp.where(count > 0, steps, 0)  # a tile the sequence does not need reads nothing
    state = jax.lax.fori_loop(0, steps, cached_step, state)

    # 2. This step's own tokens (causal), folded in by the last split.
    def new_step(i, state):
        key0 = key_begin + i * new_keys_per_step  # index among the sequence's new tokens
        keys = k_new_ref[pl.ds(seq_start + key0, new_keys_per_step), :]
        values = v_new_ref[pl.ds(seq_start + key0, new_keys_per_step), :]
        key_local = key0 + jnp.arange(new_keys_per_step)
        return absorb(state, keys, values, cached + key_local, key_local < q_len)

    key_begin = 0
    if sliding_window is not None:
        key_begin = jnp.maximum(local - sliding_window + 1, 0)
        key_begin = key_begin // new_keys_per_step * new_keys_per_step
    key_end = local + count  # past the tile's last query: causal
    new_steps = (jnp.maximum(key_end - key_begin, 0) + new_keys_per_step - 1) // new_keys_per_step
    new_steps = jnp.where((split == num_splits - 1) & (count > 0), new_steps, 0)
    top, total, acc = jax.lax.fori_loop(0, new_steps, new_step, state)

    out_ref[...] = (acc / jnp.where(total > 0, total, 1.0)[:, None]).astype(out_ref.dtype)
    max_ref[...] = top
    sum_ref[...] = total


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "decode_only",
        "sliding_window",
        "soft_cap",
        "interpret",
        "tokens_per_tile",
        "pages_per_step",
        "new_keys_per_step",
        "num_splits",
        "num_warps",
        "num_stages",
    ),
)
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
    interpret: bool = False,
    tokens_per_tile: int | None = None,
    pages_per_step: int | None = None,
    new_keys_per_step: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:  # [T, H, D]
    """Causal attention of each new token over its own sequence's paged context (the kernel).

    Arguments and result as `reference.paged_attention`; the tuning knobs default to
    `default_tiling` for the shape. `decode_only` (T == S, token s is sequence s's) lets every
    sequence take exactly one query tile.
    """
    num_tokens, num_heads, head_dim = q.shape
    kv_heads, _, block_size, _ = k_cache.shape
    num_seqs, table_width = block_tables.shape
    group = num_heads // kv_heads
    padded_group = _next_power_of_two(group)
    tiling = default_tiling(
        group=group,
        block_size=block_size,
        decode_only=decode_only,
        table_positions=table_width * block_size,
        num_seqs=num_seqs,
        kv_heads=kv_heads,
    )
    tokens_per_tile = tokens_per_tile or tiling["tokens_per_tile"]
    pages_per_step = pages_per_step or tiling["pages_per_step"]
    new_keys_per_step = new_keys_per_step or tiling["new_keys_per_step"]
    num_splits = num_splits or tiling["num_splits"]
    num_warps = num_warps or tiling["num_warps"]
    num_stages = num_stages or tiling["num_stages"]
    rows = tokens_per_tile * padded_group

    if decode_only:  # one tile per sequence: tile s holds token s
        num_tiles = num_seqs
        tile_seq = jnp.arange(num_seqs, dtype=jnp.int32)
        tile_first = tile_seq
        real = jnp.arange(num_seqs) < query_start_loc[num_seqs]
        tile_count = real.astype(jnp.int32)
        first_tile = tile_seq
    else:
        num_tiles = num_tokens // tokens_per_tile + num_seqs
        tile_seq, tile_first, tile_count, first_tile = _tile_layout(
            query_start_loc, num_tiles, tokens_per_tile
        )

    # Padding so that every fixed-size load stays inside its array: a tile may start at the last
    # token, a new-key step may start at the last token, a page step may start at the last page.
    token_pad = max(tokens_per_tile, new_keys_per_step)
    q_heads = jnp.pad(
        q.reshape(num_tokens, kv_heads, group, head_dim),
        ((0, token_pad), (0, 0), (0, padded_group - group), (0, 0)),
    )  # [T', K, G', D]
    q_heads = q_heads.transpose(1, 0, 2, 3).reshape(kv_heads, -1, head_dim)  # [K, T' * G', D]
    k_new_t = jnp.pad(k_new, ((0, token_pad), (0, 0), (0, 0))).transpose(1, 0, 2)  # [K, T', D]
    v_new_t = jnp.pad(v_new, ((0, token_pad), (0, 0), (0, 0))).transpose(1, 0, 2)
    tables = jnp.pad(block_tables, ((0, 0), (0, pages_per_step)))  # padded entries: block 0

    def whole(a: jax.Array) -> pl.BlockSpec:  # every program sees the whole array
        return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)

    def per_kv_head(a: jax.Array) -> pl.BlockSpec:  # program (t, k, sp) sees a[k]
        return pl.BlockSpec((None, *a.shape[1:]), lambda t, k, sp: (k,) + (0,) * (a.ndim - 1))

    split_dtype = jnp.float32 if num_splits > 1 else q.dtype
    kernel = functools.partial(
        _kernel,
        scale=scale,
        group=group,
        padded_group=padded_group,
        tokens_per_tile=tokens_per_tile,
        pages_per_step=pages_per_step,
        new_keys_per_step=new_keys_per_step,
        num_splits=num_splits,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    if plt is None and not interpret:
        raise NotImplementedError(
            f"jax {jax.__version__} has no Pallas Triton backend: the kernel runs only "
            "interpreted; use attention_backend='reference' (pallas_kernels/README.md)"
        )
    compiler_params = (
        None if plt is None else plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    )
    per_tile_args = (tile_seq, tile_first, tile_count)
    per_seq_args = (query_start_loc, context_lens, tables)
    per_head_args = (q_heads, k_new_t, v_new_t, k_cache, v_cache)
    out, top, total = pl.pallas_call(
        kernel,
        grid=(num_tiles, kv_heads, num_splits),
        in_specs=[whole(a) for a in per_tile_args + per_seq_args]
        + [per_kv_head(a) for a in per_head_args],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda t, k, sp: (sp, t, k, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda t, k, sp: (sp, t, k, 0)),
            pl.BlockSpec((None, None, None, rows), lambda t, k, sp: (sp, t, k, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, num_tiles, kv_heads, rows, head_dim), split_dtype),
            jax.ShapeDtypeStruct((num_splits, num_tiles, kv_heads, rows), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, num_tiles, kv_heads, rows), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"paged_attention_{'decode' if decode_only else 'ragged'}",
    )(*per_tile_args, *per_seq_args, *per_head_args)

    if num_splits > 1:  # combine the splits' partial softmaxes
        best = top.max(axis=0)
        weight = total * jnp.exp(top - best[None])  # [splits, tiles, K, rows]
        norm = weight.sum(axis=0)
        out = (out * weight[..., None]).sum(axis=0) / jnp.where(norm > 0, norm, 1.0)[..., None]
    else:
        out = out[0]

    out = out.reshape(num_tiles, kv_heads, tokens_per_tile, padded_group, head_dim)
    if decode_only:  # tile s holds token s in its first row group: no search needed
        out = out[:, :, 0, :group, :]  # [T, K, G, D]
        real = jnp.arange(num_tokens) < query_start_loc[num_seqs]
    else:
        # Back to token order: token t of sequence s sits in tile first_tile[s] + local // tiles,
        # at rows (local % tokens_per_tile) * G' + g.
        token = jnp.arange(num_tokens)
        seq = _sequence_of(query_start_loc, token, num_seqs)
        local = token - query_start_loc[seq]
        tile = jnp.clip(first_tile[seq] + local // tokens_per_tile, 0, num_tiles - 1)
        out = out[tile, :, local % tokens_per_tile, :group, :]  # [T, K, G, D]
        real = token < query_start_loc[num_seqs]
    out = jnp.where(real[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def num_programs(
    num_tokens: int, num_seqs: int, kv_heads: int, *, decode_only: bool, **tiling: int
) -> int:
    """The kernel's grid size for a shape (the benchmark reports it)."""
    tiles = num_seqs if decode_only else num_tokens // tiling["tokens_per_tile"] + num_seqs
    return tiles * kv_heads * tiling["num_splits"]
