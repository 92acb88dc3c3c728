"""vLLM's V1 sampling pipeline as one pure, row-independent function of (logits, SamplingTensors).

Order, as vLLM's V1 sampler: raw logprobs (log_softmax of the f32 logits) are captured first ->
allowed_token_ids / bad words -> min_tokens (eos and stop ids banned) and logit_bias ->
penalties (repetition over prompt and output; frequency and presence over the output) -> greedy
rows take the argmax -> temperature -> min_p -> top-k -> top-p -> sample.

A row whose processed logits are all -inf (min_tokens banning the only allowed tokens left, or
penalties pushing every logit to -inf) would emit token 0, the argmax of all -inf, as vLLM's does.
Here it falls back instead, first to the best raw logit within `allowed_mask` (allowed_token_ids
less the bad words): min_tokens' ban, logit_bias and penalties give way before allowed_token_ids
and bad words do. Only if `allowed_mask` is empty too does it take the raw argmax over the whole
vocabulary, and the host keeps that from happening: intake rejects allowed_token_ids that are all
bad words, and the engine must not ban, for one step, the last allowed token.

Legend: S rows, V vocabulary, K = max_top_k (static), C = candidate tokens per row (K).

Top-k / top-p without sorting the vocabulary, exactly:
1. Candidates: `lax.top_k` of the min_p-masked scaled logits with K + 1 entries. The K-th value is
   the top-k threshold for any top_k <= K; the (K + 1)-th, the *probe*, bounds every token outside
   the candidates. Top-p then works on the candidates' sorted values: a token is kept when the
   probability of the tokens strictly above it is below top_p times the total (vLLM's rule;
   tokens of equal probability are kept or dropped together, where vLLM's sort may split them). A row is *settled* when the kept set provably lies
   inside the candidates: the probe is -inf (fewer than K + 1 tokens survive), or top-k drops it,
   or the mass above it already reaches top_p. Settled rows sample among their K candidates.
2. Unsettled rows (top_k > K, top_p whose nucleus is wider than K tokens, or plain temperature
   sampling over a wide distribution) take the full-vocabulary path: each threshold is found by
   bisection over the bit patterns of f32 values, which order like the values (31 masked sums
   over V for top-p, 32 counts for top-k > K; exact, no sort), then a draw over all V tokens. A batch-level `lax.cond` runs
   it only when some row needs it, and each row's token comes from the path its own row chose,
   so a row's result never depends on the other rows.
3. The draw is Gumbel-max with noise that is a pure function of (row key, token id) -- threefry
   of (key, token_id // 2), word token_id % 2 -- so both paths, any K and any batch see the same
   noise for the same token; the two paths give the same token (tested).

Measured on this project's shared 2-core CPU (jax 0.10.2, S = 64, K = 256, jit, best of 5 calls,
freed memory kept mapped as the engine keeps it, 2026-12-04; `benchmarks/sampling.py` reproduces
it):

    case                                           V = 32,000    V = 151,936
    greedy, nothing else (fast path)                   3.5 ms        9.5 ms
    greedy + penalties, bias, masks                    6.0 ms       27.6 ms
    all features, top_k = 50 (candidate path)         14.3 ms       75.9 ms
    all features, top_k off, top_p 0.9 (bisection)    31.9 ms      254.3 ms
    temperature only (full-vocabulary draw)           26.7 ms      156.3 ms
    argsort + cumsum top-p (reference, not used)     473.5 ms     2700.3 ms

Most of the full-vocabulary cost is the threefry noise for every token and XLA:CPU's reductions
along the vocabulary, which it runs one element at a time: on the CPU the argmax, the finite
check and the log-softmax normalizer therefore come from one kernel call (`logit_stats`,
kernels/row_stats.py; the greedy row was 5.3 / 20.0 ms before it). A program whose temporaries
exceed glibc's 32 MiB mmap threshold page-faults them in on every call (~0.25 ms per MB touched
here) unless freed memory stays mapped (`mallopt`, jaxinfer.runtime.host_allocator, which the
engine sets up on the CPU), which is why the greedy paths avoid [S, V] temporaries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.random import threefry_2x32

from jaxinfer.kernels import row_stats as row_kernel
from jaxinfer.kernels.row_stats import RowStats, row_stats
from jaxinfer.kernels.row_stats import cpu_kernel_enabled as row_stats_enabled
from jaxinfer.models import invariant
from jaxinfer.runtime.sampling_tensors import SamplingTensors
from jaxinfer.sampling_params import GREEDY_TEMPERATURE

_NEG_INF = float("-inf")
_TINY = float(jnp.finfo(jnp.float32).tiny)
_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)


# ---------------------------------------------------------------- logits processing (vLLM order)


def apply_penalties(
    logits: jax.Array,  # [S, V] f32
    prompt_mask: jax.Array,  # [S, V] bool
    output_counts: jax.Array,  # [S, V] i32
    repetition_penalty: jax.Array,  # [S]
    frequency_penalty: jax.Array,  # [S]
    presence_penalty: jax.Array,  # [S]
) -> jax.Array:
    """vLLM's `apply_penalties`: repetition over prompt and output, the others over the output."""
    in_output = output_counts > 0
    repetition = jnp.where(prompt_mask | in_output, repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / repetition, logits * repetition)
    logits = logits - frequency_penalty[:, None] * output_counts.astype(jnp.float32)
    return logits - presence_penalty[:, None] * in_output.astype(jnp.float32)


def process_logits(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """[S, V] f32 logits after masks, min_tokens, logit_bias and penalties (what greedy argmaxes)."""
    logits = jnp.where(t.allowed_mask, logits.astype(jnp.float32), _NEG_INF)
    min_tokens_unmet = t.num_output_tokens < t.min_tokens  # [S]
    logits = jnp.where(min_tokens_unmet[:, None] & t.stop_mask, _NEG_INF, logits)
    logits = logits + t.logit_bias
    return apply_penalties(
        logits,
        t.prompt_mask,
        t.output_counts,
        t.repetition_penalty,
        t.frequency_penalty,
        t.presence_penalty,
    )


# ---------------------------------------------------------------- per-token noise


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """[S, 2] u32 threefry key data of `fold_in(key(seed), position)` for each row."""

    def one(seed: jax.Array, position: jax.Array) -> jax.Array:
        key = jax.random.key(seed, impl="threefry2x32")
        return jax.random.key_data(jax.random.fold_in(key, position))

    return jax.vmap(one)(seeds.astype(jnp.uint32), positions.astype(jnp.int32))


def _hash_pairs(keys: jax.Array, pairs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both threefry words of (key, (pair, 0)): keys [S, 2] u32, pairs [S, N] u32 -> 2 x [S, N]."""

    def one(key: jax.Array, row_pairs: jax.Array) -> jax.Array:
        # threefry_2x32 hashes (count[i], count[i + half]): with zeros as the second half,
        # word 0 of pair i lands at i and word 1 at half + i.
        return threefry_2x32(key, jnp.concatenate([row_pairs, jnp.zeros_like(row_pairs)]))

    words = jax.vmap(one)(keys, pairs)
    n = pairs.shape[1]
    return words[:, :n], words[:, n:]


def _gumbel_from_bits(bits: jax.Array) -> jax.Array:
    """u32 -> standard Gumbel f32 (uniform from the top 23 bits, as jax.random.uniform)."""
    mantissa = jax.lax.shift_right_logical(bits, jnp.uint32(9)) | jnp.uint32(0x3F800000)
    uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0
    return -jnp.log(-jnp.log(jnp.maximum(uniform, _TINY)))


def token_gumbel(keys: jax.Array, token_ids: jax.Array) -> jax.Array:
    """[S, N] Gumbel noise of the given tokens, a pure function of (row key, token id)."""
    word0, word1 = _hash_pairs(keys, jax.lax.shift_right_logical(token_ids, 1).astype(jnp.uint32))
    return _gumbel_from_bits(jnp.where(token_ids % 2 == 1, word1, word0))


def vocab_gumbel(keys: jax.Array, vocab_size: int) -> jax.Array:
    """[S, V] the same noise as `token_gumbel` for every token, one hash per two tokens."""
    num_pairs = (vocab_size + 1) // 2
    pairs = jnp.broadcast_to(jnp.arange(num_pairs, dtype=jnp.uint32), (keys.shape[0], num_pairs))
    word0, word1 = _hash_pairs(keys, pairs)
    bits = jnp.stack([word0, word1], axis=-1).reshape(keys.shape[0], 2 * num_pairs)
    return _gumbel_from_bits(bits[:, :vocab_size])


# ---------------------------------------------------------------- exact thresholds by bisection


def _order_key(x: jax.Array) -> jax.Array:
    """f32 -> u32 with the same order (for non-NaN values): flip negatives, set the sign bit."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_order_key(key: jax.Array) -> jax.Array:
    """The inverse of `_order_key`."""
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _bisect_u32(predicate, num_rows: int, hi: int, largest_true: bool) -> jax.Array:
    """Per row, the smallest x in [0, hi] with predicate(x) (predicate monotone false -> true),
    or with `largest_true` the largest x with predicate(x) (monotone true -> false)."""

    def step(_, bounds):
        lo, hi = bounds
        half = (hi - lo) // 2
        if largest_true:
            mid = lo + half + (hi - lo) % 2  # ceil, so that lo = mid always moves
            ok = predicate(mid)
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
        mid = lo + half
        ok = predicate(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    bounds = (jnp.zeros(num_rows, jnp.uint32), jnp.full(num_rows, hi, jnp.uint32))
    lo, hi = jax.lax.fori_loop(0, hi.bit_length(), step, bounds)  # each step halves hi - lo + 1
    return lo if largest_true else hi


def kth_largest(values: jax.Array, k: jax.Array) -> jax.Array:
    """[S] each row's k-th largest value, counting repeats (values [S, V] f32, 1 <= k <= V).

    The largest x with count(values >= x) >= k, over the order-preserving u32 image of f32:
    32 counting passes, exact. Keys are recomputed inside the loop rather than kept in memory.
    """
    key = _bisect_u32(
        lambda x: jnp.sum(_order_key(values) >= x[:, None], axis=-1) >= k,
        values.shape[0],
        hi=0xFFFFFFFF,
        largest_true=True,
    )
    return _from_order_key(key)


def top_p_threshold(weights: jax.Array, limit: jax.Array) -> jax.Array:
    """[S] the smallest weight w whose mass strictly above stays below `limit`: the tokens with
    weight >= w are the top-p set (weights [S, V] >= 0, unnormalized; limit [S] = top_p * total).

    Non-negative f32 order like their bits, so the search runs over bits 0 .. 0x7F800000 (inf):
    31 passes of one masked sum, exact.
    """
    bits = _bisect_u32(
        lambda x: (
            invariant.row_sum(
                jnp.where(
                    weights > jax.lax.bitcast_convert_type(x, jnp.float32)[:, None], weights, 0.0
                )
            )
            < limit
        ),
        weights.shape[0],
        hi=0x7F800000,
        largest_true=False,
    )
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


# ---------------------------------------------------------------- the random path


def _sample_random(
    processed: jax.Array, t: SamplingTensors, max_top_k: int, topk_barrier: bool = True
) -> jax.Array:
    """[S] tokens drawn after temperature, min_p, top-k and top-p (greedy rows: meaningless)."""
    num_rows, vocab_size = processed.shape
    k_cap = min(max_top_k, vocab_size)
    is_greedy = t.temperature < GREEDY_TEMPERATURE
    temperature = jnp.where(is_greedy, 1.0, t.temperature)
    # Finite logits stay finite (a tiny repetition_penalty or temperature can push them past
    # float32's range): an inf in the arithmetic below would make NaNs and an arbitrary token.
    scaled = jnp.where(
        processed == _NEG_INF,
        _NEG_INF,
        jnp.clip(processed / temperature[:, None], -_FLOAT32_MAX, _FLOAT32_MAX),
    )
    row_max = jnp.max(scaled, axis=-1)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # all-masked rows stay all -inf
    # min_p: p < min_p * p_max  <=>  scaled - max < log(min_p); log(0) = -inf keeps everything.
    keep_min_p = scaled - row_max[:, None] >= jnp.log(t.min_p)[:, None]
    scaled = jnp.where(keep_min_p, scaled, _NEG_INF)  # [S, V]

    num_probe = min(k_cap + 1, vocab_size)
    # The barrier keeps XLA:CPU's TopK kernel: without it the slices below are merged into the
    # top_k and the rewritten pattern falls back to a full sort of the vocabulary (40x slower).
    # On a multi-device mesh the barrier is left out: XLA (jax 0.10.2) then fails an HLO cast
    # compiling it ("optimization_barrier ... cannot be downcasted"), and GPUs need no barrier.
    values, ids = jax.lax.top_k(scaled, num_probe)  # [S, K + 1]
    if topk_barrier:
        values, ids = jax.lax.optimization_barrier((values, ids))
    probe = values[:, k_cap] if k_cap < vocab_size else jnp.full(num_rows, _NEG_INF)
    values, ids = values[:, :k_cap], ids[:, :k_cap]  # candidates [S, C]

    top_k = t.top_k
    top_k_off = (top_k <= 0) | (top_k >= vocab_size)
    top_k_small = ~top_k_off & (top_k <= k_cap)
    top_k_large = ~top_k_off & ~top_k_small
    kth = jnp.take_along_axis(values, jnp.clip(top_k - 1, 0, k_cap - 1)[:, None], axis=-1)[:, 0]
    kth = jnp.where(top_k_small, kth, _NEG_INF)  # large-k rows are finished on the full path

    # Unnormalized probabilities after top-k; their total includes tokens outside the candidates.
    total = invariant.row_sum(
        jnp.exp(jnp.where(scaled >= kth[:, None], scaled, _NEG_INF) - row_max[:, None])
    )
    top_p_on = t.top_p < 1.0
    limit = t.top_p * total  # [S]

    # Candidate path: the mass strictly above each candidate; equal weights form one tie group.
    cand = jnp.where(values >= kth[:, None], values, _NEG_INF)  # [S, C], still descending
    weights = jnp.exp(cand - row_max[:, None])  # [S, C], non-increasing
    above = invariant.cumsum(weights) - weights
    starts = jnp.arange(k_cap)[None, :] * jnp.concatenate(
        [jnp.ones((num_rows, 1), bool), weights[:, 1:] != weights[:, :-1]], axis=-1
    )
    above = jnp.take_along_axis(above, jax.lax.cummax(starts, axis=1), axis=-1)
    keep = (cand > _NEG_INF) & (~top_p_on[:, None] | (above < limit[:, None]))
    probe_weight = jnp.exp(probe - row_max)
    mass_above_probe = invariant.row_sum(jnp.where(weights > probe_weight[:, None], weights, 0.0))
    settled = (
        is_greedy
        | (probe == _NEG_INF)
        | (top_k_small & (probe < kth))
        | (~top_k_large & top_p_on & (mass_above_probe >= limit))
    )
    keys = row_keys(t.seeds, t.positions)
    cand_tokens = _gumbel_argmax(jnp.where(keep, cand + token_gumbel(keys, ids), _NEG_INF), ids)

    def full_vocab() -> jax.Array:
        need_kth = ~settled & top_k_large
        row_kth = jax.lax.cond(
            jnp.any(need_kth),
            lambda: jnp.where(need_kth, kth_largest(scaled, jnp.clip(top_k, 1, vocab_size)), kth),
            lambda: kth,
        )
        kept = (scaled >= row_kth[:, None]) & (scaled > _NEG_INF)
        weights = jnp.where(kept, jnp.exp(scaled - row_max[:, None]), 0.0)  # [S, V]
        row_limit = jnp.where(need_kth, t.top_p * invariant.row_sum(weights), limit)
        need_top_p = ~settled & top_p_on
        threshold = jax.lax.cond(
            jnp.any(need_top_p),
            lambda: jnp.where(need_top_p, top_p_threshold(weights, row_limit), 0.0),
            lambda: jnp.zeros(num_rows, jnp.float32),
        )
        kept = kept & (weights >= threshold[:, None])
        scores = jnp.where(kept, scaled + vocab_gumbel(keys, vocab_size), _NEG_INF)
        return jnp.where(settled, cand_tokens, argmax(scores))

    return jax.lax.cond(jnp.all(settled), lambda: cand_tokens, full_vocab)


def logit_stats(logits: jax.Array, bitmask: jax.Array | None = None) -> RowStats:
    """Each row's argmax (the first on ties, as `jnp.argmax`), maximum and log-softmax normalizer
    of the logits after `bitmask` (`apply_token_bitmask`; None: all allowed), and whether the
    logits before it are all finite. `log_softmax == (masked - shift) - log_sum`.

    On XLA:CPU one custom call (kernels/row_stats.py: XLA:CPU's reductions along a row run one
    element at a time, and these were a sizable part of a decode step); elsewhere `lax.top_k`
    (on XLA:CPU's TopK kernel beats the variadic reduce behind `jnp.argmax`) and
    `invariant.log_normalizer`. Unused fields cost nothing under jit.
    """
    logits = logits.astype(jnp.float32)
    if row_stats_enabled():
        return row_stats(logits, bitmask)
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    if bitmask is not None:
        logits = apply_token_bitmask(logits, bitmask)
    values, ids = jax.lax.top_k(logits, 1)
    shift, log_sum = invariant.log_normalizer(logits)
    return RowStats(
        argmax=ids[:, 0].astype(jnp.int32), max=values[:, 0], shift=shift, log_sum=log_sum,
        finite=finite,
    )  # fmt: skip


def argmax(x: jax.Array) -> jax.Array:
    """[S] int32 index of each row's maximum, the first on ties, as `jnp.argmax`."""
    return logit_stats(x).argmax


def _argmax_and_max(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[S] int32 index of each row's maximum (the first on ties) and [S] the maximum itself."""
    stats = logit_stats(x)
    return stats.argmax, stats.max


def _unless_all_masked(
    tokens: jax.Array,  # [S] int32, from the processed logits
    row_max: jax.Array,  # [S] f32, each row's largest processed logit
    logits: jax.Array,  # [S, V] f32, raw
    t: SamplingTensors,
) -> jax.Array:
    """`tokens`, except in rows whose processed logits are all -inf (see the module docstring):
    there the best raw logit within `allowed_mask`, or over everything if that is empty too.

    A batch-level `lax.cond` keeps the extra pass over [S, V] off the usual path; each row's
    token is a function of its own row only.
    """
    empty = row_max == _NEG_INF  # [S]

    def fallback() -> jax.Array:
        # A -inf raw logit must still beat a masked token, so raw logits are floored first.
        floored = jnp.maximum(logits, -_FLOAT32_MAX)
        in_allowed, best_allowed = _argmax_and_max(jnp.where(t.allowed_mask, floored, _NEG_INF))
        choice = jnp.where(best_allowed > _NEG_INF, in_allowed, argmax(logits))
        return jnp.where(empty, choice, tokens)

    return jax.lax.cond(jnp.any(empty), fallback, lambda: tokens)


def _gumbel_argmax(scores: jax.Array, ids: jax.Array) -> jax.Array:
    """[S] the id with the best score; ties go to the smallest id, as argmax over the vocabulary."""
    best = jnp.max(scores, axis=-1, keepdims=True)
    return jnp.min(jnp.where(scores == best, ids, jnp.iinfo(jnp.int32).max), axis=-1)


# ---------------------------------------------------------------- public entry points


def sample(
    logits: jax.Array,  # [S, V] any float dtype
    t: SamplingTensors,
    max_top_k: int = 256,  # static
    topk_barrier: bool = True,  # static; see _sample_random
    *,
    bitmask: jax.Array | None = None,  # [S, ceil(V / 32)] int32, see apply_token_bitmask
    stats: RowStats | None = None,  # logit_stats(logits, bitmask), when the caller has it
) -> tuple[jax.Array, jax.Array]:
    """-> (tokens [S] int32, raw_logprobs [S, V] f32: the model's log_softmax, before any
    processing, which is what vLLM reports by default). Unused logprobs cost nothing under jit.

    `bitmask` (structured outputs) applies to the logits before anything else, the logprobs
    included; the masked [S, V] array is made only inside the branches that read it whole.

    Three programs behind two `lax.cond`s, chosen by the batch but each exact for every row, so
    the choice never changes a token: all rows greedy with nothing to apply -> argmax of the raw
    logits; all greedy -> argmax of the processed logits; otherwise the full pipeline, whose
    random draws only sampling rows use.
    """
    if max_top_k < 1:
        raise ValueError(f"max_top_k must be >= 1, got {max_top_k}")
    raw = logits.astype(jnp.float32)
    if stats is None:
        stats = logit_stats(raw, bitmask)

    def masked() -> jax.Array:
        return raw if bitmask is None else apply_token_bitmask(raw, bitmask)

    raw_logprobs = (masked() - stats.shift) - stats.log_sum
    is_greedy = t.temperature < GREEDY_TEMPERATURE

    def sampled() -> jax.Array:
        logits = masked()
        processed = process_logits(logits, t)
        greedy, row_max = _argmax_and_max(processed)
        drawn = _sample_random(processed, t, max_top_k, topk_barrier)
        return _unless_all_masked(jnp.where(is_greedy, greedy, drawn), row_max, logits, t)

    def greedy_processed() -> jax.Array:
        logits = masked()
        greedy, row_max = _argmax_and_max(process_logits(logits, t))
        return _unless_all_masked(greedy, row_max, logits, t)

    def greedy_raw() -> jax.Array:
        return stats.argmax

    branch = jnp.where(jnp.all(is_greedy), _needs_processing(t).astype(jnp.int32), 2)
    tokens = jax.lax.switch(branch, [greedy_raw, greedy_processed, sampled])
    return tokens, raw_logprobs


def _needs_processing(t: SamplingTensors) -> jax.Array:
    """[] bool: does any row change its logits before the argmax?"""
    return (
        jnp.any(t.repetition_penalty != 1.0)
        | jnp.any(t.frequency_penalty != 0.0)
        | jnp.any(t.presence_penalty != 0.0)
        | jnp.any(t.num_output_tokens < t.min_tokens)
        # max/min of the array itself: a reduction of `bias != 0` would materialize [S, V].
        | (jnp.max(t.logit_bias) > 0.0)
        | (jnp.min(t.logit_bias) < 0.0)
        | ~jnp.all(t.allowed_mask)
    )


def top_logprobs(
    raw_logprobs: jax.Array,  # [S, V] f32
    tokens: jax.Array,  # [S] int32
    k: int,  # static
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """-> (token_logprob [S], token_rank [S] i32, top_ids [S, k] i32, top_logprobs [S, k]).

    vLLM's rank (`batched_count_greater_than`): the number of tokens whose logprob is >= the
    token's, itself included -- 1 + the number strictly larger when there are no ties; a token
    tied with others gets the last rank of its tie group. k = 0 gives empty [S, 0] arrays.
    """
    token_logprob = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    rank = jnp.sum(raw_logprobs >= token_logprob[:, None], axis=-1, dtype=jnp.int32)
    top_values, top_ids = jax.lax.top_k(raw_logprobs, k)
    return token_logprob, rank, top_ids.astype(jnp.int32), top_values


def top_logprobs_of_logits(
    logits: jax.Array,  # [S, V] f32
    tokens: jax.Array,  # [S] int32
    k: int,  # static
    stats: RowStats | None = None,  # logit_stats(logits), when the caller has it
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`top_logprobs(log_softmax(logits), tokens, k)`, the same numbers, for wide S (prompt
    logprobs: every token of a prefill step) without the [S, V] log-softmax in memory.

    Why: that array was written whole, then read three times (the token's entry, the rank count,
    top-k). Here the row's shift and log-sum come first, the rank count recomputes each logprob
    in registers, and top-k reads the logits: for SmolLM2 at S = 512 (V = 49,152) the part after
    the lm_head product took 360 instead of 460 ms on the shared 2-core CPU, out of a ~1.6 s step.
    Logprobs and ranks are bitwise those of `top_logprobs(log_softmax(...))`; top-k order by logit
    equals order by logprob except where rounding makes two logprobs equal, and then it names
    tokens of the same logprob.
    """
    if stats is None:
        shift, log_sum = invariant.log_normalizer(logits)  # [S, 1] each
    else:
        shift, log_sum = stats.shift, stats.log_sum
    if row_stats_enabled() and logits.dtype == jnp.float32:
        # The same numbers in one pass per row (kernels/row_stats.py): XLA:CPU's rank count and
        # top-k over a wide [S, V] cost more than the lm_head product's share of a scoring step.
        return row_kernel.top_logprobs(logits, tokens, shift, log_sum, k)
    token_logit = jnp.take_along_axis(logits, tokens[:, None], axis=-1)  # [S, 1]
    token_logprob = (token_logit - shift) - log_sum
    rank = jnp.sum((logits - shift) - log_sum >= token_logprob, axis=-1, dtype=jnp.int32)
    top_values, top_ids = jax.lax.top_k(logits, k)
    return token_logprob[:, 0], rank, top_ids.astype(jnp.int32), (top_values - shift) - log_sum


def bitmask_allows(bitmask: jax.Array, tokens: jax.Array) -> jax.Array:
    """[S, n] bool: whether row s's packed bitmask (see `apply_token_bitmask`) allows each of its
    tokens [S, n], without unpacking the whole row."""
    word = jnp.take_along_axis(bitmask, tokens // 32, axis=-1)
    return ((word >> (tokens % 32)) & 1).astype(bool)


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Structured outputs: logits [S, V] with every token whose bit is clear in the packed
    `bitmask` [S, ceil(V/32)] int32 (bit t % 32 of word t // 32) set to -inf, as vLLM applies the
    grammar's mask to the logits before the sampler (so the reported logprobs are the
    constrained distribution's). An all-ones row changes nothing."""
    num_rows, vocab_size = logits.shape
    shifts = jnp.arange(32, dtype=jnp.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [S, W, 32]; arithmetic shift, bit 31 kept by & 1
    allowed = bits.reshape(num_rows, -1)[:, :vocab_size].astype(bool)
    return jnp.where(allowed, logits, jnp.asarray(-jnp.inf, logits.dtype))
