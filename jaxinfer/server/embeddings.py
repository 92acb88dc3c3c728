"""POST /v1/embeddings on an encoder (BERT) model, and the async face of its engine.

An encoder has no step loop to share: each request is one `EncoderEngine.encode` call (its prompts
batched into the engine's buckets), run on one worker thread so the event loop never blocks on
the device and calls never overlap. `encoding_format: "base64"` (the `openai` client's default)
is the little-endian float32 bytes of each vector, as OpenAI sends them.
"""

from __future__ import annotations

import asyncio
import base64
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from jaxinfer.outputs import EmbeddingRequestOutput
from jaxinfer.pooling_params import PoolingParams
from jaxinfer.server.protocol import EmbeddingRequest, RequestError
from jaxinfer.server.responses import Embedding, EmbeddingResponse, Usage, now, random_id
from jaxinfer.server.sampling import request_error

_EMBEDDER_INDEX = re.compile(r"^prompt (\d+)")


class AsyncEncoder:
    """`LLM(...)` on an encoder model, served one call at a time off the event loop."""

    def __init__(self, llm) -> None:
        from jaxinfer.engine.encoder_engine import EncoderEngine

        engine = getattr(llm, "llm_engine", llm)
        if not isinstance(engine, EncoderEngine):
            raise TypeError("AsyncEncoder serves an encoder (embedding) model's engine")
        self.llm = llm
        self.core = engine
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="jaxinfer-encoder")

    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.core.config.max_model_len

    async def encode(
        self, prompts: list, pooling_params: PoolingParams
    ) -> list[EmbeddingRequestOutput]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._worker, lambda: self.core.encode(prompts, pooling_params, use_tqdm=False)
        )

    def shutdown(self) -> None:
        self._worker.submit(self.core.shutdown).result()
        self._worker.shutdown(wait=True)


async def create_embeddings(
    encoder: AsyncEncoder, request: EmbeddingRequest, model_name: str
) -> EmbeddingResponse:
    request.check_supported()
    inputs = request.inputs
    try:
        params = PoolingParams(normalize=request.normalize)
        outputs = await encoder.encode(inputs, params)
    except (TypeError, ValueError) as error:
        raise _input_error(error, many=len(inputs) > 1) from None
    data = []
    for index, output in enumerate(outputs):
        vector = output.outputs.embedding
        if request.encoding_format == "base64":
            raw = np.asarray(vector, dtype="<f4").tobytes()
            vector = base64.b64encode(raw).decode("ascii")
        data.append(Embedding(index=index, embedding=vector))
    prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
    return EmbeddingResponse(
        id=random_id("embd"),
        created=now(),
        model=model_name,
        data=data,
        usage=Usage.of(prompt_tokens, 0),
    )


def _input_error(error: Exception, many: bool) -> RequestError:
    """The embedder says 'prompt 3 ...', intake 'prompts[3] ...': both become `input[3]`."""
    message = str(error)
    found = _EMBEDDER_INDEX.match(message)
    if found:
        message = f"prompts[{found.group(1)}]" + message[found.end() :]
    return request_error(error.__class__(message), None, "input", many)
