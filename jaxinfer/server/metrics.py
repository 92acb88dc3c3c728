"""GET /metrics: Prometheus text through `prometheus_client`, under vLLM's metric names.

So that dashboards and alerts written for `vllm serve` read a jaxinfer server unchanged, every
metric that has a vLLM counterpart carries its name and its `model_name` label:

| metric | kind | source |
|---|---|---|
| vllm:num_requests_running / vllm:num_requests_waiting | gauge | the scheduler, at scrape time (sequences: vLLM V1 also fans n > 1 out into one each) |
| vllm:kv_cache_usage_perc (and the older vllm:gpu_cache_usage_perc) | gauge | used / usable KV blocks, 0..1 (cached-but-free prefix blocks count as free, as in vLLM) |
| vllm:prefix_cache_queries_total / vllm:prefix_cache_hits_total | counter | prompt tokens looked up in / served from the prefix cache (EngineStats) |
| vllm:prompt_tokens_total | counter | per request, its whole prompt once its first token is out (as vLLM V1) |
| vllm:generation_tokens_total | counter | tokens the engine generated (EngineStats), those of requests aborted later included (as vLLM V1) |
| vllm:time_to_first_token_seconds | histogram | arrival -> the first token handed to the server |
| vllm:inter_token_latency_seconds (and vllm:time_per_output_token_seconds) | histogram | between consecutive outputs of a request, per token |
| vllm:e2e_request_latency_seconds | histogram | arrival -> finished |
| vllm:request_success_total{finished_reason} | counter | finished samples (an aborted request is not a success) |

Each app has its own CollectorRegistry (not the process-global one), so tests can build several.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jaxinfer.engine.async_engine import EngineLoad
from jaxinfer.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket edges, so histograms from both servers line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class ServerMetrics:
    """The registry behind /metrics. `load`: the engine's current load (None: an encoder model,
    which has no queues or KV cache)."""

    def __init__(self, model_name: str, load: Callable[[], EngineLoad] | None) -> None:
        # No `_created` timestamp series beside every counter and histogram (vLLM turns them off
        # too; the switch is process-wide, and a server process has one set of metrics).
        disable_created_metrics()
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_LoadCollector(model_name, load))
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(
                model_name
            )

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of started requests.")
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", ITL_BUCKETS
        )
        self.tpot = histogram(
            "vllm:time_per_output_token_seconds",
            "Time per output token in seconds (vLLM's older name of the inter-token latency).",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency in seconds.",
            E2E_BUCKETS,
        )
        self._success = Counter(
            "vllm:request_success",
            "Finished requests, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def track(
        self, outputs: AsyncIterator[RequestOutput], arrived: float
    ) -> AsyncIterator[RequestOutput]:
        """Pass a request's (DELTA) outputs through, timing them from `arrived`
        (time.perf_counter() when the server accepted the request)."""
        last = arrived
        started = False
        async for output in outputs:
            now = time.perf_counter()
            steps = max((len(c.token_ids) for c in output.outputs), default=0)  # per sample
            if steps:
                if not started:
                    started = True
                    self.ttft.observe(now - arrived)
                    self.prompt_tokens.inc(len(output.prompt_token_ids))
                else:
                    gap = (now - last) / steps
                    for _ in range(steps):
                        self.itl.observe(gap)
                        self.tpot.observe(gap)
                last = now
            for completion in output.outputs:  # each sample's last delta has its reason
                if completion.finish_reason is not None:
                    self._success.labels(self.model_name, completion.finish_reason).inc()
            if output.finished:
                self.e2e.observe(now - arrived)
            yield output


class _LoadCollector(Collector):
    """Gauges and engine counters read when Prometheus scrapes, not kept up to date by hand."""

    def __init__(self, model_name: str, load: Callable[[], EngineLoad] | None) -> None:
        self.model_name = model_name
        self.load = load

    def collect(self) -> Iterable[Metric]:
        load = (
            self.load()
            if self.load is not None
            else EngineLoad(num_running=0, num_waiting=0, num_used_blocks=0, num_usable_blocks=0)
        )
        values = (
            ("vllm:num_requests_running", "Sequences running on the engine.", load.num_running),
            ("vllm:num_requests_waiting", "Sequences waiting to run.", load.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 0..1.", load.kv_cache_usage),
            (
                "vllm:gpu_cache_usage_perc",
                "KV-cache usage, 0..1 (older name).",
                load.kv_cache_usage,
            ),
        )
        for name, doc, value in values:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self.model_name], value)
            yield gauge
        counters = (
            ("vllm:generation_tokens", "Tokens generated by the engine.", load.generation_tokens),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             load.prefix_cache_queries),
            ("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
             load.prefix_cache_hits),
        )  # fmt: skip
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self.model_name], value)
            yield counter
