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
from concurrent.futures import ThreadPoolExecutor

from jaxinfer.engine import intake
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams


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

    async def generate(
        self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as tokens arrive (by its `output_kind`; CUMULATIVE by
        default, as vLLM). Bad input raises here, before the request is queued."""
        if self._error is not None:
            raise RuntimeError("the engine loop failed; build a new AsyncEngine") from self._error
        params = sampling_params or self.core.default_sampling_params
        prepared = intake.prepare_request(
            prompt, params, 0, tokenizer=self.core.tokenizer, limits=self.core.limits
        )
        request_id = await self._call(self._add, request_id, prepared)
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
