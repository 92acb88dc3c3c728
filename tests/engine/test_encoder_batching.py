"""Encoder batch planning (host only, no JAX): every prompt once, in a bucket that fits it."""

from __future__ import annotations

import numpy as np
import pytest

from jaxinfer.engine.encoder_batching import EncoderBucket, EncoderBucketTable, pad_batch


@pytest.fixture
def table() -> EncoderBucketTable:
    return EncoderBucketTable.build(max_seqs=8, max_len=100, max_tokens=256)


def test_bucket_grid(table: EncoderBucketTable) -> None:
    assert table.seq_buckets == (1, 2, 4, 8)
    assert table.len_buckets == (16, 32, 64, 100)  # the largest is exact
    buckets = table.all_buckets()
    assert all(b.num_seqs * b.seq_len <= 256 or b.num_seqs == 1 for b in buckets)
    assert EncoderBucket(8, 32) in buckets and EncoderBucket(4, 64) in buckets
    assert EncoderBucket(8, 64) not in buckets and EncoderBucket(2, 100) in buckets


@pytest.mark.parametrize("seed", range(5))
def test_plan_covers_every_prompt_once(table: EncoderBucketTable, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(1, 101, size=int(rng.integers(1, 40)))]
    plan = table.plan(lengths)
    seen = [i for rows, _ in plan for i in rows]
    assert sorted(seen) == list(range(len(lengths)))
    for rows, bucket in plan:
        assert bucket in table.all_buckets()
        assert len(rows) <= bucket.num_seqs
        assert max(lengths[i] for i in rows) <= bucket.seq_len


def test_long_prompt_runs_alone_when_the_token_budget_is_small() -> None:
    table = EncoderBucketTable.build(max_seqs=4, max_len=512, max_tokens=256)
    plan = table.plan([500, 400, 3])
    assert plan[0] == ([0], EncoderBucket(1, 512)) and plan[1] == ([1], EncoderBucket(1, 512))
    assert plan[2] == ([2], EncoderBucket(1, 16))


def test_pad_batch() -> None:
    ids, lengths = pad_batch([[5, 6, 7], [8]], EncoderBucket(4, 16), pad_id=0)
    assert ids.shape == (4, 16) and ids.dtype == np.int32
    assert ids[0, :4].tolist() == [5, 6, 7, 0] and ids[1, :2].tolist() == [8, 0]
    assert lengths.tolist() == [3, 1, 0, 0]
