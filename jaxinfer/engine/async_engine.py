"""AsyncEngine: many concurrent async generators over one EngineCore (vLLM's `AsyncLLM` shape).

    engine = AsyncEngine(LLM(model=...))
    async for output in engine.generate(prompt, SamplingParams(...), request_id="a"):
        print(output.outputs[0].text, end="")    # DELTA: the new text of each step

One background task steps the core while any request is unfinished; every generator gets its own
queue of outputs, so concurrent requests share the same batches. The core is plain Python and not
thread-safe, so every call into it (add_request, step, abort_request) runs on one worker thread,
in order; the event loop only awaits them and never blocks on a device step. Leaving a generator
early (break, cancellation, an exception in the consumer) aborts its request on that thread right
after the step in progress, which frees its KV blocks and sampling slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from jaxinfer.engine import intake, offline
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams


@dataclass(frozen=True, kw_only=True)
class EngineLoad:
    """What the engine holds at one moment (the server's /metrics gauges read it)."""

    num_running: int  # sequences being decoded or prefilled (n > 1: one per sample)
    num_waiting: int  # sequences queued for their first (or, after preemption, next) prefill
    num_used_blocks: int
    num_usable_blocks: int
    # Counters since the engine started: tokens generated (requests aborted later included),
    # and, with prefix caching, prompt tokens looked up and found cached.
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of KV blocks in use, 0..1 (vLLM's kv_cache_usage_perc)."""
        return self.num_used_blocks / max(1, self.num_usable_blocks)


class AsyncEngine:
    def __init__(self, llm) -> None:
        """`llm`: an `LLM` on a generative model with data_parallel_size 1 (its `llm_engine`)."""
        from jaxinfer.engine.core import EngineCore

        core = getattr(llm, "llm_engine", llm)
        if not isinstance(core, EngineCore):
            raise ValueError(
                "AsyncEngine serves one generative engine replica (data_parallel_size 1)"
            )
        self.llm = llm
        self.core = core
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="jaxinfer-engine")
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def errored(self) -> bool:
        """The step loop failed (vLLM's `AsyncLLM.errored`): no request can run any more."""
        return self._error is not None

    @property
    def limits(self) -> intake.IntakeLimits:
        return self.core.limits

    def prepare(
        self, prompt, sampling_params: SamplingParams | None = None, index: int = 0
    ) -> intake.PreparedRequest:
        """Validate and encode one prompt (`prompts[index]` in messages) without queuing it, so
        that a caller with several prompts can refuse them all before any runs."""
        params = sampling_params or self.core.default_sampling_params
        prepared = intake.prepare_request(
            prompt, params, index, tokenizer=self.core.tokenizer, limits=self.core.limits
        )
        self.core.check_grammars([prepared], index)  # before anything is queued
        return prepared

    def load(self) -> EngineLoad:
        """A snapshot of the queues and the KV cache. Read from the event loop while the worker
        steps: each number is one attribute read, so it may be a step old, never torn."""
        core = self.core
        stats = core.stats
        blocks = core.block_manager
        return EngineLoad(
            num_running=core.scheduler.num_running,
            num_waiting=core.scheduler.num_waiting,
            num_used_blocks=blocks.num_usable_blocks - blocks.num_free_blocks,
            num_usable_blocks=blocks.num_usable_blocks,
            generation_tokens=stats.generation_tokens,
            prefix_cache_queries=getattr(stats, "prefix_cache_queries", 0),
            prefix_cache_hits=getattr(stats, "prefix_cache_hits", 0),
        )

    async def generate(
        self,
        prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as tokens arrive (by its `output_kind`; CUMULATIVE by
        default, as vLLM). Bad input raises here, before the request is queued. `prompt` may be
        a `prepare()`d request (its own params then apply)."""
        if self._error is not None:
            raise RuntimeError("the engine loop failed; build a new AsyncEngine") from self._error
        if isinstance(prompt, intake.PreparedRequest):
            prepared = prompt
        else:
            prepared = self.prepare(prompt, sampling_params)
        added = self._worker.submit(self._add, request_id, prepared)
        try:
            request_id = await asyncio.wrap_future(added)
        except asyncio.CancelledError:
            # Cancelled while the worker was adding it: abort it as soon as it is in.
            added.add_done_callback(self._abort_added)
            raise
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._ensure_loop()
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine loop failed") from item
                finished = item.finished
                # Non-finite logits ended it (finish_reason "error"): raise as generate() does;
                # the server answers 500, as vLLM's does for such a request.
                offline.raise_if_failed(item, 0)
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # left early: free its blocks right after the step in progress
                self._worker.submit(self.core.abort_request, request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request; its generator ends without a final output."""
        await self._call(self.core.abort_request, request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(RequestOutput(request_id, None, [], None, outputs=[], finished=True))

    def shutdown(self) -> None:
        """Stop the loop, abort everything and free the device memory."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._worker.submit(self.core.shutdown).result()
        self._worker.shutdown(wait=True)

    # ---- the loop -----------------------------------------------------------------------------

    def _abort_added(self, added: Future) -> None:
        if not added.cancelled() and added.exception() is None:
            self._worker.submit(self.core.abort_request, added.result())

    def _add(self, request_id: str | None, prepared: intake.PreparedRequest) -> str:
        if request_id is None:
            request_id = self.core.next_request_id()
        self.core.add_prepared(str(request_id), prepared)
        return str(request_id)

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Step while anything is unfinished; sleep on `_wake` otherwise."""
        try:
            while True:
                if not self.core.has_unfinished_requests():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                for output in await self._call(self.core.step):
                    queue = self._queues.get(output.request_id)
                    if queue is not None:
                        queue.put_nowait(output)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a failed step: every waiting generator hears of it
            self._error = error
            for queue in self._queues.values():
                queue.put_nowait(error)
