"""A request body -> SamplingParams, and engine messages -> the request's own field names.

vLLM's precedence for the sampling knobs a request may leave out: the request's value, else the
server's default (the checkpoint's generation_config.json, or a config file's `sampling:`), else
OpenAI's default. Everything else has one meaning: the request's value or SamplingParams' default.
Value ranges are checked once, by SamplingParams and the engine's intake, whose ValueErrors name
`SamplingParams.<field>` and `prompts[i]`; `request_error` rewrites those into the names the
client sent (`max_completion_tokens`, `top_logprobs`, `prompt[1]`, `messages`, and for an invalid
schema or regex the field that carried it, `response_format` or `guided_regex`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from jaxinfer.sampling_params import RequestOutputKind, SamplingParams
from jaxinfer.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    SamplingFields,
)
from jaxinfer.server.structured import invalid_constraint, structured_outputs

# vLLM's _DEFAULT_SAMPLING_PARAMS: the fields a server default may fill in (OpenAI's defaults
# coincide with SamplingParams' own for all of them).
DEFAULTED_FIELDS = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
)
_PASSED_THROUGH = (
    "n",
    "seed",
    "stop",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "allowed_token_ids",
    "bad_words",
    "prompt_logprobs",
)
_SAMPLING_FIELD = re.compile(r"SamplingParams\.(\w+)")
_PROMPT_INDEX = re.compile(r"^prompts\[(\d+)\]")


def server_defaults(default_params: SamplingParams, overrides: Mapping[str, Any]) -> dict:
    """The defaulted fields' server values: the engine's (generation_config.json) with a config
    file's `sampling:` on top."""
    defaults = {name: getattr(default_params, name) for name in DEFAULTED_FIELDS}
    defaults.update({k: v for k, v in overrides.items() if k in DEFAULTED_FIELDS})
    return defaults


def completion_params(request: CompletionRequest, defaults: Mapping[str, Any]) -> SamplingParams:
    prompt_logprobs = request.prompt_logprobs
    if request.echo and request.logprobs is not None and prompt_logprobs is None:
        prompt_logprobs = request.logprobs  # vLLM: echoed prompt tokens carry logprobs too
    return _build(
        request,
        defaults,
        max_tokens=request.max_tokens,
        logprobs=request.logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def chat_params(request: ChatCompletionRequest, defaults: Mapping[str, Any]) -> SamplingParams:
    """max_completion_tokens wins over the deprecated max_tokens; neither: up to max_model_len.
    logprobs: true -> top_logprobs alternatives (0 by default) besides the chosen token."""
    if request.max_completion_tokens is not None:
        max_tokens = request.max_completion_tokens
    else:
        max_tokens = request.max_tokens
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return _build(
        request,
        defaults,
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=request.prompt_logprobs,
    )


def request_error(
    error: ValueError | TypeError, request: SamplingFields | None, prompt_field: str, many: bool
) -> RequestError:
    """An engine or SamplingParams error, reworded with the request's field names.

    `prompt_field`: what the request calls its prompt ("prompt", "messages", "input"); `many`:
    whether it sent a list of prompts (then "prompt[1]" names the one at fault)."""
    message = str(error)
    constraint_error = invalid_constraint(message, request)
    if constraint_error is not None:  # an invalid schema or regex: not the prompt's fault
        return RequestError(*constraint_error)
    param = None
    indexed = _PROMPT_INDEX.match(message)
    if indexed:
        where = f"{prompt_field}[{indexed.group(1)}]" if many else prompt_field
        message = where + message[indexed.end() :]
        param = prompt_field
    # The field at fault leads the message ("SamplingParams.top_k must be ...", or after the
    # prompt: "prompts[0]: SamplingParams.logprobs=9 exceeds ..."); one named later is a hint
    # ("... or set SamplingParams.truncate_prompt_tokens") and the prompt stays at fault.
    leading = _SAMPLING_FIELD.match(message.split(": ", 1)[-1] if indexed else message)
    if leading:
        param = _request_field(leading.group(1), request)
    message = _SAMPLING_FIELD.sub(lambda m: _request_field(m.group(1), request), message)
    return RequestError(message, param)


def _build(
    request: SamplingFields,
    defaults: Mapping[str, Any],
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
) -> SamplingParams:
    fields: dict[str, Any] = {name: getattr(request, name) for name in _PASSED_THROUGH}
    for name in DEFAULTED_FIELDS:
        value = getattr(request, name)
        if value is not None:
            fields[name] = value
        elif name in defaults:
            fields[name] = defaults[name]
    fields.update(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    if request.logit_bias is not None:
        fields["logit_bias"] = _logit_bias(request.logit_bias)
    fields["structured_outputs"] = structured_outputs(request)
    try:
        # DELTA: each step's new tokens; a non-streamed response is the deltas put together,
        # so both kinds of response see every token as it comes (and /metrics times them).
        return SamplingParams(**fields, output_kind=RequestOutputKind.DELTA)
    except (TypeError, ValueError) as error:
        raise request_error(error, request, "prompt", many=False) from None


def _logit_bias(bias: Mapping[str, float]) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings)."""
    converted = {}
    for key, value in bias.items():
        if not key.isdigit():
            raise RequestError(
                f"logit_bias: keys must be token ids (decimal strings), got {key!r}", "logit_bias"
            )
        converted[int(key)] = value
    return converted


def _request_field(name: str, request: SamplingFields | None) -> str:
    """A SamplingParams field -> the request field that set it."""
    if isinstance(request, ChatCompletionRequest):
        if name == "max_tokens" and request.max_completion_tokens is not None:
            return "max_completion_tokens"
        if name == "logprobs":
            return "top_logprobs"
    return name
