"""What every endpoint needs: the engine, the served model's name, defaults and metrics.

One model per server, as `vllm serve`: a generative model is served through an AsyncEngine
(completions, chat), an encoder model through an AsyncEncoder (embeddings); each endpoint asks for
the kind it needs and answers 400 naming `model` when the server holds the other kind.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from jaxinfer.engine.async_engine import AsyncEngine
from jaxinfer.engine.intake import PreparedRequest
from jaxinfer.outputs import RequestOutput
from jaxinfer.server.embeddings import AsyncEncoder
from jaxinfer.server.errors import ModelNotFound
from jaxinfer.server.metrics import ServerMetrics
from jaxinfer.server.protocol import RequestError


@dataclass(frozen=True, kw_only=True)
class Served:
    engine: AsyncEngine | AsyncEncoder
    model_name: str
    root: str  # the checkpoint the name stands for (/v1/models' `root`)
    metrics: ServerMetrics
    sampling_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        if isinstance(self.engine, AsyncEncoder):
            return self.engine.max_model_len
        return self.engine.limits.max_model_len

    def check_model(self, requested: str | None) -> None:
        """None means the served model (vLLM); any other name is a 404, as OpenAI and vLLM."""
        if requested is not None and requested != self.model_name:
            raise ModelNotFound(requested, self.model_name)

    def generative(self, api: str) -> AsyncEngine:
        if not isinstance(self.engine, AsyncEngine):
            raise RequestError(
                f"model: `{self.model_name}` is an embedding (encoder) model; the {api} API needs "
                "a generative one (it serves /v1/embeddings)",
                "model",
            )
        return self.engine

    def encoder(self) -> AsyncEncoder:
        if not isinstance(self.engine, AsyncEncoder):
            raise RequestError(
                f"model: `{self.model_name}` is a generative model; the Embeddings API needs an "
                "embedding (encoder) model such as BERT",
                "model",
            )
        return self.engine

    def start(
        self, prepared: list[PreparedRequest], request_id: str
    ) -> list[AsyncIterator[RequestOutput]]:
        """One timed output stream per prepared prompt; nothing runs until they are iterated."""
        engine = self.generative("Completions")
        arrived = time.perf_counter()
        ids = [request_id]
        if len(prepared) > 1:
            ids = [f"{request_id}-{i}" for i in range(len(prepared))]
        return [
            self.metrics.track(engine.generate(p, request_id=rid), arrived)
            for p, rid in zip(prepared, ids, strict=True)
        ]
