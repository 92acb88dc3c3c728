"""`build_app`: the FastAPI application of `jaxinfer serve` (vLLM's OpenAI-compatible routes).

    app = build_app(AsyncEngine(LLM(model=PATH)), served_model_name="tiny", api_key=None)
    uvicorn.run(app)        # what `jaxinfer serve` does, with signals and a grace period

Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings, /tokenize,
/detokenize, /health, /version, /metrics. With an API key, the /v1 routes need
`Authorization: Bearer KEY` (401 otherwise); /health, /metrics, /version and the tokenizer routes
stay open, as in vLLM, for load balancers and scrapers.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

import jaxinfer
from jaxinfer.engine.async_engine import AsyncEngine
from jaxinfer.server.chat import create_chat_completion, render
from jaxinfer.server.completions import create_completion
from jaxinfer.server.context import Served
from jaxinfer.server.embeddings import AsyncEncoder, create_embeddings
from jaxinfer.server.errors import install_error_handlers
from jaxinfer.server.metrics import CONTENT_TYPE, ServerMetrics
from jaxinfer.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RequestError,
    TokenizeRequest,
)
from jaxinfer.server.responses import ModelCard, ModelList, now
from jaxinfer.server.sampling import server_defaults
from jaxinfer.server.streaming import ClientGone


def build_app(
    engine: AsyncEngine | AsyncEncoder,
    served_model_name: str,
    api_key: str | None = None,
    *,
    model_root: str | None = None,
    sampling_defaults: Mapping[str, Any] | None = None,
    shutdown_engine: bool = False,
) -> FastAPI:
    """The app over one engine. `sampling_defaults`: a config file's `sampling:` (its
    temperature, top_p, ... fill in what a request leaves out); `shutdown_engine`: free the
    engine when the app's lifespan ends (the server owns it)."""
    load = engine.load if isinstance(engine, AsyncEngine) else None
    defaults = {}
    if isinstance(engine, AsyncEngine):
        defaults = server_defaults(engine.core.default_sampling_params, sampling_defaults or {})
    served = Served(
        engine=engine,
        model_name=served_model_name,
        root=model_root or served_model_name,
        metrics=ServerMetrics(served_model_name, load),
        sampling_defaults=defaults,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if shutdown_engine:
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="jaxinfer", version=jaxinfer.__version__, lifespan=lifespan)
    app.state.served = served
    install_error_handlers(app)
    app.add_exception_handler(ClientGone, _client_gone)
    app.include_router(_open_routes(served))
    app.include_router(_v1_routes(served), dependencies=[Depends(_key_check(api_key))])
    return app


def _key_check(api_key: str | None):
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "Unauthorized: a valid 'Authorization: Bearer KEY' is needed")

    return check


def _v1_routes(served: Served) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models() -> ModelList:
        card = ModelCard(
            id=served.model_name, created=now(), root=served.root,
            max_model_len=served.max_model_len,
        )  # fmt: skip
        return ModelList(data=[card])

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(served, body, request)

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(served, body, request)

    @router.post("/embeddings")
    async def embeddings(body: EmbeddingRequest) -> JSONResponse:
        served.check_model(body.model)
        response = await create_embeddings(served.encoder(), body, served.model_name)
        return JSONResponse(response.model_dump(mode="json"))

    return router


def _open_routes(served: Served) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        failed = getattr(served.engine, "errored", False)  # an encoder has no loop to fail
        return Response(status_code=503 if failed else 200)

    @router.get("/version")
    async def version() -> dict:
        return {"version": jaxinfer.__version__}

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(served.metrics.render(), media_type=CONTENT_TYPE)

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        served.check_model(body.model)
        body.check_supported()
        tokenizer = served.tokenizer
        if body.messages is not None:
            tokens = render(served, body)["prompt_token_ids"]
        else:
            tokens = list(tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return {
            "count": len(tokens),
            "max_model_len": served.max_model_len,
            "tokens": tokens,
            "token_strs": strs,
        }

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        served.check_model(body.model)
        vocab = len(served.tokenizer)
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise RequestError(
                f"tokens: ids {bad[:5]} are outside the tokenizer's vocabulary [0, {vocab})",
                "tokens",
            )
        return {"prompt": served.tokenizer.decode(body.tokens)}

    return router


async def _client_gone(request: Request, error: ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
