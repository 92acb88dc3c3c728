"""`split_plan`: a step cut into pipeline micro-batches (host-side, no JAX)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from jaxinfer.engine.batching import split_plan
from jaxinfer.engine.scheduler import ScheduledSeq, StepPlan
from jaxinfer.engine.sequence import Sequence


def plan_of(token_counts: list[int], is_prefill: bool = True) -> StepPlan:
    scheduled = tuple(
        ScheduledSeq(Sequence(seq_id=i, prompt_token_ids=[1] * n, max_tokens=4), n, 0, True)
        for i, n in enumerate(token_counts)
    )
    return StepPlan(is_prefill, scheduled, preempted=(), block_copies=((3, 4),))


@given(st.lists(st.integers(1, 64), min_size=1, max_size=32), st.integers(1, 8))
def test_micro_batches_cover_the_plan_in_order_none_empty(counts, parts):
    plan = plan_of(counts)
    micro = split_plan(plan, parts)
    assert len(micro) == min(parts, len(counts))
    assert all(m.scheduled for m in micro)
    assert tuple(item for m in micro for item in m.scheduled) == plan.scheduled
    assert all(m.is_prefill == plan.is_prefill and not m.block_copies for m in micro)


@given(st.integers(1, 64), st.integers(1, 8))
def test_decode_steps_split_into_near_equal_counts(num_seqs, parts):
    micro = split_plan(plan_of([1] * num_seqs, is_prefill=False), parts)
    sizes = [len(m.scheduled) for m in micro]
    assert max(sizes) - min(sizes) <= 1


def test_prefill_split_balances_tokens():
    micro = split_plan(plan_of([100, 10, 10, 10, 10, 60]), 2)
    assert [m.num_tokens for m in micro] == [100, 100]


def test_one_part_is_the_plan_unchanged():
    plan = plan_of([5, 7])
    (only,) = split_plan(plan, 1)
    assert only.scheduled == plan.scheduled
