"""The device functions of one step: the model to the logits, the sampler, the prompt scorer, the write.

All are pure. The runner compiles `step` (the layers and the logits) once per bucket, `sample_rows`
once per sequence count, `prompt_logprobs` once per token count (and only when some request asks
for prompt logprobs), and `write_cache` once per token count. The model and the sampler are apart
because the sampler sees only [S, V] logits: compiled inside every (T, S, B) bucket it was half of
each bucket's compile time. The sampler takes its slot rows already gathered
(`slot_state.gather_rows`, and `slot_state.count_sampled` after it, two small programs) so that
no input of it depends on the engine's slot count: one compiled sampler per (S, V) serves every
engine, whatever its max_num_seqs, through the persistent compilation cache. The model and the
cache write are apart because XLA:CPU copies the whole cache when a single computation both
gathers from it and scatters into it; apart, `write_cache` updates the donated cache in place.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.kernels.row_stats import RowStats
from jaxinfer.models import invariant
from jaxinfer.models.family import run_layers
from jaxinfer.runtime import kv_cache as kv_cache_lib
from jaxinfer.runtime.sampling import (
    apply_token_bitmask,
    bitmask_allows,
    logit_stats,
    sample,
    top_logprobs_of_logits,
)
from jaxinfer.runtime.slot_state import batch_tensors
from jaxinfer.seam import StepInputs
from pallas_kernels import reference


def _invariant_when_asked(function: Callable) -> Callable:
    """Give `function` the static keyword `batch_invariant`: when True it is traced under
    `invariant.batch_invariant_ops()`, so its products and reductions take their batch-invariant
    form (`EngineConfig.batch_invariant`; jaxinfer/models/invariant.py says why)."""

    @functools.wraps(function)
    def traced(*args, batch_invariant: bool = False, **kwargs):
        with invariant.batch_invariant_ops(batch_invariant):
            return function(*args, **kwargs)

    return traced


def make_attention(
    inputs: StepInputs,
    *,
    scale: float,
    decode_rows: int,
    sliding_window: int | None,
    soft_cap: float | None = None,
    paged_attention: Callable = reference.paged_attention,
) -> Callable:
    """Bind the step's block tables and lengths into the per-layer attention call of the model.

    The model calls `attention(q, k_new, v_new, layer_cache)`; a family whose layers differ (Gemma2
    alternates sliding and global layers) passes `sliding_window=` / `soft_cap=` / `scale=` per
    call to override the model-wide defaults bound here.

    `decode_rows` (static, the bucket's): the leading rows that own exactly one token each. All of
    them: the decode formulation; none: the ragged prefill one; some (a unified step): the decode
    rows and the prefill rows each through their own, concatenated. Split this way, a step that
    carries 16 decodes beside a 448-token chunk does not score every decode token against every
    prefill row's context, which is what the ragged formulation alone would do.
    """
    defaults = {"scale": scale, "sliding_window": sliding_window, "soft_cap": soft_cap}
    tables, lengths, starts = inputs.block_tables, inputs.context_lens, inputs.query_start_loc
    num_seqs = tables.shape[0]

    def attention(q, k_new, v_new, layer_cache, **overrides):
        unknown = set(overrides) - set(defaults)
        if unknown:
            raise TypeError(f"attention() got unexpected overrides {sorted(unknown)}")
        k_cache, v_cache = layer_cache
        options = defaults | overrides

        def part(rows: slice, tokens: slice, decode_only: bool, offset: int = 0):
            return paged_attention(
                q[tokens],
                k_new[tokens],
                v_new[tokens],
                k_cache,
                v_cache,
                tables[rows],
                lengths[rows],
                starts[rows.start : (rows.stop or num_seqs) + 1] - offset,
                decode_only=decode_only,
                **options,
            )

        everything = slice(0, None)
        if decode_rows in (0, num_seqs):
            return part(everything, everything, decode_only=decode_rows == num_seqs)
        decode = part(slice(0, decode_rows), slice(0, decode_rows), decode_only=True)
        rest = slice(decode_rows, None)
        prefill = part(rest, rest, decode_only=False, offset=decode_rows)
        return jnp.concatenate([decode, prefill], axis=0)

    return attention


def forward_hidden(
    params: dict,
    kv_cache: tuple,
    inputs: StepInputs,
    hidden_in: jax.Array | None = None,
    *,
    family: ModuleType,
    model_config,
    decode_rows: int,
    paged_attention: Callable = reference.paged_attention,
    first_layer: int = 0,
    trace_layers_once: bool = True,
) -> tuple[jax.Array, tuple]:
    """-> (last hidden state of every token [T, E], per layer the new (k, v) [T, K, D]).

    Runs the layers in `params["layers"]` (all of them, or one pipeline stage's, the first being
    layer `first_layer`) on the embedded tokens, or on `hidden_in` from the previous stage.
    `paged_attention` is the attention backend: the jnp reference or the Pallas kernel
    (`runtime/attention_backend.py` picks one), both with the reference's signature.
    `trace_layers_once`: see `family.run_layers` (False where the attention records something
    per call, as the multi-step loop's does).
    """
    attention = make_attention(
        inputs,
        scale=model_config.head_dim**-0.5,
        decode_rows=decode_rows,
        sliding_window=model_config.sliding_window,
        paged_attention=paged_attention,
    )
    positions = inputs.positions
    x = hidden_in
    if x is None:
        x = family.embed(params, model_config, inputs.token_ids, positions)
    return run_layers(
        family,
        params["layers"],
        model_config,
        kv_cache,
        x,
        positions,
        attention,
        first_layer,
        trace_once=trace_layers_once,
    )


def _logprob_outputs(
    logits: jax.Array,  # [S, V] f32, before the bitmask
    bitmask: jax.Array,  # [S, ceil(V / 32)] int32
    stats: RowStats,  # sampling.logit_stats(logits, bitmask)
    tokens: jax.Array,
    k: int,
    wanted: jax.Array,
):
    """(token logprob, rank, top-k ids, top-k logprobs) of each row from the raw log-softmax of
    the masked logits, `(masked - shift) - log_sum`; the top-k search and rank only when `wanted`
    (a [] bool), zeros otherwise. Without them only each row's token entry is computed: the
    [S, V] log-softmax is not written out."""

    def with_top() -> tuple:
        return top_logprobs_of_logits(apply_token_bitmask(logits, bitmask), tokens, k, stats)

    def without() -> tuple:
        chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)
        allowed = bitmask_allows(bitmask, tokens[:, None])
        chosen = jnp.where(allowed, chosen, jnp.asarray(-jnp.inf, chosen.dtype))
        token_logprob = ((chosen - stats.shift) - stats.log_sum)[:, 0]
        return (token_logprob, *_no_top_logprobs(tokens.shape[0], k)[1:])

    return jax.lax.cond(wanted, with_top, without)


def _no_top_logprobs(count: int, k: int) -> tuple:
    """Zeros shaped like `top_logprobs`' results, for the branch where nobody asked: host arrays,
    which a traced branch takes as constants and the runner returns as they are."""
    zeros_k = np.zeros((count, k), np.int32)
    return (
        np.zeros(count, np.float32),
        np.zeros(count, np.int32),
        zeros_k,
        zeros_k.astype(np.float32),
    )


@_invariant_when_asked
def step(
    params: dict,
    kv_cache: tuple,
    inputs: StepInputs,
    hidden_in: jax.Array | None = None,
    *,
    family: ModuleType,
    model_config,
    decode_rows: int,
    paged_attention: Callable = reference.paged_attention,
    mesh: Mesh | None = None,
    first_layer: int = 0,
    trace_layers_once: bool = True,
) -> tuple[jax.Array, jax.Array, tuple]:
    """-> (each row's logits [S, V], every token's last hidden state [T, E], per layer the new
    (k, v) [T, K, D]).

    The whole model, or a pipeline's last stage (`hidden_in` from the previous stage, layers from
    `first_layer` on), up to the logits; `sample_rows` samples from them and `prompt_logprobs`
    scores the prompt tokens from the hidden states. Three programs, not one, because only this
    one depends on the whole bucket: the sampler sees [S, V] and the prompt scorer [T, E], so each
    compiles once per sequence (token) count instead of once per (T, S, B) bucket, and the
    sampler's many branches were half of every step program's compile time.
    """
    hidden, new_kv = forward_hidden(
        params,
        kv_cache,
        inputs,
        hidden_in,
        family=family,
        model_config=model_config,
        decode_rows=decode_rows,
        paged_attention=paged_attention,
        first_layer=first_layer,
        trace_layers_once=trace_layers_once,
    )
    logits = _whole_on_every_device(
        family.logits(params, model_config, hidden[inputs.logits_indices]), mesh
    )
    return logits, hidden, new_kv


# The fields of StepInputs the sampler reads: all [S]-shaped (or [S, *]), none depends on T or B.
SAMPLER_FIELDS = ("want_logprobs", "token_bitmask", "sampling")


def sampler_inputs(inputs: StepInputs) -> dict:
    """The sampler's share of a step's inputs (arrays or their abstract shapes); the slot rows
    come from `slot_state.gather_rows` (`slots`, `banned`), and `slot_state.count_sampled`
    takes `slots` and `sampled` after it."""
    return {name: getattr(inputs, name) for name in SAMPLER_FIELDS}


@_invariant_when_asked
def sample_rows(
    logits: jax.Array,
    slot_rows: dict,
    rows: dict,
    *,
    max_top_k: int,
    num_logprobs: int,
    topk_barrier: bool = True,
) -> dict:
    """Each row's next token from its logits [S, V] -> the per-row outputs.

    The outputs are StepOutputs' per-row fields: `tokens`, `token_logprob` (raw log-softmax,
    vLLM's default), `token_rank`, [S, num_logprobs] `top_ids` / `top_logprobs` (the top-k search
    only when some row asked), and `logits_finite` (the model's logits, before any mask, held no
    NaN or inf). `slot_rows` is `slot_state.gather_rows(...)` for the batch's slots and `rows` is
    `sampler_inputs(inputs)`: every input is [S, ...] or [S, V], so one program per S serves
    every engine of this vocabulary. `topk_barrier`: see `sampling.sample`.
    """
    logits = logits.astype(jnp.float32)
    bitmask = rows["token_bitmask"]  # structured outputs; all ones for the other rows
    # One pass for the argmax, the log-softmax normalizer (after the bitmask) and the finite
    # check (before it: the model's own logits).
    stats = logit_stats(logits, bitmask)
    tensors = batch_tensors(slot_rows, rows["sampling"])
    tokens, _ = sample(
        logits, tensors, max_top_k, topk_barrier=topk_barrier, bitmask=bitmask, stats=stats
    )
    wanted = jnp.any(rows["want_logprobs"])
    token_logprob, token_rank, top_ids, top_values = _logprob_outputs(
        logits, bitmask, stats, tokens, num_logprobs, wanted
    )
    logits_finite = stats.finite
    return {
        "tokens": tokens,
        "token_logprob": token_logprob,
        "token_rank": token_rank,
        "top_ids": top_ids,
        "top_logprobs": top_values,
        "logits_finite": logits_finite,
    }


PROMPT_FIELDS = ("prompt_logprob", "prompt_rank", "prompt_top_ids", "prompt_top_logprobs")


@_invariant_when_asked
def prompt_logprobs(
    params: dict,
    hidden: jax.Array,
    next_ids: jax.Array,
    *,
    family: ModuleType,
    model_config,
    num_logprobs: int,
    mesh: Mesh | None = None,
) -> dict:
    """StepOutputs' per-token fields [T]: the logprob of the next prompt token `next_ids[t]`, its
    rank and the top `num_logprobs`, from the step's hidden states [T, E]. Tokens whose next id
    is `vocab_size` (nobody asked) get some row's values, which the host ignores. The runner calls
    this only for steps where some token asked, so other steps never build the [T, V] logits."""
    vocab = model_config.vocab_size
    all_logits = _whole_on_every_device(family.logits(params, model_config, hidden), mesh)
    values = top_logprobs_of_logits(all_logits, jnp.minimum(next_ids, vocab - 1), num_logprobs)
    return dict(zip(PROMPT_FIELDS, values, strict=True))


def no_prompt_logprobs(num_tokens: int, num_logprobs: int) -> dict:
    """What `prompt_logprobs` gives when nobody asked: zeros, as host arrays."""
    return dict(zip(PROMPT_FIELDS, _no_top_logprobs(num_tokens, num_logprobs), strict=True))


def _whole_on_every_device(logits: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Gather vocab-parallel logits once, so the sampler's many reductions over the vocabulary
    (softmax, top-k, penalties) run locally instead of each becoming a collective."""
    if mesh is None:
        return logits
    # First pin the lm_head product itself vocab-parallel: told only "replicated", XLA gathers
    # the whole lm_head weight instead of the (much smaller) logits.
    if logits.shape[-1] % mesh.shape["model"] == 0:
        vocab_parallel = NamedSharding(mesh, PartitionSpec(None, "model"))
        logits = jax.lax.with_sharding_constraint(logits, vocab_parallel)
    return jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, PartitionSpec()))


@_invariant_when_asked
def all_token_logits(
    params,
    kv_cache,
    inputs,
    hidden_in: jax.Array | None = None,
    *,
    family: ModuleType,
    model_config,
    paged_attention: Callable = reference.paged_attention,
    first_layer: int = 0,
):
    """Logits of every token of a prefill [T, V] (parity tests, prompt logprobs); on a pipeline,
    the last stage's, from `hidden_in`."""
    hidden, _ = forward_hidden(
        params,
        kv_cache,
        inputs,
        hidden_in,
        family=family,
        model_config=model_config,
        decode_rows=0,  # the ragged formulation holds any layout
        paged_attention=paged_attention,
        first_layer=first_layer,
    )
    return family.logits(params, model_config, hidden)


@_invariant_when_asked
def stage_forward(
    params: dict,
    kv_cache: tuple,
    inputs: StepInputs,
    hidden_in: jax.Array | None,
    *,
    mesh: Mesh | None,
    **forward,
) -> tuple[jax.Array, tuple]:
    """A pipeline stage before the last: its layers -> (hidden [T, E], their new (k, v)).

    The hidden states leave whole on every device of the stage, ready to be sent to the next."""
    hidden, new_kv = forward_hidden(params, kv_cache, inputs, hidden_in, **forward)
    if mesh is not None:
        hidden = jax.lax.with_sharding_constraint(hidden, NamedSharding(mesh, PartitionSpec()))
    return hidden, new_kv


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerPrograms:
    """The three compiled programs that sample S rows (the runner's, per sequence count). Why
    three: `sample` (the heavy one) takes only [S, ...] and [S, V] arrays, so the persistent cache
    serves it to every engine with this vocabulary whatever its max_num_seqs; the two that touch
    the [slots, V] slot state are small (a gather, a scatter-add that donates the state)."""

    gather: jax.stages.Compiled  # (slot state, slots, banned) -> the batch's [S, V] rows
    sample: jax.stages.Compiled  # (logits, those rows, sampler inputs) -> per-row outputs
    count: jax.stages.Compiled  # (slot state, slots, tokens, sampled) -> the new slot state


def splice_tokens(host: jax.Array, previous: jax.Array, index: jax.Array) -> jax.Array:
    """Async scheduling: token t is the previous step's sampled row index[t] where >= 0 (still on
    the device when this step was planned), else the host's."""
    return jnp.where(index >= 0, previous[jnp.maximum(index, 0)], host)


def write_cache(kv_cache: tuple, new_kv: tuple, slot_mapping: jax.Array, cache_dtype=None) -> tuple:
    """Scatter every layer's new K/V into its cache slots (padding tokens land in block 0);
    `cache_dtype`: an 8-bit float cache's type, whose arrays hold its bytes (kv_cache.encode)."""
    return tuple(
        kv_cache_lib.write_layer(k_cache, v_cache, k_new, v_new, slot_mapping, cache_dtype)
        for (k_cache, v_cache), (k_new, v_new) in zip(kv_cache, new_kv, strict=True)
    )


def jit_step(**static) -> Callable:
    """The step with its static arguments bound (family, model_config, decode_rows,
    paged_attention, mesh, first_layer, batch_invariant), compiled per bucket. Nothing is donated:
    the cache is read here and written by `write_cache` (see the module docstring)."""
    return jax.jit(functools.partial(step, **static))


def jit_stage_forward(**static) -> Callable:
    """A pipeline stage before the last (`stage_forward`), its static arguments bound; nothing is
    donated, as in `jit_step`."""
    return jax.jit(functools.partial(stage_forward, **static))


def copy_blocks(kv_cache: tuple, src: jax.Array, dst: jax.Array) -> tuple:
    """Copy whole KV blocks `src[i] -> dst[i]` in every layer, in order (copy-on-write, n > 1).

    A loop of slice updates rather than one gather/scatter, so that XLA updates the donated cache
    in place; unused entries are (0, 0), block 0 onto itself.
    """

    def copy_one(i: jax.Array, cache: tuple) -> tuple:
        def copy(layer: jax.Array) -> jax.Array:
            block = jax.lax.dynamic_slice_in_dim(layer, src[i], 1, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(layer, block, dst[i], axis=1)

        return jax.tree.map(copy, cache)

    return jax.lax.fori_loop(0, src.shape[0], copy_one, kv_cache)


jit_write_cache = jax.jit(write_cache, donate_argnums=(0,), static_argnames="cache_dtype")
jit_copy_blocks = jax.jit(copy_blocks, donate_argnums=(0,))
