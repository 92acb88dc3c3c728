"""Multi-step decode: several decode steps in one compiled call (vLLM's `num_scheduler_steps`).

A decode step on the CPU spends milliseconds outside the device's work: the host pads the batch,
launches four programs (model, cache write, slot gather, sampler; `runtime/step.py`) and reads the
tokens back. `decode_steps` runs the same functions in a `lax.while_loop`, feeding each step's
sampled tokens to the next on the device, so one launch and one read-back serve up to
`max_steps` tokens per sequence. Each iteration is exactly what the single-step path computes for
that step (the same model and sampler functions, the same positions, context lengths and
per-request PRNG positions), so a seeded request gives the same tokens either way.

The host reserves every KV block the loop can write into before the call (the block tables
cover `num_steps` more tokens) and leaves the decisions it owns to the read-back: stop strings,
max_tokens, detokenization. The device stops the loop early only when every row has sampled one
of its stop tokens (its slot's eos / stop_token_ids) or failed (non-finite logits), and says how
many steps it ran; the host replays that many steps and drops each sequence's tokens after its
own stop. Rows that stopped keep decoding until the loop ends; their extra K/V lands in blocks
the host frees with the sequence.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxinfer.runtime import kv_cache as kv_cache_lib
from jaxinfer.runtime import seam_pytrees  # noqa: F401  (StepInputs as a pytree)
from jaxinfer.runtime import slot_state as slots
from jaxinfer.runtime import step as single_step
from jaxinfer.seam import STEP_ROW_FIELDS as ROW_FIELDS
from jaxinfer.seam import StepInputs


def advance_inputs(inputs: StepInputs, tokens: jax.Array, step: jax.Array, block_size: int):
    """The decode batch `step` steps after `inputs` (a decode bucket: token t is row t's), fed
    `tokens`: positions, context lengths and the sampler's output positions move on by `step`
    on real rows; each real token's cache slot comes from its row's block table. Padding rows
    (not `sampled`) stay as they were: no context, writes into block 0."""
    real = inputs.sampled
    advance = jnp.where(real, step, 0).astype(jnp.int32)
    positions = inputs.positions + advance
    rows = jnp.arange(positions.shape[0])
    blocks = inputs.block_tables[rows, positions // block_size]
    slot_mapping = jnp.where(
        real, blocks * block_size + positions % block_size, inputs.slot_mapping
    )
    sampling = dataclasses.replace(
        inputs.sampling,
        positions=inputs.sampling.positions + advance,
        num_output_tokens=inputs.sampling.num_output_tokens + advance,
    )
    return inputs.replace(
        token_ids=jnp.where(real, tokens, inputs.token_ids),
        positions=positions,
        slot_mapping=slot_mapping,
        context_lens=inputs.context_lens + advance,
        sampling=sampling,
    )


def _write_then_attend(
    paged_attention: Callable,
    slot_mapping: jax.Array,
    record: Callable,
    cache_dtype,
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *args,
    **options,
) -> jax.Array:
    """The attention backend, after writing the step's new K/V into the layer's cache; the
    written cache goes to `record` (one call per layer, in layer order: the loop's new cache).

    Why write first, unlike the single step (`step.write_cache` after the model): the attention
    then reads the cache the write returned, so XLA can update the loop-carried cache in place.
    Written after, every layer's cache is read by the attention and overwritten by a write XLA
    is free to order before that read, and XLA:CPU copied the whole cache in every iteration (a
    64-token SmolLM2 run took 4x as long; benchmarks/RESULTS.md, "Multi-step decode"). The
    attention reads the new token from `k_new` / `v_new` as before, so the result is the same."""
    k_cache, v_cache = kv_cache_lib.write_layer(
        k_cache, v_cache, k_new, v_new, slot_mapping, cache_dtype
    )
    record((k_cache, v_cache))
    return paged_attention(q, k_new, v_new, k_cache, v_cache, *args, **options)


def decode_steps(
    params: dict,
    kv_cache: tuple,
    slot_state: slots.SlotState,
    inputs: StepInputs,
    num_steps: jax.Array,
    *,
    model_step: Callable,
    paged_attention: Callable,
    sample_rows: Callable,
    block_size: int,
    max_steps: int,
    cache_dtype=None,
) -> tuple[tuple, slots.SlotState, dict, jax.Array]:
    """Up to `num_steps` (<= max_steps, static) decode steps from `inputs`
    -> (the cache, the slot state, each per-row output stacked [max_steps, S, ...], steps run).

    `model_step(params, kv_cache, inputs, paged_attention=...) -> (logits, hidden, new_kv)` is
    `step.step` and `sample_rows(logits, slot_rows, rows) -> per-row outputs` is
    `step.sample_rows`, their other static arguments bound; `paged_attention` is the attention
    backend. The cache and the slot state are loop carries: donate them. `cache_dtype`: an
    8-bit float cache's type (its arrays hold bytes: kv_cache.encode).
    """
    num_rows = inputs.slots.shape[0]
    real = inputs.sampled
    stop_mask = slot_state.stop_mask[inputs.slots]  # [S, V]: eos and stop_token_ids per row

    def one_step(step: jax.Array, kv: tuple, state: slots.SlotState, tokens: jax.Array):
        batch = advance_inputs(inputs, tokens, step, block_size)
        written = []
        attend = functools.partial(
            _write_then_attend, paged_attention, batch.slot_mapping, written.append, cache_dtype
        )
        # Layers traced in turn: `attend` records each layer's cache, a side effect a layer
        # traced once and called again would skip (family.run_layers).
        logits, _, _ = model_step(
            params, kv, batch, paged_attention=attend, trace_layers_once=False
        )
        kv = tuple(written)
        slot_rows = slots.gather_rows(state, batch.slots, batch.banned)
        per_row = sample_rows(logits, slot_rows, single_step.sampler_inputs(batch))
        state = slots.count_sampled(state, batch.slots, per_row["tokens"], batch.sampled)
        return kv, state, per_row

    # Every step runs in the loop (the model is compiled once); its outputs' shapes come from
    # tracing one step abstractly.
    _, _, shapes = jax.eval_shape(one_step, jnp.int32(0), kv_cache, slot_state, inputs.token_ids)
    stacked = {
        name: jnp.zeros((max_steps, *shapes[name].shape), shapes[name].dtype) for name in ROW_FIELDS
    }

    def stopped(per_row: dict, done: jax.Array) -> jax.Array:
        hit_stop = stop_mask[jnp.arange(num_rows), per_row["tokens"]]
        return done | hit_stop | ~per_row["logits_finite"]

    def more(carry) -> jax.Array:
        step, _, _, _, done, _ = carry
        return (step < num_steps) & ~jnp.all(done | ~real)

    def body(carry):
        step, kv, state, tokens, done, stacked = carry
        kv, state, per_row = one_step(step, kv, state, tokens)
        stacked = {
            name: jax.lax.dynamic_update_index_in_dim(stacked[name], per_row[name], step, 0)
            for name in ROW_FIELDS
        }
        return step + 1, kv, state, per_row["tokens"], stopped(per_row, done), stacked

    done = jnp.zeros(num_rows, bool)
    carry = (jnp.int32(0), kv_cache, slot_state, inputs.token_ids, done, stacked)
    steps_run, kv_cache, slot_state, _, _, stacked = jax.lax.while_loop(more, body, carry)
    return kv_cache, slot_state, stacked, steps_run


def compile_decode_steps(
    params: dict,
    kv_cache: tuple,
    slot_state: slots.SlotState,
    inputs: StepInputs,  # a decode bucket's abstract inputs
    *,
    step_static: dict,
    sampler_static: dict,
    block_size: int,
    max_steps: int,
    cache_dtype=None,
) -> jax.stages.Compiled:
    """`decode_steps` compiled ahead of time for one decode bucket, the model step and the
    sampler bound to their static arguments (the runner's single-step ones); donates the cache
    and the slot state."""
    static = dict(step_static)
    decode = functools.partial(
        decode_steps,
        paged_attention=static.pop("paged_attention"),
        model_step=functools.partial(single_step.step, **static),
        sample_rows=functools.partial(single_step.sample_rows, **sampler_static),
        block_size=block_size,
        max_steps=max_steps,
        cache_dtype=cache_dtype,
    )
    num_steps = jax.ShapeDtypeStruct((), jnp.int32)
    lowered = jax.jit(decode, donate_argnums=(1, 2)).lower(
        params, kv_cache, slot_state, inputs, num_steps
    )
    return lowered.compile()
