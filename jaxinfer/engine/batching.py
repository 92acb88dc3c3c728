"""Shape buckets and the padding of a StepPlan into fixed-shape numpy arrays.

The device sees only a handful of shapes, each compiled once. A bucket fixes the number of tokens
(T), sequences (S) and blocks per block table (B). Decode buckets have T == S (one token per
sequence); prefill buckets carry ragged chunks of up to `max_prefill_seqs` sequences; unified
buckets lead with D decode rows and carry prefill chunks after them.

Unified buckets keep the set small: D is always the largest sequence bucket (max_num_seqs) and
the prefill part always has `max_prefill_seqs` rows, so they add one bucket per token bucket, not
one per (decode width x prefill shape). Padding costs little: a unified step is dominated by its
prefill chunk's tokens, and padded prefill rows have no tokens and no context.

Padding is inert by construction: padded tokens write their K/V into reserved block 0, padded
sequences have no tokens and context length 0, and padded block-table entries point at block 0.
The one exception is the padded decode rows of a unified bucket: each owns one padding token (so
the prefill tokens start at token D), with context length 1 and its K/V written to block 0; it
attends to that token only and is never sampled.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from jaxinfer.engine.step_plan import StepPlan
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.seam import MAX_BANNED_PER_STEP, Bucket, SamplingScalars, StepInputs

__all__ = [
    "Bucket",
    "BucketTable",
    "RowSampling",
    "StepInputs",
    "build_step_inputs",
    "plan_rows",
]

PAD_BLOCK = 0


@dataclass(frozen=True)
class RowSampling:
    """What a step needs to know about one request's sampling, besides its slot's device row."""

    params: SamplingParams
    seed: int  # the sample's uint32 key seed; the output position is folded in on the device
    slot: int  # its row of the device-resident sampling state (runtime/slot_state.py)
    banned: tuple[int, ...] = ()  # bad-word tokens banned at this step only
    # Structured outputs: the packed allowed-token mask [ceil(V/32)] int32 of this step; None =
    # no constraint (all ones). See engine/structured_output.py.
    bitmask: np.ndarray | None = None


# SamplingScalars fields that come straight from SamplingParams (the others are per sequence).
_FROM_PARAMS = tuple(
    f.name for f in dataclasses.fields(SamplingScalars) if hasattr(SamplingParams, f.name)
)


@dataclass(frozen=True)
class BucketTable:
    seq_buckets: tuple[int, ...]
    token_buckets: tuple[int, ...]
    block_buckets: tuple[int, ...]
    max_prefill_seqs: int
    unified: bool = True  # unified steps (decodes beside prefill chunks) have buckets too

    @property
    def prefill_seq_buckets(self) -> tuple[int, ...]:
        cap = min(self.max_prefill_seqs, self.seq_buckets[-1])
        return tuple(sorted({b for b in self.seq_buckets if b < cap} | {cap}))

    def all_buckets(self) -> list[Bucket]:
        decode = [Bucket(False, s, s, b) for s in self.seq_buckets for b in self.block_buckets]
        prefill = [
            Bucket(True, t, s, b)
            for t in self.token_buckets
            for s in self.prefill_seq_buckets
            if s <= t
            for b in self.block_buckets
        ]
        if not self.unified:
            return decode + prefill
        width, seqs = self.seq_buckets[-1], self.prefill_seq_buckets[-1]
        unified = [
            Bucket(True, width + t, width + seqs, b, width)
            for t in self.token_buckets
            if seqs <= t
            for b in self.block_buckets
        ]
        return decode + prefill + unified

    def select(self, plan: StepPlan, block_size: int, lookahead: int = 0) -> Bucket:
        """The smallest bucket that holds the plan, its block tables `lookahead` tokens longer
        (multi-step decode's later steps)."""
        longest = max(item.start + item.num_new_tokens for item in plan.scheduled) + lookahead
        blocks = _fit(self.block_buckets, -(-longest // block_size), "blocks per sequence")
        num_seqs = len(plan.scheduled)
        if not plan.is_prefill:
            seqs = _fit(self.seq_buckets, num_seqs, "sequences")
            return Bucket(False, seqs, seqs, blocks)
        num_prefills = num_seqs - plan.num_decodes
        prefill_tokens = plan.num_tokens - plan.num_decodes
        seqs = _fit(self.prefill_seq_buckets, num_prefills, "prefill sequences")
        if plan.num_decodes:
            if not self.unified:
                raise ValueError("a unified step was planned, but unified buckets are off")
            seqs = self.prefill_seq_buckets[-1]
        tokens = _fit(self.token_buckets, max(prefill_tokens, seqs), "tokens")
        if not plan.num_decodes:
            return Bucket(True, tokens, seqs, blocks)
        width = self.seq_buckets[-1]  # holds every running decode: max_num_seqs
        return Bucket(True, width + tokens, width + seqs, blocks, width)


def _fit(buckets: tuple[int, ...], size: int, what: str) -> int:
    index = bisect.bisect_left(buckets, size)
    if index == len(buckets):
        raise ValueError(f"{size} {what} exceed the largest bucket {buckets[-1]}")
    return buckets[index]


def plan_rows(plan: StepPlan, bucket: Bucket) -> tuple[int, ...]:
    """The device row of each planned item: its index, except that in a unified bucket the
    prefill chunks come after all D decode rows (padded ones included)."""
    shift = max(0, bucket.num_decode_seqs - plan.num_decodes)
    return tuple(
        index if index < plan.num_decodes else index + shift for index in range(len(plan.scheduled))
    )


def build_step_inputs(
    plan: StepPlan,
    bucket: Bucket,
    block_size: int,
    sampling: Mapping[int, RowSampling],
    *,
    padding_slot: int,
    vocab_size: int,
    lookahead: int = 0,
) -> StepInputs:
    """The plan's padded arrays. `lookahead`: each block table also covers that many tokens
    after the step's (multi-step decode writes them; the scheduler reserved their blocks)."""
    T, S, B = bucket.num_tokens, bucket.num_seqs, bucket.num_blocks
    token_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slot_mapping = np.zeros(T, np.int32)  # padding writes land in block 0
    block_tables = np.full((S, B), PAD_BLOCK, np.int32)
    context_lens = np.zeros(S, np.int32)
    query_start_loc = np.zeros(S + 1, np.int32)
    logits_indices = np.zeros(S, np.int32)
    slots = np.full(S, padding_slot, np.int32)
    sampled = np.zeros(S, bool)
    want_logprobs = np.zeros(S, bool)
    banned = np.full((S, MAX_BANNED_PER_STEP), vocab_size, np.int32)
    prompt_next_ids = np.full(T, vocab_size, np.int32)
    token_bitmask = np.full((S, -(-vocab_size // 32)), -1, np.int32)  # padding: no constraint
    scalars = SamplingScalars.neutral(bucket)

    # A unified bucket leads with D decode rows of one token each; the plan's decodes take the
    # first of them, and each padded one owns a padding token, so the prefill starts at token D.
    decode_rows = bucket.num_decode_seqs
    for row in range(plan.num_decodes, decode_rows):
        context_lens[row] = 1
        logits_indices[row] = row
    query_start_loc[: decode_rows + 1] = np.arange(decode_rows + 1)
    cursor = 0
    for index, (item, row) in enumerate(zip(plan.scheduled, plan_rows(plan, bucket))):
        if index == plan.num_decodes:  # the first prefill chunk: after the decode part, if any
            cursor = max(cursor, decode_rows)
        seq, start, count = item.seq, item.start, item.num_new_tokens
        end = start + count
        token_ids[cursor : cursor + count] = seq.all_token_ids[start:end]
        pos = np.arange(start, end, dtype=np.int32)
        positions[cursor : cursor + count] = pos
        table = np.asarray(seq.block_table, np.int32)
        slot_mapping[cursor : cursor + count] = (
            table[pos // block_size] * block_size + pos % block_size
        )
        used_blocks = -(-(end + lookahead) // block_size)
        block_tables[row, :used_blocks] = table[:used_blocks]
        context_lens[row] = end
        logits_indices[row] = cursor + count - 1
        cursor += count
        query_start_loc[row + 1] = cursor
        row_sampling = sampling[seq.seq_id]
        params = row_sampling.params
        if params.prompt_logprobs is not None and start + 1 < seq.num_prompt_tokens:
            next_end = min(end, seq.num_prompt_tokens - 1)  # the last prompt token has no next
            first = cursor - count  # this row's first token in the step
            prompt_next_ids[first : first + next_end - start] = seq.prompt_token_ids[
                start + 1 : next_end + 1
            ]
        slots[row] = row_sampling.slot
        sampled[row] = item.samples
        want_logprobs[row] = params.logprobs is not None
        banned[row, : len(row_sampling.banned)] = row_sampling.banned[:MAX_BANNED_PER_STEP]
        if row_sampling.bitmask is not None:
            token_bitmask[row] = row_sampling.bitmask
        for name in _FROM_PARAMS:
            getattr(scalars, name)[row] = getattr(params, name)
        scalars.num_output_tokens[row] = seq.num_output_tokens
        scalars.positions[row] = seq.num_output_tokens
        scalars.seeds[row] = row_sampling.seed
    rows_used = len(plan.scheduled) + max(0, decode_rows - plan.num_decodes)
    query_start_loc[rows_used + 1 :] = cursor
    return StepInputs(
        token_ids=token_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        block_tables=block_tables,
        context_lens=context_lens,
        query_start_loc=query_start_loc,
        logits_indices=logits_indices,
        slots=slots,
        sampled=sampled,
        want_logprobs=want_logprobs,
        banned=banned,
        sampling=scalars,
        prompt_next_ids=prompt_next_ids,
        token_bitmask=token_bitmask,
    )
