"""EngineCore: requests in, one step at a time, RequestOutputs out (vLLM's `LLMEngine` API).

    core.add_request("a", "The capital of France is", SamplingParams(max_tokens=8))
    while core.has_unfinished_requests():
        for output in core.step():      # the requests that progressed in this step
            ...

`generate()`, `chat()`, streaming and the async engine are loops over these calls. The core is
host code: it owns the scheduler(s) and block manager, turns each StepPlan into padded
`StepInputs` (the seam) and hands them to the runner it was given, which is the only thing here
that touches a device. How a step runs (dispatch, async scheduling, multi-step replay, the update
of each request) is engine/step_loop.py, EngineCore's base class.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxinfer.config import EngineConfig
from jaxinfer.engine import intake, offline
from jaxinfer.engine.batching import BucketTable
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.output_processor import OutputProcessor
from jaxinfer.engine.request import Request, Sample
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.scheduler_group import SchedulerGroup
from jaxinfer.engine.sequence import Sequence
from jaxinfer.engine.step_loop import InFlight, StepLoop
from jaxinfer.engine.stop_strings import StopStringMatcher

if TYPE_CHECKING:
    from jaxinfer.engine.structured_output import StructuredOutputs
from jaxinfer.interrupts import uninterruptible
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.seeds import request_seed, row_seed


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


class EngineCore(StepLoop):
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
        self._in_flight: deque[InFlight] = deque()
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
        """Compile every bucket now, so that no request mix compiles later, on a few threads
        (runtime/program_cache.py: the compilations overlap). Returns the count."""
        runner, buckets = self.runner, self.buckets.all_buckets()
        jobs = [functools.partial(runner.compile, bucket) for bucket in buckets]
        jobs.append(runner.compile_block_copier)
        if self._max_steps > 1:
            jobs += [
                functools.partial(runner.compile_multi_step, bucket, self._max_steps)
                for bucket in buckets
                if not bucket.is_prefill
            ]
        if self._run_ahead_enabled:  # decode steps feed decode steps of any width
            widths = self.buckets.seq_buckets
            jobs += [
                functools.partial(runner.compile_token_splice, num_seqs, previous)
                for num_seqs in widths
                for previous in widths
            ]
        runner.compile_concurrently(jobs)
        return runner.num_compilations
