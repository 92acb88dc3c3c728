"""runtime/multi_step.py's loop as a pure function, with a fake model: where each step writes
its K/V, what it feeds the next step, and when the loop stops early."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.runtime import multi_step
from jaxinfer.runtime import slot_state as slots
from jaxinfer.runtime.step import sample_rows
from jaxinfer.seam import Bucket, SamplingScalars, StepInputs

VOCAB, BLOCK, LAYERS = 16, 4, 2
BUCKET = Bucket(False, 2, 2, 3)  # two rows: row 0 decodes, row 1 is padding


def fake_model(params, kv_cache, batch, *, paged_attention, trace_layers_once):
    """Each layer 'attends' (the backend sees the cache it wrote) with K = V = the fed token;
    the logits make the next token the fed one + 1. The loop asks for its layers traced in turn
    (its attention records each layer's written cache)."""
    assert trace_layers_once is False
    new = batch.token_ids.astype(jnp.float32)[:, None, None]  # [T, K=1, D=1]
    for k_cache, v_cache in kv_cache:
        paged_attention(new, new, new, k_cache, v_cache, batch.block_tables, batch.context_lens)
    logits = jax.nn.one_hot((batch.token_ids + 1) % VOCAB, VOCAB) * 10.0
    return logits, None, None


def inputs(first_token: int, position: int) -> StepInputs:
    """Row 0 at `position` (its token fed now) with blocks 5, 2, 7; row 1 padding."""

    def zeros(_, shape, dtype):
        return np.zeros(shape, dtype)

    built = StepInputs.build(BUCKET, zeros, vocab_size=VOCAB)
    tables = np.array([[5, 2, 7], [0, 0, 0]], np.int32)
    sampling = SamplingScalars.neutral(BUCKET)  # greedy
    sampling.positions[0] = sampling.num_output_tokens[0] = 3
    return built.replace(
        token_ids=np.array([first_token, 0], np.int32),
        positions=np.array([position, 0], np.int32),
        slot_mapping=np.array([tables[0, position // BLOCK] * BLOCK + position % BLOCK, 0]),
        block_tables=tables,
        context_lens=np.array([position + 1, 0], np.int32),
        query_start_loc=np.array([0, 1, 1], np.int32),
        logits_indices=np.array([0, 1], np.int32),
        slots=np.array([0, 2], np.int32),  # slot 2: the padding slot of 2 slots
        sampled=np.array([True, False]),
        banned=np.full((2, 8), VOCAB, np.int32),
        token_bitmask=np.full((2, 1), -1, np.int32),
        sampling=sampling,
    )


def run(state, num_steps: int, max_steps: int = 6, first_token: int = 3, position: int = 6):
    seen = []  # the context lengths each layer's attention was given

    def attention(q, k_new, v_new, k_cache, v_cache, tables, lengths):
        jax.debug.callback(lambda n: seen.append(int(n)), lengths[0])
        return q

    cache = tuple((jnp.zeros((1, 8, BLOCK, 1)), jnp.zeros((1, 8, BLOCK, 1))) for _ in range(LAYERS))
    decode = functools.partial(
        multi_step.decode_steps,
        model_step=fake_model,
        paged_attention=attention,
        sample_rows=functools.partial(sample_rows, max_top_k=4, num_logprobs=2),
        block_size=BLOCK,
        max_steps=max_steps,
    )
    out = jax.jit(decode)((), cache, state, inputs(first_token, position), jnp.int32(num_steps))
    return (*out, seen)


def test_each_step_feeds_the_next_and_writes_where_the_block_table_says():
    state = slots.allocate(2, VOCAB)
    cache, state, stacked, steps_run, seen = run(state, num_steps=5)
    assert int(steps_run) == 5
    tokens = np.asarray(stacked["tokens"])
    assert tokens[:, 0].tolist() == [4, 5, 6, 7, 8, 0]  # fed 3, then each step's own token
    assert tokens[:5, 1].tolist() == [1] * 5  # the padding row is fed its padding token (0)
    assert np.asarray(stacked["logits_finite"])[:5, 0].all()
    # Positions 6 .. 10 of row 0 (blocks 5, 2, 7; 4 slots each), holding the fed tokens 3 .. 7
    flat = np.asarray(cache[1][0]).reshape(-1)
    slots_written = [2 * BLOCK + 2, 2 * BLOCK + 3, 7 * BLOCK + 0, 7 * BLOCK + 1, 7 * BLOCK + 2]
    assert flat[slots_written].tolist() == [3, 4, 5, 6, 7]
    assert np.count_nonzero(flat) == 5  # nothing else: padding writes 0 into block 0
    assert seen == [7, 7, 8, 8, 9, 9, 10, 10, 11, 11]  # each step one longer, every layer
    counts = np.asarray(state.output_counts)
    assert counts[0, 4:9].tolist() == [1] * 5 and counts[0].sum() == 5  # penalties see them
    assert counts[1:].sum() == 0  # padding rows count nothing


def test_the_loop_stops_when_every_row_sampled_a_stop_token():
    state = slots.allocate(2, VOCAB)
    row = jax.tree.map(lambda a: np.asarray(a[0]), state)
    stop = np.zeros(VOCAB, bool)
    stop[6] = True  # row 0's eos
    state = slots.write_slot(
        state, jnp.int32(0), slots.SlotState(**{**row.__dict__, "stop_mask": stop})
    )
    _, _, stacked, steps_run, _ = run(state, num_steps=6)
    assert int(steps_run) == 3  # sampled 4, 5, 6: stopped
    assert np.asarray(stacked["tokens"])[:3, 0].tolist() == [4, 5, 6]
    _, _, _, steps_run, _ = run(slots.allocate(2, VOCAB), num_steps=2)
    assert int(steps_run) == 2  # num_steps caps a call below max_steps
