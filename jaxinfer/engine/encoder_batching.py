"""Encoder batches: which prompts run together, and the padded (batch, length) bucket they use.

An encoder step is one dense [num_seqs, seq_len] call, so its shape contract is a small grid of
buckets, both sides powers of two, limited to `max_tokens` padded tokens per call (a long bucket
runs few rows) so activation memory stays bounded. Every bucket can be compiled at warm-up.

Plain Python + numpy: the host decides the batches; `runtime/encoder_runner.py` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxinfer.seam import EncoderBucket


def _powers_of_two_up_to(limit: int, start: int = 1) -> list[int]:
    sizes, size = [], min(start, limit)
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


@dataclass(frozen=True)
class EncoderBucketTable:
    """Buckets (s, l): s in `seq_buckets`, l in `len_buckets`, s * l <= max_tokens (or s == 1).

    `seq_buckets` starts at 1, so a single prompt of any allowed length always has a bucket.
    """

    seq_buckets: tuple[int, ...]
    len_buckets: tuple[int, ...]
    max_tokens: int

    @classmethod
    def build(cls, max_seqs: int, max_len: int, max_tokens: int, min_len: int = 16):
        """Powers of two up to `max_seqs` rows and `max_len` tokens (the largest exact)."""
        return cls(
            tuple(_powers_of_two_up_to(max_seqs)),
            tuple(_powers_of_two_up_to(max_len, start=min_len)),
            max_tokens,
        )

    @property
    def max_len(self) -> int:
        return self.len_buckets[-1]

    def rows_for(self, seq_len: int) -> int:
        """Most rows a call at this padded length may take."""
        fitting = [s for s in self.seq_buckets if s * seq_len <= self.max_tokens]
        return max(fitting, default=1)

    def all_buckets(self) -> list[EncoderBucket]:
        return [
            EncoderBucket(s, length)
            for length in self.len_buckets
            for s in self.seq_buckets
            if s <= self.rows_for(length)
        ]

    def plan(self, lengths: list[int]) -> list[tuple[list[int], EncoderBucket]]:
        """Group prompt indices into calls: longest first, each call as full as its bucket allows.

        Sorting by length keeps rows of similar length together, so little of a call is padding.
        """
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches = []
        start = 0
        while start < len(order):
            longest = lengths[order[start]]
            seq_len = next(b for b in self.len_buckets if b >= longest)
            rows = order[start : start + self.rows_for(seq_len)]
            num_seqs = next(s for s in self.seq_buckets if s >= len(rows))
            batches.append((rows, EncoderBucket(num_seqs, seq_len)))
            start += len(rows)
        return batches


def pad_batch(
    token_lists: list[list[int]], bucket: EncoderBucket, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """-> (token ids [num_seqs, seq_len] int32 right-padded, lengths [num_seqs] int32; 0 = padding row)."""
    token_ids = np.full((bucket.num_seqs, bucket.seq_len), pad_id, np.int32)
    lengths = np.zeros((bucket.num_seqs,), np.int32)
    for row, ids in enumerate(token_lists):
        token_ids[row, : len(ids)] = ids
        lengths[row] = len(ids)
    return token_ids, lengths
