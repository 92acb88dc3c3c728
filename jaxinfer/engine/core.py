"""EngineCore: requests in, one step at a time, RequestOutputs out (vLLM's `LLMEngine` API).

    core.add_request("a", "The capital of France is", SamplingParams(max_tokens=8))
    while core.has_unfinished_requests():
        for output in core.step():      # the requests that progressed in this step
            ...

`generate()`, `chat()`, streaming and the async engine are loops over these calls. The core is
host code: it owns the scheduler(s) and block manager, turns each StepPlan into padded
`StepInputs` (the seam) and hands them to the runner it was given, which is the only thing here
that touches a device. Under pipeline parallelism there is one scheduler per micro-batch and one
step of each in flight: `step()` reads back the oldest, updates its micro-batch, and dispatches that
micro-batch's next step at once, so the other micro-batches keep the later stages busy.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from jaxinfer.config import EngineConfig
from jaxinfer.engine import intake, offline
from jaxinfer.engine.batching import BucketTable, RowSampling, build_step_inputs, plan_rows
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.output_processor import OutputProcessor
from jaxinfer.engine.request import Request, Sample
from jaxinfer.engine.scheduler import Scheduler, StepPlan
from jaxinfer.engine.scheduler_group import SchedulerGroup
from jaxinfer.engine.sequence import Sequence
from jaxinfer.engine.stop_strings import StopStringMatcher

if TYPE_CHECKING:
    from jaxinfer.engine.structured_output import StructuredOutputs
from jaxinfer.interrupts import uninterruptible
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.seam import StepInputs, StepOutputs
from jaxinfer.seeds import request_seed, row_seed

_PLACEHOLDER = 0  # a planned-ahead token until the device hands back the real one


@dataclass(frozen=True)
class _InFlight:
    """A dispatched step whose outputs are not read back yet."""

    micro_batch: int
    plan: StepPlan
    inputs: StepInputs
    outputs: StepOutputs  # still on the device
    rows: tuple[int, ...]  # each planned item's row in the step (batching.plan_rows)
    # Multi-step decode: the device's count of steps run (outputs' per-row fields are stacked
    # one entry per step); None for a single step.
    steps_run: object | None = None


@dataclass
class EngineStats:
    """Counters since the engine started (the progress bar and benchmarks read them)."""

    num_steps: int = 0
    num_steps_ahead: int = 0  # steps dispatched before their predecessor was read back
    prompt_tokens: int = 0  # tokens computed by prefill (recomputed ones included)
    generation_tokens: int = 0
    # Where a step's wall time goes: host work (schedule, pad, dispatch, update, outputs) and
    # waiting for the device to hand the step's tokens back.
    host_seconds: float = 0.0
    device_wait_seconds: float = 0.0
    # Prefix cache, in tokens as vLLM counts them: looked up at admission, and served from cache.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_unified_steps: int = 0  # steps that carried decodes and prefill chunks together
    num_multi_step_calls: int = 0  # calls that ran several decode steps (num_scheduler_steps)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )


class EngineCore:
    """The request-level engine. Built by `jaxinfer.llm.build_engine`, reachable as
    `LLM(...).llm_engine`. `runner` is a ModelRunner (runtime/runner.py): compile, dispatch,
    collect, copy_blocks, install_sampling_row."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        runner,
        tokenizer,
        eos_token_ids: set[int],
        default_sampling_params: SamplingParams,
        num_blocks: int,
        vocab_size: int,
        model=None,
        mesh=None,
    ) -> None:
        self.config = config
        self.runner = runner
        self.model = model  # LoadedModel: its description (model_config, hf_config) and weights
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.default_sampling_params = default_sampling_params
        self.vocab_size = vocab_size
        micro_batches = config.resolved_micro_batches
        self.block_manager = BlockManager(
            num_blocks, config.block_size, enable_caching=config.enable_prefix_caching
        )
        self.scheduler = SchedulerGroup(
            [
                Scheduler(
                    self.block_manager,
                    max_num_seqs=config.max_num_seqs,
                    max_num_batched_tokens=config.max_num_batched_tokens,
                    max_prefill_seqs=config.max_prefill_seqs,
                    max_model_len=config.max_model_len,
                    unified=config.unified_steps,
                )
                for _ in range(micro_batches)
            ]
        )
        self.buckets = BucketTable(
            seq_buckets=config.resolved_seq_buckets(),
            token_buckets=config.resolved_token_buckets(),
            block_buckets=config.resolved_block_buckets(),
            max_prefill_seqs=config.max_prefill_seqs,
            unified=config.unified_steps,
        )
        self.output_processor = OutputProcessor(tokenizer, eos_token_ids, vocab_size)
        self.limits = intake.IntakeLimits(
            max_model_len=config.max_model_len,
            vocab_size=vocab_size,
            max_logprobs=config.max_logprobs,
            max_num_seqs=config.max_num_seqs,
            block_size=config.block_size,
            num_usable_blocks=self.block_manager.num_usable_blocks,
            eos_token_ids=frozenset(eos_token_ids),
        )
        self.stats = EngineStats()
        self._requests: dict[str, Request] = {}
        self._by_seq: dict[int, tuple[Request, Sample]] = {}  # the scheduler's view -> ours
        self._free_slots = list(range(config.max_num_seqs * micro_batches))
        self._in_flight: deque[_InFlight] = deque()
        # Async scheduling (see _run_ahead): one device, one scheduler; stages and meshes would
        # need the spliced tokens placed on their devices first.
        self._run_ahead_enabled = (
            config.async_scheduling and micro_batches == 1 and mesh is None and runner is not None
        )
        # Multi-step decode (runtime/multi_step.py): one scheduler and one pipeline stage (a
        # mesh of any tensor-parallel size is fine: the loop compiles like the single step).
        self._max_steps = (
            config.num_scheduler_steps
            if micro_batches == 1 and config.pipeline_parallel_size == 1 and runner is not None
            else 1
        )
        # Structured outputs: llguidance's tokenizer and compiled grammars, built on first use.
        self._structured: StructuredOutputs | None = None
        self._num_requests = 0  # requests ever added: an unseeded request's seed derives from it
        self._num_seqs = 0

    @property
    def eos_token_ids(self) -> set[int]:
        """Tokens that end a sample (unless ignore_eos): the checkpoint's eos ids."""
        return self.output_processor.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, token_ids) -> None:
        self.output_processor.eos_token_ids = set(token_ids)

    # ---- vLLM's LLMEngine API -----------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue one request; it runs from the next `step()`. Bad input raises here, before
        anything is queued."""
        params = self.default_sampling_params if params is None else params
        prepared = intake.prepare_request(
            prompt, params, 0, tokenizer=self.tokenizer, limits=self.limits
        )
        self.add_prepared(str(request_id), prepared, arrival_time)

    @uninterruptible
    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Drop requests (unknown or finished ids are ignored): their blocks and slots are free
        when this returns, and they produce no further output."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            request = self._requests.pop(str(request_id), None)
            if request is None:
                continue
            for sample in request.samples:
                self.scheduler[request.micro_batch].abort(sample.seq.seq_id)
                self._forget(sample)

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

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def model_config(self) -> EngineConfig:
        """vLLM's `llm_engine.model_config`, which clients read `max_model_len` from (lm-eval's
        vllm backend does): here the engine config, whose `max_model_len` is already resolved
        against the model, and which also carries vLLM's `model`, `tokenizer`, `seed`, `revision`."""
        return self.config

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (vLLM's name); False, changing nothing, while
        requests still hold blocks."""
        return self.block_manager.reset_prefix_cache()

    # ---- what the offline API builds on -------------------------------------------------------

    @uninterruptible
    def add_prepared(
        self, request_id: str, prepared: intake.PreparedRequest, arrival_time: float | None = None
    ) -> Request:
        """Queue an already validated request (see `intake.prepare_requests`)."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use by a running request")
        params = prepared.params
        token_ids = prepared.prompt_token_ids
        index = self._num_requests
        room = self.config.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seed = params.seed if params.seed is not None else request_seed(self.config.seed, index)
        request = Request(
            request_id=request_id,
            prompt=prepared.prompt,
            prompt_token_ids=token_ids,
            params=params,
            arrival_time=time.time() if arrival_time is None else arrival_time,
            seed=seed,
            bad_words_token_ids=prepared.bad_words_token_ids,
        )
        for i in range(params.n):
            seq = Sequence(
                seq_id=self._num_seqs + i,
                prompt_token_ids=token_ids,
                max_tokens=max_tokens,
                # vLLM computes every prompt position whose logprobs were asked for.
                reuse_cached_prefix=params.prompt_logprobs is None,
            )
            matcher = None
            if params.stop:
                matcher = StopStringMatcher(
                    self.tokenizer,
                    params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                    skip_special_tokens=params.skip_special_tokens,
                )
            grammar = None
            if prepared.grammar is not None:
                grammar = self.structured_outputs.matcher(prepared.grammar)
            request.samples.append(
                Sample(
                    index=i,
                    seed=row_seed(seed, i),
                    seq=seq,
                    stop_matcher=matcher,
                    grammar=grammar,
                )
            )
        seqs = [sample.seq for sample in request.samples]
        request.micro_batch = self.scheduler.add(seqs[0], seqs[1:])  # may raise: nothing kept
        self._num_requests += 1
        self._num_seqs += params.n
        self._requests[request_id] = request
        for sample in request.samples:
            self._by_seq[sample.seq.seq_id] = (request, sample)
        return request

    def generate_prepared(
        self, prepared: list[intake.PreparedRequest], use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """`LLM.generate` after intake: run validated requests to completion, in input order."""
        return offline.generate(self, prepared, use_tqdm)

    def check_grammars(self, prepared: list[intake.PreparedRequest], first_index: int = 0) -> None:
        """Refuse a structured-output grammar the tokenizer cannot serve (a token id past the
        vocabulary, a special token it lacks), naming `prompts[i]`, before any request is queued:
        intake compiles each grammar without the tokenizer, which alone would let it fail at add
        time, after earlier prompts of the call were queued."""
        for offset, request in enumerate(prepared):
            if request.grammar is not None:
                kind = request.params.structured_outputs.kind
                where = f"prompts[{first_index + offset}]"
                self.structured_outputs.check(request.grammar, kind, where)

    @property
    def structured_outputs(self) -> StructuredOutputs:
        """llguidance's view of the tokenizer and the compiled grammars (built on first use)."""
        if self._structured is None:
            from jaxinfer.engine.structured_output import StructuredOutputs

            self._structured = StructuredOutputs(
                self.tokenizer, self.eos_token_ids, self.vocab_size
            )
        return self._structured

    @property
    def num_compilations(self) -> int:
        return self.runner.num_compilations

    def shutdown(self) -> None:
        """Abort everything and drop the device state (weights, KV cache, executables)."""
        self.abort_request(list(self._requests))
        self._in_flight.clear()
        if self.runner is not None:
            self.runner.shutdown()
            self.runner = None
        self.model = None

    def next_request_id(self) -> str:
        """The id `generate()` gives its next request: the count of requests so far, as vLLM."""
        return str(self._num_requests)

    def warmup(self) -> int:
        """Compile every bucket now, so that no request mix compiles later. Returns the count."""
        for bucket in self.buckets.all_buckets():
            self.runner.compile(bucket)
        self.runner.compile_block_copier()
        if self._max_steps > 1:
            for bucket in self.buckets.all_buckets():
                if not bucket.is_prefill:
                    self.runner.compile_multi_step(bucket, self._max_steps)
        if self._run_ahead_enabled:  # decode steps feed decode steps of any width
            for num_seqs in self.buckets.seq_buckets:
                for previous in self.buckets.seq_buckets:
                    self.runner.compile_token_splice(num_seqs, previous)
        return self.runner.num_compilations

    # ---- one step -----------------------------------------------------------------------------

    def _run_ahead(self, flight: _InFlight) -> _InFlight | None:
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
    ) -> _InFlight | None:
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
            return _InFlight(micro_batch, plan, inputs, outputs, rows, steps_run)
        outputs = self.runner.dispatch(bucket, inputs, token_source)
        if plan.num_decodes and plan.is_prefill:
            self.stats.num_unified_steps += 1
        return _InFlight(micro_batch, plan, inputs, outputs, rows)

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

    def _replay(self, flight: _InFlight, outputs: StepOutputs, steps_run: int) -> list[Request]:
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

    def _update(self, flight: _InFlight, outputs: StepOutputs, advanced: bool) -> list[Request]:
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

    def _failed_requests(self, flight: _InFlight, outputs: StepOutputs) -> dict[str, Request]:
        """Requests one of whose sampling rows came back with non-finite logits (NaN or inf):
        nothing was really sampled for them (an argmax over NaN is token 0)."""
        failed: dict[str, Request] = {}
        for row, item in zip(flight.rows, flight.plan.scheduled):
            entry = self._by_seq.get(item.seq.seq_id)
            if item.samples and entry is not None and not outputs.logits_finite[row]:
                failed[entry[0].request_id] = entry[0]
        return failed

    def _end_with_error(self, request: Request, flight: _InFlight, advanced: bool) -> None:
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
