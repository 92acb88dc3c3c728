"""SchedulerGroup: one scheduler per pipeline micro-batch, sharing the KV blocks (no JAX)."""

from __future__ import annotations

import pytest

from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.scheduler_group import SchedulerGroup
from jaxinfer.engine.sequence import Sequence


def make_group(size: int, num_blocks: int = 64) -> SchedulerGroup:
    blocks = BlockManager(num_blocks, 4)
    return SchedulerGroup(
        [
            Scheduler(
                blocks,
                max_num_seqs=4,
                max_num_batched_tokens=32,
                max_prefill_seqs=4,
                max_model_len=32,
            )
            for _ in range(size)
        ]
    )


def seq(seq_id: int, prompt_len: int = 6) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=[1] * prompt_len, max_tokens=4)


def test_requests_join_the_least_loaded_batch_and_forks_stay_together():
    group = make_group(3)
    assert [group.add(seq(i)) for i in range(3)] == [0, 1, 2]
    assert group.add(seq(3), [seq(4)]) == 0  # a request and its fork: one batch
    assert group[0].num_unfinished == 3  # the fork counts before it starts
    assert group.add(seq(5)) == 1
    assert group.num_waiting == 5 and group.num_running == 0  # parents wait; forks come later


def test_batches_share_the_blocks_and_are_scheduled_independently():
    group = make_group(2)
    for i in range(4):
        group.add(seq(i))
    first, second = group[0].schedule(), group[1].schedule()
    assert {item.seq.seq_id for item in first.scheduled} == {0, 2}
    assert {item.seq.seq_id for item in second.scheduled} == {1, 3}
    tables = [item.seq.block_table for plan in (first, second) for item in plan.scheduled]
    used = [block for table in tables for block in table]
    assert len(used) == len(set(used))  # one block space, no block given twice
    assert group[0].block_manager is group[1].block_manager


def test_abort_finds_the_sequence_in_any_batch():
    group = make_group(2)
    group.add(seq(0))
    group.add(seq(1))
    assert group.abort(1).seq_id == 1
    assert group.abort(1) is None
    assert group.has_unfinished and group.num_waiting == 1


def test_an_empty_group_is_refused():
    with pytest.raises(ValueError, match="at least one scheduler"):
        SchedulerGroup([])
