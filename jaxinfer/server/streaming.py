"""Server-Sent Events in OpenAI's format, and aborting a request the moment its client leaves.

A stream is `data: {chunk JSON}\\n\\n` events ending with `data: [DONE]\\n\\n`. A client that
disconnects must free its KV blocks at once, not when its next token fails to send (a queued
request sends nothing until its prefill): both the streaming and the plain responses watch the
connection for `http.disconnect` and cancel the work, and cancelling the engine's async generator
aborts the request (AsyncEngine.generate's `finally`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
logger = logging.getLogger("jaxinfer.server")
DONE = "data: [DONE]\n\n"


def sse(chunk: BaseModel) -> str:
    """One event: the chunk's JSON (fields left as None are sent as null, as OpenAI's are)."""
    return f"data: {chunk.model_dump_json()}\n\n"


def error_event(error: Exception) -> str:
    """A stream that fails after its 200 header can only say so in an event (as vLLM does)."""
    logger.error("stream failed: %r", error, exc_info=error)
    body = {
        "error": {
            "message": f"internal server error ({type(error).__name__})",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }
    return f"data: {json.dumps(body)}\n\n"


class EventStream(StreamingResponse):
    """A `text/event-stream` response that stops (cancelling its iterator) on a disconnect.

    Starlette watches for the disconnect only under ASGI < 2.4; under 2.4 (uvicorn) it notices a
    gone client when a write fails, which for a queued request is its first token."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the client left while a chunk was being written
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()
        # Cancelled while a chunk was being sent, the iterator sits at a `yield`: close it now
        # (its requests abort here), not whenever the garbage collector gets to it.
        close = getattr(self.body_iterator, "aclose", None)
        if close is not None:
            await close()


class ClientGone(Exception):
    """The client disconnected before its (non-streamed) response was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (aborting its requests) and raise
    ClientGone. vLLM's `with_cancellation` does the same for its non-streaming endpoints."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index of the stream, item) from several async iterators as items come; closing this
    closes them all (so every request of a multi-prompt completion is aborted together)."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await _close(streams[0])
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    finished = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as error:  # noqa: BLE001 (re-raised by the consumer below)
            await queue.put((index, error))
        else:
            await queue.put((index, finished))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await _close(stream)


async def _close(stream: AsyncIterator) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
