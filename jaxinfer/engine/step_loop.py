"""How EngineCore runs its steps: schedule, pad and dispatch a step (`_dispatch`), plan the next
one while it runs (`_run_ahead`, vLLM's async scheduling), read it back and record its tokens
(`_update`; `_replay` for a call that ran several decode steps).

Why apart from core.py: core.py holds the requests and vLLM's engine API around them (add,
abort, warm-up, shutdown); this is the loop those requests go through, step by step. `StepLoop`
is EngineCore's base class and works on the state EngineCore.__init__ builds: `config`,
`runner`, `scheduler` (a SchedulerGroup), `buckets`, `output_processor`, `stats`, the request
tables and the step queue (all declared on the class), and the `structured_outputs` /
`eos_token_ids` properties.

Under pipeline parallelism there is one scheduler per micro-batch and one step of each in
flight: `step()` reads back the oldest, updates its micro-batch, and dispatches that
micro-batch's next step at once, so the other micro-batches keep the later stages busy.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxinfer.engine.batching import RowSampling, build_step_inputs, plan_rows
from jaxinfer.engine.request import Request, Sample
from jaxinfer.engine.step_plan import StepPlan
from jaxinfer.interrupts import uninterruptible
from jaxinfer.outputs import RequestOutput
from jaxinfer.seam import StepInputs, StepOutputs

if TYPE_CHECKING:
    from jaxinfer.config import EngineConfig
    from jaxinfer.engine.batching import BucketTable
    from jaxinfer.engine.block_manager import BlockManager
    from jaxinfer.engine.core import EngineStats
    from jaxinfer.engine.output_processor import OutputProcessor
    from jaxinfer.engine.scheduler_group import SchedulerGroup

_PLACEHOLDER = 0  # a planned-ahead token until the device hands back the real one


@dataclass(frozen=True)
class InFlight:
    """A dispatched step whose outputs are not read back yet."""

    micro_batch: int
    plan: StepPlan
    inputs: StepInputs
    outputs: StepOutputs  # still on the device
    rows: tuple[int, ...]  # each planned item's row in the step (batching.plan_rows)
    # Multi-step decode: the device's count of steps run (outputs' per-row fields are stacked
    # one entry per step); None for a single step.
    steps_run: object | None = None


class StepLoop:
    """EngineCore's step machinery; EngineCore.__init__ sets the state declared here."""

    config: EngineConfig
    runner: Any  # a ModelRunner (runtime/runner.py; the engine package never imports it)
    scheduler: SchedulerGroup
    block_manager: BlockManager
    buckets: BucketTable
    vocab_size: int
    output_processor: OutputProcessor
    stats: EngineStats
    _requests: dict[str, Request]
    _by_seq: dict[int, tuple[Request, Sample]]  # the scheduler's view -> ours
    _free_slots: list[int]
    _in_flight: deque[InFlight]
    _run_ahead_enabled: bool
    _max_steps: int

    @uninterruptible
    def step(self) -> list[RequestOutput]:
        """Run one step (or, under pipeline parallelism, read back the oldest in flight and
        start the next); -> an output for each request that progressed, by its output_kind."""
        started = time.perf_counter()
        busy = {flight.micro_batch for flight in self._in_flight}
        for micro_batch, scheduler in enumerate(self.scheduler):
            if micro_batch not in busy and scheduler.has_unfinished:
                flight = self._dispatch(micro_batch)
                if flight is not None:
                    self._in_flight.append(flight)
        if not self._in_flight:
            return []
        flight = self._in_flight[0]
        ahead = self._run_ahead(flight)
        dispatched = time.perf_counter()
        outputs = self.runner.collect(flight.outputs)
        steps_run = None if flight.steps_run is None else int(flight.steps_run)
        collected = time.perf_counter()
        self._in_flight.popleft()
        if ahead is not None:
            self._in_flight.append(ahead)
        if steps_run is None:
            progressed = self._update(flight, outputs, advanced=ahead is not None)
        else:
            progressed = self._replay(flight, outputs, steps_run)
        results = []
        for request in progressed:
            output = self.output_processor.make_output(request)
            if output is not None:
                results.append(output)
            if request.finished:
                self._requests.pop(request.request_id, None)
        self.stats.prefix_cache_queries = self.block_manager.num_queried_tokens
        self.stats.prefix_cache_hits = self.block_manager.num_hit_tokens
        self.stats.device_wait_seconds += collected - dispatched
        self.stats.host_seconds += (dispatched - started) + (time.perf_counter() - collected)
        return results

    def _run_ahead(self, flight: InFlight) -> InFlight | None:
        """vLLM's async scheduling: plan and dispatch the step after `flight` while `flight`
        still runs, so the host's work hides behind the device's. -> that step, or None when it
        is not safe now (then the plain loop goes on).

        Safe in steady decoding only (`Scheduler.can_run_ahead`): each sequence gets a
        placeholder for the token `flight` is computing, the next step reads that token straight
        from `flight`'s outputs on the device (runner's token splice), and the placeholder is
        replaced at read-back. A sequence that stops on `flight`'s token wastes its row in the
        next step, whose result for it is dropped. Multi-token bad words and structured outputs
        need the real previous token on the host (for the ban, for the grammar's next mask), so
        requests with them run in the plain loop.
        """
        if not self._run_ahead_enabled or flight.plan.is_prefill or len(self._in_flight) != 1:
            return None
        if flight.steps_run is not None or (
            self._max_steps > 1 and self._can_multi_step(flight.plan)
        ):
            return None  # the next decode runs several steps in one call instead
        scheduler = self.scheduler[flight.micro_batch]
        if not scheduler.can_run_ahead():
            return None
        rows = {
            item.seq.seq_id: row
            for row, item in enumerate(flight.plan.scheduled)
            if item.samples and not item.seq.is_finished
        }
        if {seq.seq_id for seq in scheduler.running} != set(rows):
            return None
        for seq_id in rows:
            request = self._by_seq[seq_id][0]
            if any(len(ids) > 1 for ids in request.bad_words_token_ids):
                return None
            if request.samples[0].grammar is not None:
                return None
        scheduler.update(flight.plan, dict.fromkeys(rows, _PLACEHOLDER))
        self.stats.num_steps_ahead += 1
        return self._dispatch(flight.micro_batch, previous=(flight.outputs, rows))

    def _dispatch(
        self, micro_batch: int, previous: tuple[StepOutputs, dict[int, int]] | None = None
    ) -> InFlight | None:
        """Schedule micro-batch `micro_batch`'s next step and start it on the device.

        `previous`: (a step still on the device, seq_id -> its row there), whose sampled tokens
        are this step's inputs for those sequences (async scheduling)."""
        plan = self.scheduler[micro_batch].schedule()
        if plan is None:
            return None
        for seq in plan.preempted:  # no longer running: its slot is rebuilt when it runs again
            self._release_slot(self._by_seq[seq.seq_id][1])
        sampling = {}
        for item in plan.scheduled:
            request, sample = self._by_seq[item.seq.seq_id]
            if sample.slot is None:
                self._install_slot(request, sample)
            bitmask = None
            if sample.grammar is not None and item.samples:
                bitmask = self._grammar_mask(sample)
            sampling[item.seq.seq_id] = RowSampling(
                request.params, sample.seed, sample.slot, request.banned_now(sample), bitmask
            )
        num_steps = 1
        if previous is None and self._max_steps > 1 and self._can_multi_step(plan):
            num_steps = self.scheduler[micro_batch].reserve_steps(plan, self._max_steps)
        bucket = self.buckets.select(plan, self.config.block_size, lookahead=num_steps - 1)
        inputs = build_step_inputs(
            plan,
            bucket,
            self.config.block_size,
            sampling,
            padding_slot=self.runner.slot_state.padding_slot,
            vocab_size=self.vocab_size,
            lookahead=num_steps - 1,
        )
        self.runner.copy_blocks(plan.block_copies)
        rows = plan_rows(plan, bucket)
        token_source = None
        if previous is not None:
            outputs, previous_rows = previous
            index = np.full(bucket.num_tokens, -1, np.int32)
            for row, item in zip(rows, plan.scheduled):
                if item.seq.seq_id in previous_rows:
                    index[inputs.query_start_loc[row]] = previous_rows[item.seq.seq_id]
            token_source = (outputs, index)
        if num_steps > 1:
            self.stats.num_multi_step_calls += 1
            outputs, steps_run = self.runner.dispatch_multi_step(
                bucket, inputs, num_steps, self._max_steps
            )
            return InFlight(micro_batch, plan, inputs, outputs, rows, steps_run)
        outputs = self.runner.dispatch(bucket, inputs, token_source)
        if plan.num_decodes and plan.is_prefill:
            self.stats.num_unified_steps += 1
        return InFlight(micro_batch, plan, inputs, outputs, rows)

    def _can_multi_step(self, plan: StepPlan) -> bool:
        """Whether the engine's side allows several decode steps of `plan` in one call: the
        host must not need a step's token before the next one (a grammar's next mask, a
        multi-token bad word's ban). The scheduler has its own say (`reserve_steps`)."""
        if plan.is_prefill:
            return False
        for item in plan.scheduled:
            request = self._by_seq[item.seq.seq_id][0]
            if request.samples[0].grammar is not None:
                return False
            if any(len(ids) > 1 for ids in request.bad_words_token_ids):
                return False
        return True

    def _replay(self, flight: InFlight, outputs: StepOutputs, steps_run: int) -> list[Request]:
        """Record a multi-step call's `steps_run` steps one by one, as if each had been its own
        (`_update`): the first is `flight.plan`, each later one the decode of the sequences
        still running (`Scheduler.next_decode`), so tokens after a sequence's stop are dropped.
        -> the requests that progressed."""
        scheduler = self.scheduler[flight.micro_batch]
        row_of = {item.seq.seq_id: row for item, row in zip(flight.plan.scheduled, flight.rows)}
        progressed: dict[str, Request] = {}
        plan = flight.plan
        for index in range(steps_run):
            if index:
                plan = scheduler.next_decode(plan)
                if not plan.scheduled:
                    break
            rows = tuple(row_of[item.seq.seq_id] for item in plan.scheduled)
            one = dataclasses.replace(flight, plan=plan, rows=rows, steps_run=None)
            for request in self._update(one, outputs.step(index), advanced=False):
                progressed[request.request_id] = request
        return list(progressed.values())

    def _grammar_mask(self, sample: Sample) -> np.ndarray:
        """The packed mask of the sample's next token, its grammar brought to its output first
        (which also rebuilds it after a preemption)."""
        out = self.structured_outputs.allocate(1)
        sample.grammar.fill(sample.seq.output_token_ids, out, 0)
        return out[0]

    def _install_slot(self, request: Request, sample: Sample) -> None:
        sample.slot = self._free_slots.pop()
        self.runner.install_sampling_row(
            sample.slot,
            params=request.params,
            seed=sample.seed,
            prompt_token_ids=sample.seq.prompt_token_ids,
            output_token_ids=sample.seq.output_token_ids,
            eos_token_ids=sorted(self.eos_token_ids),
            banned_token_ids=request.single_token_bad_words,
        )

    def _update(self, flight: InFlight, outputs: StepOutputs, advanced: bool) -> list[Request]:
        """Record a read-back step: tokens, logprobs, stops. -> the requests that progressed.

        `advanced`: the scheduler already counted this step (with placeholder tokens) when the
        next one was planned ahead; the real tokens replace the placeholders here."""
        plan, scheduler = flight.plan, self.scheduler[flight.micro_batch]
        self.stats.num_steps += 1
        sampled: dict[int, int] = {}
        failed = self._failed_requests(flight, outputs)  # logits not finite: no real token
        for index, (row, item) in enumerate(zip(flight.rows, plan.scheduled)):
            entry = self._by_seq.get(item.seq.seq_id)
            if entry is None:  # aborted while its step was in flight
                continue
            request, sample = entry
            if request.request_id in failed:
                continue
            if index >= plan.num_decodes:  # a prefill chunk
                self.stats.prompt_tokens += item.num_new_tokens
                first = int(flight.inputs.query_start_loc[row])
                self.output_processor.record_prompt_logprobs(
                    request, item.start, item.num_new_tokens, first, outputs
                )
            if item.samples:
                sampled[item.seq.seq_id] = int(outputs.tokens[row])
                self.output_processor.record_logprobs(request, sample, outputs, row)
        for request in failed.values():
            self._end_with_error(request, flight, advanced)
        if advanced:
            grew = []
            for item in plan.scheduled:
                token = sampled.get(item.seq.seq_id)
                if token is not None and not item.seq.is_finished:
                    item.seq.set_last_token(token)
                    grew.append(item.seq)
        else:
            grew = scheduler.update(plan, sampled)
        progressed: dict[str, Request] = dict(failed)
        for seq in grew:
            request, sample = self._by_seq[seq.seq_id]
            self.stats.generation_tokens += 1
            progressed[request.request_id] = request
            reason = self.output_processor.stop_reason(request, sample)
            if reason is not None:
                scheduler.finish(seq, reason[0], stop_reason=reason[1])
                for other in request.samples:  # a parent's pending forks finish with it
                    if other.seq.is_finished:
                        self._forget(other)
        return list(progressed.values())

    def _release_slot(self, sample: Sample) -> None:
        if sample.slot is not None:
            self._free_slots.append(sample.slot)
            sample.slot = None

    def _forget(self, sample: Sample) -> None:
        """A finished or aborted sample: its slot is free, the scheduler has released its blocks."""
        self._release_slot(sample)
        self._by_seq.pop(sample.seq.seq_id, None)

    def _failed_requests(self, flight: InFlight, outputs: StepOutputs) -> dict[str, Request]:
        """Requests one of whose sampling rows came back with non-finite logits (NaN or inf):
        nothing was really sampled for them (an argmax over NaN is token 0)."""
        failed: dict[str, Request] = {}
        for row, item in zip(flight.rows, flight.plan.scheduled):
            entry = self._by_seq.get(item.seq.seq_id)
            if item.samples and entry is not None and not outputs.logits_finite[row]:
                failed[entry[0].request_id] = entry[0]
        return failed

    def _end_with_error(self, request: Request, flight: InFlight, advanced: bool) -> None:
        """End every sample of `request` with finish_reason "error" (vLLM's), keeping the tokens
        of earlier steps: its blocks and slots are free when this returns, the other requests go
        on, and `generate()` raises naming it (offline.py). A placeholder the next step was
        planned with is taken back first (`advanced`)."""
        scheduler = self.scheduler[request.micro_batch]
        planned = {item.seq.seq_id for item in flight.plan.scheduled if item.samples}
        for sample in request.samples:
            if not sample.seq.is_finished:
                if advanced and sample.seq.seq_id in planned:
                    sample.seq.drop_last_token()
                scheduler.finish(sample.seq, "error")
            self._forget(sample)
