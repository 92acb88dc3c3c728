"""Device-resident per-request sampling state: one row per scheduler slot, updated in the step.

The [V]-wide parts of a request's sampling parameters (logit bias, allowed tokens, eos/stop ids
for min_tokens, prompt tokens for the repetition penalty) and its output token counts for the
penalties live on the device in [num_slots + 1, V] arrays. The engine writes a row once when a
sequence is admitted (or re-admitted after preemption, rebuilt from its outputs); each step
gathers the rows of its batch by slot and adds the sampled tokens to the counts. So per step only
[S] scalars cross from the host, whatever the vocabulary. The last slot is the padding slot:
neutral, never written, used by padding rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.runtime.sampling_tensors import SamplingTensors
from jaxinfer.seam import SamplingScalars

DENSE_FIELDS = ("logit_bias", "allowed_mask", "stop_mask", "output_counts", "prompt_mask")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    logit_bias: Any  # [M + 1, V] f32
    allowed_mask: Any  # [M + 1, V] bool
    stop_mask: Any  # [M + 1, V] bool
    output_counts: Any  # [M + 1, V] i32
    prompt_mask: Any  # [M + 1, V] bool

    @property
    def padding_slot(self) -> int:
        return self.logit_bias.shape[0] - 1


def allocate(num_slots: int, vocab_size: int) -> SlotState:
    neutral = SamplingTensors.neutral(num_slots + 1, vocab_size)
    return SlotState(**{name: jnp.asarray(getattr(neutral, name)) for name in DENSE_FIELDS})


def row_of(tensors: SamplingTensors, row: int = 0) -> SlotState:
    """One row's dense fields (host arrays [V]) from host-built SamplingTensors."""
    return SlotState(**{name: np.asarray(getattr(tensors, name))[row] for name in DENSE_FIELDS})


def write_slot(state: SlotState, slot: jax.Array, row: SlotState) -> SlotState:
    return jax.tree.map(lambda table, value: table.at[slot].set(value), state, row)


def gather_rows(
    state: SlotState,
    slots: jax.Array,  # [S] int32
    banned: jax.Array,  # [S, NB] int32 extra tokens banned this step (bad words); V = none
) -> dict[str, jax.Array]:
    """The batch's slot rows, each dense field [S, V], with this step's bans applied.

    Its own small program (per S and slot count), apart from the sampler: the sampler then sees
    only [S, V] arrays, so its one heavy program per S serves every engine of that vocabulary,
    whatever its max_num_seqs."""
    rows = {name: getattr(state, name)[slots] for name in DENSE_FIELDS}
    row_ids = jnp.arange(slots.shape[0])[:, None]
    rows["allowed_mask"] = rows["allowed_mask"].at[row_ids, banned].set(False, mode="drop")
    return rows


def batch_tensors(rows: dict[str, jax.Array], scalars: SamplingScalars) -> SamplingTensors:
    """The step's SamplingTensors: the gathered dense rows (`gather_rows`) and this step's
    scalars."""
    return SamplingTensors(**rows, **scalars.__dict__)


def count_sampled(
    state: SlotState, slots: jax.Array, tokens: jax.Array, sampled: jax.Array
) -> SlotState:
    """Add each sampling row's new token to its slot's output counts (padding rows add 0)."""
    counts = state.output_counts.at[slots, tokens].add(sampled.astype(jnp.int32))
    return dataclasses.replace(state, output_counts=counts)
