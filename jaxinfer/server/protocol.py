"""Request bodies of the OpenAI API (and vLLM's extra sampling fields), as pydantic models.

Field names, types and defaults follow OpenAI's API reference and vLLM's `protocol.py`, so a
client written for either sends bodies these accept. Two deliberate differences from vLLM, both so
that a mistake is a 400 naming the field instead of a silently different run:

- strict types: `"max_tokens": "5"` or `"n": true` is refused, not coerced (OpenAI refuses them
  too; vLLM's lax pydantic models accept them);
- unknown fields are refused by name (vLLM logs a warning and ignores them), and so are known
  fields at values that would need a feature jaxinfer lacks (`tools`, `suffix`, beam search,
  a `guided_decoding_backend` other than llguidance): see `check_supported`.

Structured outputs come as vLLM takes them: OpenAI's `response_format` (`text`, `json_object`,
`json_schema`), vLLM's `structured_outputs` and its older `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar`; `server/structured.py` maps them to one
`StructuredOutputsParams` (or a 400 naming the fields when a request sets more than one).

Value ranges are not repeated here: `SamplingParams` checks them and names the field
(`server/sampling.py` maps its message back to the request's field name).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TokenId = Annotated[int, Field(ge=0)]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(OpenAIModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False  # vLLM: usage in every chunk


class JsonSchemaFormat(OpenAIModel):
    """OpenAI's `response_format.json_schema`. The schema travels as `schema`, held here as
    `json_schema` (vLLM's name too): a field called `schema` would shadow BaseModel.schema()."""

    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # accepted: the grammar enforces the schema either way


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(OpenAIModel):
    """vLLM's `structured_outputs` body field: the fields of `StructuredOutputsParams` (exactly
    one set). `json` is an alias for the same reason as `schema` above."""

    json_schema: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(OpenAIModel):
    """What completions and chat share: OpenAI's sampling fields and vLLM's extras."""

    model: str | None = None  # None: the served model (vLLM)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None  # accepted and ignored, as by vLLM
    # vLLM's extra sampling fields (the client's `extra_body`).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    return_token_ids: bool = False  # vLLM: token_ids per choice, prompt_token_ids too
    return_tokens_as_token_ids: bool = False  # vLLM: logprob tokens as "token_id:N"
    # Structured outputs (server/structured.py): OpenAI's field, vLLM's, vLLM's older ones.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # llguidance (or "auto"/"guidance"): the only one
    # Accepted at their neutral values only (check_supported).
    use_beam_search: bool = False
    priority: int = 0

    def check_supported(self) -> None:
        """Fields jaxinfer knows but cannot honour at the given value -> ValueError naming them."""
        if self.use_beam_search:
            raise UnsupportedField("use_beam_search", "beam search is not supported")
        if self.priority != 0:
            raise UnsupportedField("priority", "priority scheduling is not supported; pass 0")
        if self.guided_decoding_backend not in (None, "auto", "guidance", "llguidance"):
            raise UnsupportedField(
                "guided_decoding_backend", "llguidance is the only structured-output backend"
            )
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "only allowed when stream is true")


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Any = None  # checked by `_prompt_forms`: text, texts, token ids, token-id lists
    echo: bool = False
    logprobs: int | None = None  # top-k alternatives per token, as OpenAI's legacy API
    max_tokens: int | None = 16  # OpenAI's and vLLM's default for completions
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM: BOS and the like when tokenizing text prompts

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_forms(cls, value: Any) -> Any:
        return _checked_prompt(value)

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix is not None:
            raise UnsupportedField("suffix", "insertion (suffix) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedField("best_of", f"must equal n={self.n} (no best-of ranking)")
        if self.prompt_logprobs is not None and self.stream:
            raise UnsupportedField("prompt_logprobs", "not available when stream is true (vLLM)")

    @property
    def prompts(self) -> list:
        """The prompt as a list of prompts (each a str or a list of token ids)."""
        return _as_list(self.prompt)


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        """What the chat template sees: text parts joined (vLLM's 'string' content format)."""
        if isinstance(self.content, list):
            text = "\n".join(part.text for part in self.content)
        else:
            text = self.content or ""
        message = {"role": self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None  # deprecated by OpenAI for max_completion_tokens
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat template fields.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise UnsupportedField("tools", "tool calling is not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise UnsupportedField("tool_choice", "tool calling is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedField("top_logprobs", "needs logprobs: true")
        if self.prompt_logprobs is not None and self.stream:
            raise UnsupportedField("prompt_logprobs", "not available when stream is true (vLLM)")
        if self.add_generation_prompt and self.continue_final_message:
            raise UnsupportedField(
                "continue_final_message", "cannot be combined with add_generation_prompt: true"
            )


class EmbeddingRequest(OpenAIModel):
    """POST /v1/embeddings."""

    input: Any
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    normalize: bool | None = None  # vLLM's PoolingParams field; None: the checkpoint's choice

    @field_validator("input", mode="before")
    @classmethod
    def _input_forms(cls, value: Any) -> Any:
        return _checked_prompt(value)

    def check_supported(self) -> None:
        if self.dimensions is not None:
            raise UnsupportedField("dimensions", "the model's embedding size cannot be changed")

    @property
    def inputs(self) -> list:
        return _as_list(self.input)


class TokenizeRequest(OpenAIModel):
    """POST /tokenize (vLLM): a prompt, or chat messages through the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise UnsupportedField("prompt", "pass exactly one of prompt and messages")


class DetokenizeRequest(OpenAIModel):
    """POST /detokenize (vLLM)."""

    model: str | None = None
    tokens: list[TokenId]


class RequestError(ValueError):
    """A bad request: HTTP 400 with OpenAI's error body; `param` names the field (or None)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedField(RequestError):
    """A request field at a value jaxinfer cannot serve."""

    def __init__(self, param: str, why: str) -> None:
        super().__init__(f"{param}: {why}", param)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_prompt(value: Any) -> bool:
    """OpenAI's prompt forms: str, [str], [int], [[int]] (non-empty lists)."""
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(item, str) for item in value) or all(_is_token(t) for t in value):
        return True
    return all(
        isinstance(item, list) and item and all(_is_token(t) for t in item) for item in value
    )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_list(value) -> list:
    """One prompt (a str or a list of token ids) or a list of them -> a list of prompts."""
    if isinstance(value, str) or (value and all(_is_token(t) for t in value)):
        return [value]
    return list(value)


def _checked_prompt(value: Any) -> Any:
    """A completion's `prompt` or an embedding's `input`: one of OpenAI's four prompt forms."""
    if not _is_prompt(value):
        raise ValueError(
            "must be a string, a list of strings, a list of token ids (ints >= 0) or a list "
            f"of token-id lists, got {_shown(value)}"
        )
    return value
