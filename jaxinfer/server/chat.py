"""POST /v1/chat/completions: messages through the model's chat template, then one request.

The prompt is exactly what `LLM.chat` would run (intake.render_chats: the template's own token ids,
no second tokenization), so a seeded chat request gives the tokens `LLM.chat` gives. A template
that refuses the conversation (e.g. roles that do not alternate) is a 400 naming `messages`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxinfer.engine import intake
from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.server.context import Served
from jaxinfer.server.gather import ChoiceSoFar, gather
from jaxinfer.server.logprobs import TokenNamer, chat_logprobs, prompt_logprobs_json
from jaxinfer.server.protocol import ChatCompletionRequest, RequestError
from jaxinfer.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
    Usage,
    now,
    random_id,
)
from jaxinfer.server.sampling import chat_params, request_error
from jaxinfer.server.streaming import DONE, EventStream, error_event, sse, unless_disconnected


def render(served: Served, request: ChatCompletionRequest | object) -> intake.TokensPrompt:
    """The conversation through the chat template -> {"prompt": text, "prompt_token_ids"}."""
    messages = [message.as_template_message() for message in request.messages]
    try:
        (prompt,) = intake.render_chats(
            served.tokenizer,
            [messages],
            chat_template=request.chat_template,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            chat_template_kwargs=request.chat_template_kwargs,
        )
    except (ValueError, TypeError, jinja2.TemplateError) as error:
        raise RequestError(f"messages: the chat template failed: {error}", "messages") from None
    return prompt


async def create_chat_completion(
    served: Served, request: ChatCompletionRequest, raw: Request
) -> Response:
    served.check_model(request.model)
    engine = served.generative("Chat Completions")
    request.check_supported()
    params = chat_params(request, served.sampling_defaults)
    prompt = render(served, request)
    try:
        prepared = engine.prepare(prompt, params)
    except (TypeError, ValueError) as error:
        raise request_error(error, request, "messages", many=False) from None
    request_id = random_id("chatcmpl")
    streams = served.start([prepared], request_id)
    writer = _ChatWriter(served, request, request_id)
    if request.stream:
        return EventStream(writer.stream(streams[0]))
    response = await unless_disconnected(raw, writer.collect(streams))
    return JSONResponse(response.model_dump(mode="json"))


class _ChatWriter:
    def __init__(self, served: Served, request: ChatCompletionRequest, request_id: str) -> None:
        self.served = served
        self.request = request
        self.id = request_id
        self.created = now()
        self.name = TokenNamer(served.tokenizer, request.return_tokens_as_token_ids)

    async def collect(self, streams) -> ChatCompletionResponse:
        gathered = await gather(streams, self.request.n)
        (prompt,) = gathered.prompts
        extras = {}
        if self.request.return_token_ids:
            extras["prompt_token_ids"] = prompt.token_ids
        if self.request.prompt_logprobs is not None:
            extras["prompt_logprobs"] = prompt_logprobs_json(prompt.logprobs)
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.served.model_name,
            choices=[self._choice(choice) for choice in gathered.choices],
            usage=Usage.of(gathered.prompt_tokens, gathered.completion_tokens),
            **extras,
        )

    def _choice(self, choice: ChoiceSoFar) -> ChatChoice:
        extras = {}
        if self.request.return_token_ids:
            extras["token_ids"] = choice.token_ids
        return ChatChoice(
            index=choice.index,
            message=AssistantMessage(content="".join(choice.text)),
            logprobs=self._logprobs(choice.token_ids, choice.logprobs),
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
            **extras,
        )

    async def stream(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        """A role chunk per choice first, then content deltas; the last delta of a choice
        carries its finish_reason; then the usage chunk (if asked for) and [DONE]."""
        request = self.request
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)
        prompt_tokens = generated = 0
        first = True
        try:
            async for output in outputs:
                if first:
                    first = False
                    prompt_tokens = len(output.prompt_token_ids)
                    for index in range(request.n):
                        chunk = self._chunk(
                            [ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant",
                                                                             content=""))]
                        )  # fmt: skip
                        if request.return_token_ids:
                            chunk.prompt_token_ids = list(output.prompt_token_ids)
                        yield sse(chunk)
                for completion in output.outputs:
                    generated += len(completion.token_ids)
                    chunk = self._chunk([self._chunk_choice(completion)])
                    if continuous:
                        chunk.usage = Usage.of(prompt_tokens, generated)
                    yield sse(chunk)
        except Exception as error:  # noqa: BLE001 (whatever broke, the stream says so and ends)
            yield error_event(error)
        if include_usage:
            yield sse(self._chunk([], usage=Usage.of(prompt_tokens, generated)))
        yield DONE

    def _chunk_choice(self, completion: CompletionOutput) -> ChatChunkChoice:
        extras = {}
        if self.request.return_token_ids:
            extras["token_ids"] = list(completion.token_ids)
        return ChatChunkChoice(
            index=completion.index,
            delta=DeltaMessage(content=completion.text),
            logprobs=self._logprobs(completion.token_ids, completion.logprobs or []),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
            **extras,
        )

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None):
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.served.model_name, choices=choices,
            usage=usage,
        )  # fmt: skip

    def _logprobs(self, token_ids, entries) -> ChatLogprobs | None:
        if not self.request.logprobs:
            return None
        top = self.request.top_logprobs or 0
        return ChatLogprobs(content=chat_logprobs(token_ids, entries, self.name, top))
