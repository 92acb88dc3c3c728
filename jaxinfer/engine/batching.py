"""Shape buckets and the padding of a StepPlan into fixed-shape numpy arrays.

The device sees only a handful of shapes, each compiled once. A bucket fixes the number of tokens
(T), sequences (S) and blocks per block table (B). Decode buckets have T == S (one token per
sequence); prefill buckets carry ragged chunks of up to `max_prefill_seqs` sequences.

Padding is inert by construction: padded tokens write their K/V into reserved block 0, padded
sequences have no tokens and context length 0, and padded block-table entries point at block 0.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from jaxinfer.engine.scheduler import StepPlan

PAD_BLOCK = 0


@dataclass(frozen=True, order=True)
class Bucket:
    is_prefill: bool
    num_tokens: int  # T
    num_seqs: int  # S
    num_blocks: int  # B: block-table width


@dataclass(frozen=True)
class RowSampling:
    """Per-row sampling inputs. The full pipeline (top-k, penalties, ...) extends this."""

    temperature: float
    seed: int  # the request's key seed; the output position is folded in on the device


@dataclass(frozen=True)
class BucketTable:
    seq_buckets: tuple[int, ...]
    token_buckets: tuple[int, ...]
    block_buckets: tuple[int, ...]
    max_prefill_seqs: int

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
        return decode + prefill

    def select(self, plan: StepPlan, block_size: int) -> Bucket:
        """The smallest bucket that holds the plan."""
        longest = max(item.start + item.num_new_tokens for item in plan.scheduled)
        blocks = _fit(self.block_buckets, -(-longest // block_size), "blocks per sequence")
        num_seqs = len(plan.scheduled)
        if not plan.is_prefill:
            seqs = _fit(self.seq_buckets, num_seqs, "sequences")
            return Bucket(False, seqs, seqs, blocks)
        seqs = _fit(self.prefill_seq_buckets, num_seqs, "prefill sequences")
        tokens = _fit(self.token_buckets, max(plan.num_tokens, seqs), "tokens")
        return Bucket(True, tokens, seqs, blocks)


def _fit(buckets: tuple[int, ...], size: int, what: str) -> int:
    index = bisect.bisect_left(buckets, size)
    if index == len(buckets):
        raise ValueError(f"{size} {what} exceed the largest bucket {buckets[-1]}")
    return buckets[index]


@dataclass(frozen=True)
class StepInputs:
    """Host arrays of one bucket's exact shape; the runner ships them to the device as they are."""

    token_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    slot_mapping: np.ndarray  # [T] int32: block * block_size + offset
    block_tables: np.ndarray  # [S, B] int32
    context_lens: np.ndarray  # [S] int32: tokens in the cache after this step
    query_start_loc: np.ndarray  # [S + 1] int32
    logits_indices: np.ndarray  # [S] int32: last token of each sequence
    temperatures: np.ndarray  # [S] float32
    seeds: np.ndarray  # [S] uint32
    sample_positions: np.ndarray  # [S] int32: index of the output token being sampled

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)


def build_step_inputs(
    plan: StepPlan,
    bucket: Bucket,
    block_size: int,
    sampling: Mapping[int, RowSampling],
) -> StepInputs:
    T, S, B = bucket.num_tokens, bucket.num_seqs, bucket.num_blocks
    token_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slot_mapping = np.zeros(T, np.int32)  # padding writes land in block 0
    block_tables = np.full((S, B), PAD_BLOCK, np.int32)
    context_lens = np.zeros(S, np.int32)
    query_start_loc = np.zeros(S + 1, np.int32)
    logits_indices = np.zeros(S, np.int32)
    temperatures = np.zeros(S, np.float32)
    seeds = np.zeros(S, np.uint32)
    sample_positions = np.zeros(S, np.int32)

    cursor = 0
    for row, item in enumerate(plan.scheduled):
        seq, start, count = item.seq, item.start, item.num_new_tokens
        end = start + count
        token_ids[cursor : cursor + count] = seq.all_token_ids[start:end]
        pos = np.arange(start, end, dtype=np.int32)
        positions[cursor : cursor + count] = pos
        table = np.asarray(seq.block_table, np.int32)
        slot_mapping[cursor : cursor + count] = (
            table[pos // block_size] * block_size + pos % block_size
        )
        used_blocks = -(-end // block_size)
        block_tables[row, :used_blocks] = table[:used_blocks]
        context_lens[row] = end
        logits_indices[row] = cursor + count - 1
        cursor += count
        query_start_loc[row + 1] = cursor
        row_sampling = sampling[seq.seq_id]
        temperatures[row] = row_sampling.temperature
        seeds[row] = row_sampling.seed & 0xFFFFFFFF
        sample_positions[row] = seq.num_output_tokens
    query_start_loc[len(plan.scheduled) + 1 :] = cursor
    return StepInputs(
        token_ids=token_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        block_tables=block_tables,
        context_lens=context_lens,
        query_start_loc=query_start_loc,
        logits_indices=logits_indices,
        temperatures=temperatures,
        seeds=seeds,
        sample_positions=sample_positions,
    )
