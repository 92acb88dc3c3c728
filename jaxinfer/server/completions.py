"""POST /v1/completions: text, texts, token ids or token-id lists in; OpenAI's completion out.

Every prompt is validated (the engine's intake: types, lengths against max_model_len, sampling
fields against the model) before any is queued, so one bad prompt of a list costs nothing and
answers 400 naming `prompt[i]`. Each prompt then runs as its own engine request, all at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxinfer.engine.async_engine import AsyncEngine
from jaxinfer.engine.intake import PreparedRequest
from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.server.context import Served
from jaxinfer.server.gather import ChoiceSoFar, PromptSoFar, gather
from jaxinfer.server.logprobs import TokenNamer, completion_logprobs, prompt_logprobs_json
from jaxinfer.server.protocol import CompletionRequest, RequestError
from jaxinfer.server.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
    now,
    random_id,
)
from jaxinfer.server.sampling import completion_params, request_error
from jaxinfer.server.streaming import (
    DONE,
    EventStream,
    error_event,
    merge,
    sse,
    unless_disconnected,
)


async def create_completion(served: Served, request: CompletionRequest, raw: Request) -> Response:
    served.check_model(request.model)
    engine = served.generative("Completions")
    request.check_supported()
    if request.prompt is None:
        raise RequestError("prompt is required", "prompt")
    params = completion_params(request, served.sampling_defaults)
    prompts = request.prompts
    prepared = [
        _prepare(engine, prompt, params, i, request, many=len(prompts) > 1)
        for i, prompt in enumerate(prompts)
    ]
    request_id = random_id("cmpl")
    streams = served.start(prepared, request_id)
    writer = _CompletionWriter(served, request, request_id)
    if request.stream:
        return EventStream(writer.stream(streams))
    response = await unless_disconnected(raw, writer.collect(streams))
    return JSONResponse(response.model_dump(mode="json"))


def _prepare(
    engine: AsyncEngine,
    prompt: str | list[int],
    params: SamplingParams,
    index: int,
    request: CompletionRequest,
    many: bool,
) -> PreparedRequest:
    try:
        if isinstance(prompt, str) and not request.add_special_tokens:
            ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
            prompt = {"prompt": prompt, "prompt_token_ids": list(ids)}
        return engine.prepare(prompt, params, index)
    except (TypeError, ValueError) as error:
        raise request_error(error, request, "prompt", many) from None


class _CompletionWriter:
    """Builds the response (or its chunks) for one request's prompts and choices."""

    def __init__(self, served: Served, request: CompletionRequest, request_id: str) -> None:
        self.served = served
        self.request = request
        self.id = request_id
        self.created = now()
        self.name = TokenNamer(served.tokenizer, request.return_tokens_as_token_ids)

    async def collect(self, streams: Sequence[AsyncIterator[RequestOutput]]) -> CompletionResponse:
        gathered = await gather(streams, self.request.n)
        choices = []
        for choice in gathered.choices:
            prompt = gathered.prompts[choice.index // self.request.n]
            choices.append(self._choice(prompt, choice))
        usage = Usage.of(gathered.prompt_tokens, gathered.completion_tokens)
        return CompletionResponse(
            id=self.id, created=self.created, model=self.served.model_name, choices=choices,
            usage=usage,
        )  # fmt: skip

    def _choice(self, prompt: PromptSoFar, choice: ChoiceSoFar) -> CompletionChoice:
        request = self.request
        text = "".join(choice.text)
        logprobs = None
        if request.logprobs is not None:
            logprobs = self._logprobs(prompt, choice.token_ids, choice.logprobs, first=True)[0]
        if request.echo:
            text = self._prompt_text(prompt) + text
        extras = {}
        if request.return_token_ids:
            extras.update(token_ids=choice.token_ids, prompt_token_ids=prompt.token_ids)
        if request.prompt_logprobs is not None:
            extras["prompt_logprobs"] = prompt_logprobs_json(prompt.logprobs)
        return CompletionChoice(
            index=choice.index,
            text=text,
            logprobs=logprobs,
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
            **extras,
        )

    async def stream(self, streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        request, n = self.request, self.request.n
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)
        prompts = [PromptSoFar() for _ in streams]
        offsets: dict[int, int] = {}  # choice -> text offset reached (logprobs)
        generated = 0
        try:
            async for prompt_index, output in merge(streams):
                prompt = prompts[prompt_index]
                prompt.add(output)
                for completion in output.outputs:
                    index = prompt_index * n + completion.index
                    first = index not in offsets
                    choice, offsets[index] = self._chunk_choice(
                        prompt, completion, index, first, offsets.get(index, 0)
                    )
                    generated += len(completion.token_ids)
                    chunk = self._chunk([choice])
                    if continuous:
                        chunk.usage = Usage.of(_prompt_tokens(prompts), generated)
                    yield sse(chunk)
        except Exception as error:  # noqa: BLE001 (whatever broke, the stream says so and ends)
            yield error_event(error)
        if include_usage:
            yield sse(self._chunk([], usage=Usage.of(_prompt_tokens(prompts), generated)))
        yield DONE

    def _chunk_choice(
        self, prompt: PromptSoFar, completion: CompletionOutput, index: int, first: bool,
        offset: int,
    ) -> tuple[CompletionChoice, int]:  # fmt: skip
        request = self.request
        text = completion.text
        if first and request.echo:
            text = self._prompt_text(prompt) + text
        logprobs = None
        if request.logprobs is not None:
            entries = completion.logprobs or []
            logprobs, offset = self._logprobs(
                prompt, completion.token_ids, entries, first=first, offset=offset
            )
        extras = {}
        if request.return_token_ids:
            extras["token_ids"] = list(completion.token_ids)
            if first:
                extras["prompt_token_ids"] = prompt.token_ids
        choice = CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
            **extras,
        )
        return choice, offset

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None):
        return CompletionResponse(
            id=self.id, created=self.created, model=self.served.model_name, choices=choices,
            usage=usage,
        )  # fmt: skip

    def _logprobs(
        self, prompt: PromptSoFar, token_ids, entries, *, first: bool, offset: int = 0
    ) -> tuple[CompletionLogprobs, int]:
        """The tokens' logprobs; with echo, the first chunk starts with the prompt's."""
        if first and self.request.echo:
            prompt_entries = prompt.logprobs or [None] * len(prompt.token_ids)
            token_ids = [*prompt.token_ids, *token_ids]
            entries = [*prompt_entries, *entries]
        return completion_logprobs(token_ids, entries, self.name, offset)

    def _prompt_text(self, prompt: PromptSoFar) -> str:
        if prompt.prompt is not None:
            return prompt.prompt
        return self.served.tokenizer.decode(prompt.token_ids)


def _prompt_tokens(prompts: list[PromptSoFar]) -> int:
    return sum(len(p.token_ids) for p in prompts)
