"""Scheduler: continuous batching, chunked prefill, preemption by recompute, against a fake device."""

import dataclasses
import logging
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.scheduler import Scheduler, StepPlan
from jaxinfer.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class Limits:
    num_blocks: int = 64
    block_size: int = 4
    max_num_seqs: int = 4
    max_num_batched_tokens: int = 16
    max_prefill_seqs: int = 4
    max_model_len: int = 64
    unified: bool = True  # False: the older prefill-or-decode alternation


def make_scheduler(limits: Limits = Limits()) -> Scheduler:
    return Scheduler(
        BlockManager(limits.num_blocks, limits.block_size),
        max_num_seqs=limits.max_num_seqs,
        max_num_batched_tokens=limits.max_num_batched_tokens,
        max_prefill_seqs=limits.max_prefill_seqs,
        max_model_len=limits.max_model_len,
        unified=limits.unified,
    )


def make_seq(seq_id: int, prompt_len: int, max_tokens: int) -> Sequence:
    prompt = [(seq_id * 7 + i) % 101 for i in range(prompt_len)]
    return Sequence(seq_id=seq_id, prompt_token_ids=prompt, max_tokens=max_tokens)


def fake_token(seq: Sequence) -> int:
    """Depends only on the request and its output position, like a seeded sampler."""
    return 1000 + seq.seq_id * 100 + seq.num_output_tokens


def fake_device(plan: StepPlan) -> dict[int, int]:
    return {item.seq.seq_id: fake_token(item.seq) for item in plan.scheduled if item.samples}


def check_plan(sched: Scheduler, plan: StepPlan) -> None:
    """Everything a plan promises the device, checked before the step 'runs'."""
    bm = sched.block_manager
    assert plan.scheduled, "an empty plan should have been None"
    assert plan.num_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    ids = [item.seq.seq_id for item in plan.scheduled]
    assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
    if plan.is_prefill:
        assert len(plan.scheduled) - plan.num_decodes <= sched.max_prefill_seqs
    if not sched.unified:
        assert plan.num_decodes in (0, len(plan.scheduled)), "a unified step in separate mode"
    for index, item in enumerate(plan.scheduled):
        seq = item.seq
        assert seq.status is SequenceStatus.RUNNING and seq in sched.running
        assert item.start == seq.num_computed_tokens
        assert item.num_new_tokens >= 1
        assert item.start + item.num_new_tokens <= seq.num_tokens
        assert item.samples == (item.start + item.num_new_tokens == seq.num_tokens)
        assert len(seq.block_table) * bm.block_size >= item.start + item.num_new_tokens
        if index < plan.num_decodes:
            assert item.num_new_tokens == 1 and item.samples
    for seq in plan.preempted:
        assert seq.status is SequenceStatus.WAITING and seq.block_table == []
        assert seq.num_computed_tokens == 0 and seq in sched.waiting
    assert all(seq.block_table == [] for seq in sched.waiting)
    bm.check_invariants([seq.block_table for seq in sched.running])


def run_to_completion(sched: Scheduler, max_steps: int = 10_000) -> list[StepPlan]:
    """The engine loop with a fake device; a sequence stops after exactly max_tokens outputs."""
    plans = []
    while sched.has_unfinished:
        assert len(plans) < max_steps, "no progress"
        plan = sched.schedule()
        assert plan is not None
        check_plan(sched, plan)
        plans.append(plan)
        for seq in sched.update(plan, fake_device(plan)):
            assert seq.num_output_tokens <= seq.max_tokens
            if seq.num_output_tokens == seq.max_tokens:
                sched.finish(seq, "length")
    assert sched.schedule() is None
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks
    bm.check_invariants([])
    return plans


def summarize(plans: list[StepPlan]) -> list[tuple]:
    return [
        (
            p.is_prefill,
            tuple((i.seq.seq_id, i.start, i.num_new_tokens, i.samples) for i in p.scheduled),
            tuple(s.seq_id for s in p.preempted),
        )
        for p in plans
    ]


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["max_num_seqs", "max_num_batched_tokens", "max_prefill_seqs", "max_model_len"]
)
def test_constructor_validates(field: str) -> None:
    kwargs = {"max_num_seqs": 2, "max_num_batched_tokens": 8, "max_prefill_seqs": 2}
    kwargs["max_model_len"] = 8
    kwargs[field] = 0
    with pytest.raises(ValueError, match=field):
        Scheduler(BlockManager(8, 4), **kwargs)


def test_token_budget_must_cover_a_decode_step() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(BlockManager(8, 4), 8, 4, 1, 16)


def test_add_rejects_bad_sequences() -> None:
    sched = make_scheduler(Limits(num_blocks=5, block_size=4, max_model_len=32))  # 16 tokens fit
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add(make_seq(0, 0, 1))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(make_seq(1, 33, 1))
    with pytest.raises(ValueError, match="max_tokens"):
        sched.add(make_seq(2, 4, 0))
    with pytest.raises(ValueError, match=r"never fit: 17 tokens .* need 5 KV blocks .* only 4"):
        sched.add(make_seq(3, 8, 9))
    sched.add(make_seq(4, 8, 8))  # exactly fits
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(make_seq(4, 8, 8))
    assert sched.num_waiting == 1


def test_never_fit_check_caps_at_max_model_len() -> None:
    sched = make_scheduler(Limits(num_blocks=5, block_size=4, max_model_len=16))
    sched.add(make_seq(0, 8, 100))  # the engine stops it at max_model_len; 16 tokens fit


def test_decoding_past_max_model_len_is_loud() -> None:
    sched = make_scheduler(Limits(max_model_len=6))
    sched.add(make_seq(0, 4, 100))
    with pytest.raises(RuntimeError, match="max_model_len"):
        for _ in range(4):  # an engine that forgets to stop at max_model_len
            plan = sched.schedule()
            sched.update(plan, fake_device(plan))


def test_schedule_is_none_when_idle() -> None:
    assert make_scheduler().schedule() is None
    assert not make_scheduler().has_unfinished


# ---- batching ----------------------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt() -> None:
    sched = make_scheduler(Limits(max_num_batched_tokens=4, max_num_seqs=1))
    seq = make_seq(0, 10, 2)
    sched.add(seq)
    chunks = []
    for _ in range(3):
        plan = sched.schedule()
        assert plan.is_prefill and len(plan.scheduled) == 1
        item = plan.scheduled[0]
        chunks.append((item.start, item.num_new_tokens, item.samples))
        assert len(seq.block_table) == -(-(item.start + item.num_new_tokens) // 4)
        sched.update(plan, fake_device(plan))
    assert chunks == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert seq.output_token_ids == [1000]
    plan = sched.schedule()
    assert not plan.is_prefill
    assert [(i.start, i.num_new_tokens, i.samples) for i in plan.scheduled] == [(10, 1, True)]


def test_prefill_budget_is_shared_and_in_progress_prefill_goes_first() -> None:
    sched = make_scheduler(Limits(max_num_batched_tokens=8, unified=False))
    a, b, c = make_seq(0, 6, 1), make_seq(1, 6, 1), make_seq(2, 6, 1)
    for seq in (a, b, c):
        sched.add(seq)
    plan = sched.schedule()
    assert [(i.seq.seq_id, i.start, i.num_new_tokens) for i in plan.scheduled] == [
        (0, 0, 6),
        (1, 0, 2),
    ]
    sched.update(plan, fake_device(plan))
    plan = sched.schedule()
    assert plan.is_prefill
    assert [(i.seq.seq_id, i.start, i.num_new_tokens) for i in plan.scheduled] == [
        (1, 2, 4),
        (2, 0, 4),
    ]


def test_max_prefill_seqs_limits_one_prefill_step() -> None:
    sched = make_scheduler(Limits(max_prefill_seqs=2, max_num_batched_tokens=64, unified=False))
    for i in range(4):
        sched.add(make_seq(i, 3, 2))
    plan = sched.schedule()
    assert plan.is_prefill and [i.seq.seq_id for i in plan.scheduled] == [0, 1]
    sched.update(plan, fake_device(plan))
    plan = sched.schedule()
    assert plan.is_prefill and [i.seq.seq_id for i in plan.scheduled] == [2, 3]


def test_continuous_batching_admits_new_sequences_as_others_finish() -> None:
    sched = make_scheduler(Limits(max_num_seqs=2, unified=False))
    seqs = [make_seq(0, 3, 1), make_seq(1, 3, 3), make_seq(2, 3, 2)]
    for seq in seqs:
        sched.add(seq)
    plan = sched.schedule()
    assert plan.is_prefill and [i.seq.seq_id for i in plan.scheduled] == [0, 1]
    assert sched.num_running == 2 and sched.num_waiting == 1
    for seq in sched.update(plan, fake_device(plan)):
        if seq.num_output_tokens == seq.max_tokens:
            sched.finish(seq, "length")
    assert seqs[0].is_finished and seqs[0].finish_reason == "length"
    # A slot freed up: the next step admits seq 2 while seq 1 is mid-generation.
    plan = sched.schedule()
    assert plan.is_prefill and [i.seq.seq_id for i in plan.scheduled] == [2]
    sched.update(plan, fake_device(plan))
    plan = sched.schedule()
    assert not plan.is_prefill and [i.seq.seq_id for i in plan.scheduled] == [1, 2]


def test_full_running_set_blocks_admission() -> None:
    sched = make_scheduler(Limits(max_num_seqs=1))
    sched.add(make_seq(0, 3, 5))
    sched.add(make_seq(1, 3, 5))
    plans = run_to_completion(sched)
    # seq 1 is admitted only after seq 0 finished: 1 prefill + 4 decodes for each, in turn.
    assert [p.scheduled[0].seq.seq_id for p in plans] == [0] * 5 + [1] * 5


def test_no_blocks_for_prefill_falls_through_to_decode() -> None:
    # 4 usable blocks of 4 tokens. seq 0 (12 tokens + 4 outputs) fills the cache, so seq 1 waits
    # while seq 0 decodes rather than preempting it.
    sched = make_scheduler(Limits(num_blocks=5, block_size=4, max_model_len=16, unified=False))
    a, b = make_seq(0, 12, 4), make_seq(1, 4, 1)
    sched.add(a)
    plan = sched.schedule()
    sched.update(plan, fake_device(plan))
    sched.add(b)
    plan = sched.schedule()  # seq 1 needs a block; seq 0 takes the last one to decode
    assert plan.is_prefill and [i.seq.seq_id for i in plan.scheduled] == [1]
    sched.update(plan, fake_device(plan))
    sched.finish(b, "stop")
    plan = sched.schedule()
    assert not plan.is_prefill and sched.block_manager.num_free_blocks == 0


def test_waiting_sequence_waits_for_blocks_without_preempting() -> None:
    sched = make_scheduler(Limits(num_blocks=5, block_size=4, max_model_len=16))
    a, b = make_seq(0, 13, 2), make_seq(1, 4, 1)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [i.seq.seq_id for i in plan.scheduled] == [
        0
    ]  # 16-token budget: b would fit, blocks don't
    sched.update(plan, fake_device(plan))
    plan = sched.schedule()
    assert not plan.is_prefill and not plan.preempted and sched.num_waiting == 1
    run_to_completion(sched)
    assert b.output_token_ids == [1100]


# ---- unified steps ------------------------------------------------------------------------------


def test_an_arriving_prompt_rides_along_with_running_decodes() -> None:
    sched = make_scheduler(Limits(max_num_batched_tokens=8))
    a = make_seq(0, 3, 10)
    sched.add(a)
    sched.update(plan := sched.schedule(), fake_device(plan))
    b = make_seq(1, 20, 1)
    sched.add(b)
    chunks = []
    while not b.num_output_tokens:
        plan = sched.schedule()
        # a decodes in every step; b's prefill gets what is left of the 8-token budget
        assert plan.num_decodes == 1 and plan.scheduled[0].seq is a
        chunks.append(sum(i.num_new_tokens for i in plan.scheduled[1:]))
        sched.update(plan, fake_device(plan))
    assert chunks == [7, 7, 6] and a.num_output_tokens == 4


def test_a_preempting_step_admits_nobody() -> None:
    # 3 usable blocks of 2 tokens: a and b decode until a block runs out and b is preempted.
    sched = make_scheduler(Limits(num_blocks=4, block_size=2, max_model_len=6))
    a, b, c = make_seq(0, 2, 4), make_seq(1, 1, 4), make_seq(2, 1, 1)
    sched.add(a)
    sched.add(b)
    plan = None
    while plan is None or not plan.preempted:
        if plan is not None and c not in sched.waiting and not c.is_finished:
            sched.add(c)
        plan = sched.schedule()
        sched.update(plan, fake_device(plan))
    assert plan.preempted == (b,) and [i.seq for i in plan.scheduled] == [a]
    run_to_completion(sched)


def test_unified_and_separate_steps_give_the_same_tokens() -> None:
    requests = [(0, 5, 7), (0, 17, 3), (2, 30, 5), (3, 2, 9), (6, 25, 4)]
    limits = Limits(max_num_batched_tokens=12, max_prefill_seqs=2)
    unified_plans, unified = simulate(limits, requests)
    separate_plans, separate = simulate(dataclasses.replace(limits, unified=False), requests)
    assert [s.output_token_ids for s in unified] == [s.output_token_ids for s in separate]
    assert len(unified_plans) < len(separate_plans)  # decodes did not wait out the prefills


# ---- preemption --------------------------------------------------------------------------------


def squeezed_workload(limits: Limits) -> tuple[Scheduler, list[Sequence]]:
    sched = make_scheduler(limits)
    seqs = [make_seq(i, 5, 10) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    return sched, seqs


def test_preemption_by_recompute(caplog: pytest.LogCaptureFixture) -> None:
    # 3 sequences growing to 15 tokens (4 blocks each) share 6 usable blocks.
    squeezed = Limits(num_blocks=7, block_size=4, max_model_len=32)
    sched, seqs = squeezed_workload(squeezed)
    with caplog.at_level(logging.DEBUG, logger="jaxinfer"):
        plans = run_to_completion(sched)
    assert sched.num_preemptions >= 2
    preempted_ids = [s.seq_id for p in plans for s in p.preempted]
    assert len(preempted_ids) == sched.num_preemptions
    assert all(not p.is_prefill or not p.preempted for p in plans if p.preempted)
    records = [r for r in caplog.records if "PreemptionMode.RECOMPUTE" in r.getMessage()]
    assert len(records) == sched.num_preemptions
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and records[0] is warnings[0]  # later ones only at DEBUG
    message = warnings[0].getMessage()
    assert f"Sequence {preempted_ids[0]} is preempted by PreemptionMode.RECOMPUTE" in message
    assert "total_num_cumulative_preemption=1" in message
    assert "max_num_seqs" in message
    # The newest running sequence is the victim.
    assert preempted_ids[0] == 2
    # Preemption is invisible in the outputs: same tokens as with an ample cache.
    ample, reference = squeezed_workload(Limits(num_blocks=64, block_size=4, max_model_len=32))
    run_to_completion(ample)
    assert ample.num_preemptions == 0
    for seq, ref in zip(seqs, reference):
        assert seq.output_token_ids == ref.output_token_ids
        assert seq.num_output_tokens == 10 and seq.finish_reason == "length"


def test_preempted_sequence_reprefills_prompt_and_outputs() -> None:
    sched, _ = squeezed_workload(Limits(num_blocks=9, block_size=4, max_model_len=32))
    while True:
        plan = sched.schedule()
        for seq in sched.update(plan, fake_device(plan)):
            if seq.num_output_tokens == seq.max_tokens:
                sched.finish(seq, "length")
        if plan.preempted:
            break
    victim = plan.preempted[0]
    outputs_before = list(victim.output_token_ids)
    assert outputs_before and sched.waiting[0] is victim
    while True:
        plan = sched.schedule()
        items = [i for i in plan.scheduled if i.seq is victim]
        if items:
            break
        for seq in sched.update(plan, fake_device(plan)):
            if seq.num_output_tokens == seq.max_tokens:
                sched.finish(seq, "length")
    (item,) = items
    assert plan.is_prefill and item.start == 0
    assert item.num_new_tokens == victim.num_prompt_tokens + len(outputs_before)
    assert item.samples and victim.output_token_ids == outputs_before


def test_warning_is_per_scheduler(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="jaxinfer"):
        for _ in range(2):
            sched, _ = squeezed_workload(Limits(num_blocks=9, block_size=4, max_model_len=32))
            run_to_completion(sched)
    assert len([r for r in caplog.records if "PreemptionMode.RECOMPUTE" in r.message]) == 2


def test_decode_preempts_a_partial_prefill() -> None:
    # seq 1 is mid-prefill holding the last free block when seq 0 needs it to decode.
    sched = make_scheduler(
        Limits(
            num_blocks=5, block_size=4, max_num_batched_tokens=8, max_model_len=16, unified=False
        )
    )
    a, b = make_seq(0, 8, 2), make_seq(1, 12, 1)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [(i.seq.seq_id, i.num_new_tokens) for i in plan.scheduled] == [(0, 8)]
    sched.update(plan, fake_device(plan))
    plan = sched.schedule()
    assert [(i.seq.seq_id, i.num_new_tokens, i.samples) for i in plan.scheduled] == [(1, 8, False)]
    sched.update(plan, fake_device(plan))
    plan = sched.schedule()  # b needs a 5th block for its last 4 tokens: none; a decodes
    assert not plan.is_prefill and plan.preempted == (b,)
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    run_to_completion(sched)
    assert a.num_output_tokens == 2 and b.num_output_tokens == 1


# ---- finish / abort ----------------------------------------------------------------------------


def test_finish_requires_a_reason_or_a_finished_sequence() -> None:
    sched = make_scheduler()
    seq = make_seq(0, 3, 2)
    sched.add(seq)
    with pytest.raises(ValueError, match="not finished"):
        sched.finish(seq)
    seq.finish("stop", stop_reason=7)
    sched.finish(seq)
    assert not sched.has_unfinished and seq.stop_reason == 7


def test_abort_waiting_and_running() -> None:
    sched = make_scheduler(Limits(max_num_seqs=1))
    a, b = make_seq(0, 3, 5), make_seq(1, 3, 5)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert sched.abort(1) is b and b.finish_reason == "abort" and sched.num_waiting == 0
    assert sched.abort(0) is a and a.block_table == [] and sched.num_running == 0
    assert sched.abort(0) is None and sched.abort(99) is None
    assert sched.update(plan, {0: 5}) == []  # aborted mid-step: the result is dropped
    assert a.output_token_ids == [] and sched.schedule() is None
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_sequence_finish_validates_reason() -> None:
    with pytest.raises(ValueError, match="finish reason"):
        make_seq(0, 1, 1).finish("done")


# ---- random workloads --------------------------------------------------------------------------


@st.composite
def workloads(draw: st.DrawFn) -> tuple[Limits, list[tuple[int, int, int]]]:
    block_size = draw(st.integers(1, 8))
    max_model_len = draw(st.integers(2, 48))
    max_num_seqs = draw(st.integers(1, 6))
    # Enough blocks for the longest sequence alone (add() demands it), sometimes barely more.
    min_blocks = -(-max_model_len // block_size) + 1
    limits = Limits(
        num_blocks=draw(st.integers(min_blocks, min_blocks + 3 * max_num_seqs)),
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=draw(st.integers(max_num_seqs, 40)),
        max_prefill_seqs=draw(st.integers(1, 6)),
        max_model_len=max_model_len,
    )
    requests = []  # (arrival step, prompt_len, max_tokens)
    for _ in range(draw(st.integers(1, 12))):
        prompt_len = draw(st.integers(1, max_model_len))
        max_tokens = draw(st.integers(1, max(1, max_model_len - prompt_len)))
        requests.append((draw(st.integers(0, 20)), prompt_len, max_tokens))
    return limits, requests


def simulate(limits: Limits, requests: list[tuple[int, int, int]]) -> tuple[list, list[Sequence]]:
    sched = make_scheduler(limits)
    arrivals = sorted(enumerate(requests), key=lambda r: (r[1][0], r[0]))
    seqs: list[Sequence] = []
    plans: list[StepPlan] = []
    step = 0
    while arrivals or sched.has_unfinished:
        while arrivals and arrivals[0][1][0] <= step:
            _, (_, prompt_len, max_tokens) = arrivals.pop(0)
            seqs.append(make_seq(len(seqs), prompt_len, max_tokens))
            sched.add(seqs[-1])
        step += 1
        plan = sched.schedule()
        if plan is None:
            assert not sched.has_unfinished
            continue
        check_plan(sched, plan)
        plans.append(plan)
        for seq in sched.update(plan, fake_device(plan)):
            assert seq.num_tokens <= limits.max_model_len + 1
            if seq.num_output_tokens == seq.max_tokens:
                sched.finish(seq, "length")
        assert step < 5_000, "no progress"
    plans += run_to_completion(sched)
    return summarize(plans), seqs


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "separate"])
@settings(max_examples=150, deadline=None)
@given(workload=workloads())
def test_random_workloads_run_to_completion(unified: bool, workload) -> None:
    limits, requests = workload
    limits = dataclasses.replace(limits, unified=unified)
    summary, seqs = simulate(limits, requests)
    for seq in seqs:
        assert seq.is_finished and seq.finish_reason == "length" and seq.block_table == []
        assert seq.output_token_ids == [1000 + seq.seq_id * 100 + i for i in range(seq.max_tokens)]
    # Deterministic: the same workload gives the same plans.
    assert simulate(limits, requests)[0] == summary


# ---- parallel samples (n > 1): shared prompt blocks, copy-on-write ---------------------------


def _forked_group(sched: Scheduler, prompt_len: int, n: int, max_tokens: int) -> list[Sequence]:
    group = [
        Sequence(seq_id=i, prompt_token_ids=list(range(5, 5 + prompt_len)), max_tokens=max_tokens)
        for i in range(n)
    ]
    sched.add(group[0], group[1:])
    return group


def test_parallel_samples_share_prompt_blocks_and_copy_on_write():
    limits = Limits(num_blocks=40, block_size=16, max_num_seqs=8, max_num_batched_tokens=64)
    sched = make_scheduler(limits)
    bm = sched.block_manager
    group = _forked_group(sched, prompt_len=40, n=4, max_tokens=3)

    plan = sched.schedule()  # the parent prefills all but the last prompt token, once
    assert plan.is_prefill and [(i.seq.seq_id, i.num_new_tokens) for i in plan.scheduled] == [
        (0, 39)
    ]
    assert not plan.scheduled[0].samples
    sched.update(plan, fake_device(plan))
    # forked: 4 sequences on the same 3 blocks (16 + 16 + 7 tokens)
    assert all(s.status is SequenceStatus.RUNNING for s in group)
    assert {tuple(s.block_table) for s in group} == {tuple(group[0].block_table)}
    assert bm.num_usable_blocks - bm.num_free_blocks == 3
    assert [bm.ref_count(b) for b in group[0].block_table] == [4, 4, 4]

    plan = sched.schedule()  # each decodes the last prompt token into its own copy of block 3
    assert not plan.is_prefill and len(plan.scheduled) == 4
    assert all(i.samples and i.start == 39 for i in plan.scheduled)
    assert len(plan.block_copies) == 3  # the fourth writer finds the block private
    shared_partial = {src for src, _ in plan.block_copies}
    assert len(shared_partial) == 1
    assert bm.num_usable_blocks - bm.num_free_blocks == 6  # not 12: two full blocks stay shared
    bm.check_invariants([s.block_table for s in group])
    assert len({s.block_table[2] for s in group}) == 4
    assert len({tuple(s.block_table[:2]) for s in group}) == 1

    sampled = fake_device(plan)
    for seq in sched.update(plan, sampled):
        assert seq.output_token_ids == [fake_token_at(seq, 0)]
    drain(sched)
    assert bm.num_free_blocks == bm.num_usable_blocks


def fake_token_at(seq: Sequence, position: int) -> int:
    return 1000 + seq.seq_id * 100 + position


def drain(sched: Scheduler) -> None:
    while (plan := sched.schedule()) is not None:
        check_plan(sched, plan)
        for seq in sched.update(plan, fake_device(plan)):
            if seq.num_output_tokens >= seq.max_tokens:
                sched.finish(seq, "length")


def test_parallel_samples_of_a_one_token_prompt_and_aborts():
    sched = make_scheduler(Limits(max_num_seqs=4))
    group = _forked_group(sched, prompt_len=1, n=3, max_tokens=2)
    plan = sched.schedule()  # nothing to share: all three decode their only prompt token
    assert not plan.is_prefill and sorted(i.seq.seq_id for i in plan.scheduled) == [0, 1, 2]
    sched.update(plan, fake_device(plan))
    drain(sched)
    assert all(s.finish_reason == "length" and s.num_output_tokens == 2 for s in group)

    # aborting samples still waiting for their parent, then the parent
    sched = make_scheduler(Limits(max_num_seqs=4))
    group = _forked_group(sched, prompt_len=9, n=3, max_tokens=2)
    sched.abort(1)
    plan = sched.schedule()
    sched.update(plan, fake_device(plan))
    assert group[2].status is SequenceStatus.RUNNING and group[1].finish_reason == "abort"
    for seq in group:
        sched.abort(seq.seq_id)
    assert not sched.has_unfinished
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_usable_blocks


def test_parallel_samples_wait_until_the_whole_group_fits():
    sched = make_scheduler(Limits(max_num_seqs=4))
    sched.add(make_seq(10, 5, 4))
    sched.add(make_seq(11, 5, 4))
    group = _forked_group(sched, prompt_len=6, n=3, max_tokens=2)
    plan = sched.schedule()
    assert [i.seq.seq_id for i in plan.scheduled] == [10, 11]  # 2 + 3 > max_num_seqs
    assert group[0].status is SequenceStatus.WAITING
    with pytest.raises(ValueError, match="max_num_seqs"):
        _forked_group(make_scheduler(Limits(max_num_seqs=2)), prompt_len=3, n=3, max_tokens=1)


def test_a_prefilling_parent_keeps_seats_for_its_forks():
    """Seats for a group's samples stay taken while its parent prefills: a request admitted
    into them would leave n + 1 > max_num_seqs sequences running once the parent forks."""
    sched = make_scheduler(Limits(max_num_seqs=4, max_num_batched_tokens=64))
    sched.add(make_seq(10, 5, 3))
    group = _forked_group(sched, prompt_len=6, n=2, max_tokens=3)
    sched.add(make_seq(11, 5, 3))
    sched.add(make_seq(12, 5, 3))
    plan = sched.schedule()
    assert [i.seq.seq_id for i in plan.scheduled] == [10, 0, 11]  # 12 waits for a free seat
    check_plan(sched, plan)
    sched.update(plan, fake_device(plan))
    assert group[1].status is SequenceStatus.RUNNING and len(sched.running) == 4
    drain(sched)
    assert all(s.num_output_tokens == 3 for s in group)


def test_can_run_ahead_only_in_steady_decoding():
    """Async scheduling plans step N+1 before N's tokens are known: only safe when every running
    sequence decodes, wants another token whatever it samples, and no planning can preempt."""
    scheduler = make_scheduler()
    first, second = make_seq(0, 5, max_tokens=3), make_seq(1, 6, max_tokens=10)
    scheduler.add(first)
    scheduler.add(second)
    assert not scheduler.can_run_ahead()  # both wait for prefill
    plan = scheduler.schedule()
    assert plan.is_prefill
    scheduler.update(plan, fake_device(plan))
    assert scheduler.can_run_ahead()  # both decoding, room for a block each
    plan = scheduler.schedule()
    scheduler.update(plan, fake_device(plan))
    assert first.num_output_tokens == 2
    assert not scheduler.can_run_ahead()  # `first` samples its last token (max_tokens 3) now
    scheduler.finish(first, "length")
    assert scheduler.can_run_ahead()
    scheduler.add(make_seq(2, 4, max_tokens=4))
    assert not scheduler.can_run_ahead()  # an arrival: the next step is a prefill


def _decoding(scheduler: Scheduler, *seqs: Sequence) -> StepPlan:
    """Prefill `seqs` (one step) and return the plan of their first decode step."""
    for seq in seqs:
        scheduler.add(seq)
    plan = scheduler.schedule()
    assert plan.is_prefill and plan.num_decodes == 0
    scheduler.update(plan, fake_device(plan))
    plan = scheduler.schedule()
    assert not plan.is_prefill
    return plan


def test_reserve_steps_caps_by_max_tokens_model_length_and_blocks():
    """Multi-step decode (num_scheduler_steps): the steps of one call stop short of every
    sequence's max_tokens and max_model_len, and of what the free blocks cover; the blocks of
    the later steps are in the block tables when it returns."""
    limits = Limits(block_size=4, max_model_len=32, max_num_batched_tokens=32)
    scheduler = make_scheduler(limits)
    short, long = make_seq(0, 5, max_tokens=4), make_seq(1, 6, max_tokens=20)
    plan = _decoding(scheduler, short, long)
    assert short.num_output_tokens == 1  # the prefill sampled one
    assert scheduler.reserve_steps(plan, max_steps=1) == 1  # off
    assert scheduler.reserve_steps(plan, max_steps=8) == 3  # short: 3 more tokens allowed
    bm = scheduler.block_manager
    for seq in (short, long):  # positions num_tokens - 1 .. num_tokens + 1 have their blocks
        assert len(seq.block_table) == bm.blocks_for_tokens(seq.num_tokens + 2)

    scheduler = make_scheduler(limits)
    near_end = make_seq(2, 28, max_tokens=10)  # max_model_len 32: 28 + 1 sampled -> 4 more fit
    plan = _decoding(scheduler, near_end)
    assert scheduler.reserve_steps(plan, max_steps=8) == 4
    assert len(near_end.block_table) == 8

    tight = Limits(num_blocks=5, block_size=4, max_model_len=64)  # 4 usable blocks
    scheduler = make_scheduler(tight)
    pair = make_seq(3, 3, max_tokens=13), make_seq(4, 3, max_tokens=13)  # 16 tokens fit alone
    plan = _decoding(scheduler, *pair)  # 4 tokens each: one block each, two free
    assert scheduler.block_manager.num_free_blocks == 2
    # 5 steps write positions 3 .. 7: a second block each; a 6th step would need a third
    assert scheduler.reserve_steps(plan, max_steps=16) == 5
    assert scheduler.block_manager.num_free_blocks == 0


def test_reserve_steps_only_in_steady_decoding():
    """One step (nothing reserved) while something waits, prefills or forks: the host must see
    each step's result to admit, prefill or fork (and a waiting request would be delayed)."""
    scheduler = make_scheduler()
    first = make_seq(0, 5, max_tokens=10)
    plan = _decoding(scheduler, first)
    scheduler.add(make_seq(1, 4, max_tokens=5))
    tables = list(first.block_table)
    assert scheduler.reserve_steps(plan, max_steps=8) == 1
    assert first.block_table == tables  # nothing reserved
    prefill = scheduler.schedule()
    assert prefill.is_prefill
    assert scheduler.reserve_steps(prefill, max_steps=8) == 1

    # A full batch with a queue: the waiting sequence could not be seated before someone
    # finishes anyway, so the batch runs several steps per call meanwhile.
    scheduler = make_scheduler(Limits(max_num_seqs=2))
    plan = _decoding(scheduler, make_seq(0, 5, max_tokens=10), make_seq(1, 3, max_tokens=10))
    scheduler.add(make_seq(2, 4, max_tokens=5))
    assert scheduler.reserve_steps(plan, max_steps=8) == 8


def test_next_decode_replays_a_multi_step_call_and_drops_finished():
    """`next_decode` gives the plan each later step of a multi-step call ran, for the sequences
    still running: replayed through `update`, they end where single steps would, with the same
    tokens, and a sequence that finished mid-call drops out."""

    def run(max_steps: int) -> dict[int, list[int]]:
        scheduler = make_scheduler()
        seqs = [make_seq(0, 5, max_tokens=9), make_seq(1, 3, max_tokens=12)]
        plan = _decoding(scheduler, *seqs)
        while scheduler.has_unfinished:
            check_plan(scheduler, plan)
            steps = scheduler.reserve_steps(plan, max_steps) if not plan.is_prefill else 1
            for index in range(steps):
                if index:
                    plan = scheduler.next_decode(plan)
                for seq in scheduler.update(plan, fake_device(plan)):
                    if seq.num_output_tokens == seq.max_tokens or seq.output_token_ids[-1] == 1103:
                        scheduler.finish(seq, "stop")
            plan = scheduler.schedule()
            if plan is None:
                break
        assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_usable_blocks
        return {seq.seq_id: seq.output_token_ids for seq in seqs}

    single = run(1)
    assert run(4) == single
    assert len(single[1]) == 4  # stopped on its own token, mid-call
