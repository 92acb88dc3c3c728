"""100 concurrent streams through the server, half of them abandoned midway.

The server runs 4 sequences at a time, so most requests wait in the queue first. The 50 that
stay must each get exactly their max_tokens (ignore_eos). The 50 that leave after 3 chunks ask for
100 tokens: if leaving did not abort them the engine would decode all 100 of each (the tiny model
does that in about a second, so an idle engine at the end proves little alone); the engine's own
generated-token counter (vllm:generation_tokens_total, which counts the tokens of requests aborted
later, as vLLM's does) shows they stopped early. Right after every client is finished, /metrics
must show no request running or waiting and no KV block in use.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx

from tests.server.conftest import API_KEY, MODEL_NAME

NUM_REQUESTS = 100
KEPT_TOKENS = 12
ABANDONED_TOKENS = 100


async def _stream(client: httpx.AsyncClient, index: int) -> int | None:
    """One streamed completion; -> its token count (None for an abandoned one)."""
    leave = index % 2 == 1
    body = {
        "model": MODEL_NAME,
        "prompt": f"request {index}:",
        "max_tokens": ABANDONED_TOKENS if leave else KEPT_TOKENS,
        "ignore_eos": True,
        "temperature": 0.7,
        "seed": index,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    tokens, usage, chunks = 0, None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            chunks += 1
            if leave and chunks == 3:
                return None  # closes the connection mid-stream
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                tokens += len(choice["token_ids"])
    assert usage["completion_tokens"] == tokens
    return tokens


def _value(metrics: str, name: str) -> float:
    (value,) = re.findall(rf'^{name}\{{model_name="{MODEL_NAME}"\}} (\S+)$', metrics, re.MULTILINE)
    return float(value)


async def _run(url: str) -> tuple[list[int | None], dict[str, float]]:
    limits = httpx.Limits(max_connections=NUM_REQUESTS + 10)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=300
    ) as client:
        before = _value((await client.get("/metrics")).text, "vllm:generation_tokens_total")
        counts = await asyncio.gather(*(_stream(client, i) for i in range(NUM_REQUESTS)))
        # The last aborts run on the engine thread after the step in progress: a few steps at most.
        for _ in range(50):
            metrics = (await client.get("/metrics")).text
            load = _load(metrics)
            if not any(load.values()):
                break
            await asyncio.sleep(0.02)
        load["generated"] = _value(metrics, "vllm:generation_tokens_total") - before
    return counts, load


def test_hundred_streams_half_abandoned_free_every_block(server):
    counts, load = asyncio.run(_run(server.url))
    kept = [count for index, count in enumerate(counts) if index % 2 == 0]
    assert kept == [KEPT_TOKENS] * (NUM_REQUESTS // 2)
    assert all(count is None for index, count in enumerate(counts) if index % 2 == 1)
    # Not aborted, the abandoned half alone would add 50 x 100 tokens; aborted, a few each (the
    # chunks already in flight when the client left, and the step in progress).
    kept_total = KEPT_TOKENS * NUM_REQUESTS // 2
    abandoned = load.pop("generated") - kept_total
    assert 0 <= abandoned <= NUM_REQUESTS // 2 * ABANDONED_TOKENS // 4, abandoned
    assert load == {
        "num_requests_running": 0.0,
        "num_requests_waiting": 0.0,
        "kv_cache_usage_perc": 0.0,
    }, load


async def _abandon_plain_requests(url: str, count: int) -> tuple[int, float, dict[str, float]]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL_NAME, "prompt": "plain", "max_tokens": ABANDONED_TOKENS,
            "ignore_eos": True, "temperature": 0.7}  # fmt: skip
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        before = _value((await client.get("/metrics")).text, "vllm:generation_tokens_total")

        async def leave_early(index: int) -> bool:
            """-> whether the client gave up (and hung up) before the answer came."""
            try:
                await client.post("/v1/completions", json={**body, "seed": index}, timeout=0.3)
            except httpx.ReadTimeout:
                return True
            return False

        gave_up = sum(await asyncio.gather(*(leave_early(i) for i in range(count))))
        for _ in range(100):
            metrics = (await client.get("/metrics")).text
            load = _load(metrics)
            if not any(load.values()):
                break
            await asyncio.sleep(0.02)
    return gave_up, _value(metrics, "vllm:generation_tokens_total") - before, load


def _load(metrics: str) -> dict[str, float]:
    return {
        name: _value(metrics, f"vllm:{name}")
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    }


def test_abandoned_plain_requests_are_aborted(server):
    """A non-streamed request sends nothing until it is done, so only watching the connection
    can tell that its client left. 24 requests for 100 tokens (6 waves of 4) are given up after
    0.3 s: on a fast machine the first wave may be done by then, the rest cannot be, and those
    must not run to their 100 tokens."""
    count = 24
    gave_up, generated, load = asyncio.run(_abandon_plain_requests(server.url, count))
    assert gave_up >= count // 2
    answered = count - gave_up
    abandoned_tokens = generated - answered * ABANDONED_TOKENS
    assert 0 <= abandoned_tokens < gave_up * ABANDONED_TOKENS / 2, (gave_up, generated)
    assert not any(load.values()), load
