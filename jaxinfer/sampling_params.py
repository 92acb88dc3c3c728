"""SamplingParams with vLLM's field names, defaults, normalizations and validation.

Every bad value fails when the object is built, naming the field and the allowed range, so no
request with impossible parameters ever reaches the device. What needs the model (token ids
against the vocabulary, logprob counts against the engine's `max_logprobs`) is checked by
`validate_for_model` when the engine accepts the request.

Deliberate differences from vLLM, each because silent coercion hides caller bugs:
- `bool` is rejected wherever a number is expected (`isinstance(True, int)` holds in Python, and
  vLLM turns `logprobs=True` into 1); numpy integers and floats are accepted and stored as Python
  numbers.
- vLLM raises temperatures in (0, 1e-2) to 1e-2 with a warning; here anything below
  `GREEDY_TEMPERATURE` is greedy (stored as 0.0, as every greedy request is in vLLM) and anything
  above is used as given.
- Every number must survive the trip to the device: counts (`n`, `max_tokens`, `min_tokens`,
  `top_k`, `logprobs`, `prompt_logprobs`, `truncate_prompt_tokens`) fit int32, and floats that
  would turn into 0 or inf in float32 and break the sampler (`top_p` 0 keeps nothing,
  `repetition_penalty` 0 divides by zero) are rejected with the float32 range. vLLM accepts them
  and its float32 tensors silently change their meaning. `min_p` below float32's smallest normal
  number is stored as 0.0, which is what it means in float32 (no token is that improbable).
- `seed` must be in [0, 2**64), the range vLLM's `torch.Generator.manual_seed` takes (vLLM itself
  accepts any int and fails later). How a seed becomes a key: `row_seed` in
  jaxinfer/runtime/sampling_tensors.py.
- vLLM fields accepted for compatibility: `detokenize`, `output_kind`, `truncate_prompt_tokens`
  are validated and stored; `logits_processors` must be None (a Python callback per step cannot
  run inside the compiled sampler).
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from jaxinfer.beam_search import BeamSearchParams  # noqa: F401 (vLLM's import path)
from jaxinfer.structured_outputs import (  # re-exported: vLLM's jaxinfer.sampling_params names
    GuidedDecodingParams,
    StructuredOutputsParams,
    as_structured_outputs,
)

__all__ = [
    "GuidedDecodingParams",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
]

GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below this mean greedy
LOGIT_BIAS_LIMIT = 100.0  # vLLM (like OpenAI) clamps each bias to [-100, 100]
INT32_MAX = 2**31 - 1  # counts and token ids travel to the device as int32
SEED_LIMIT = 2**64  # seeds are in [0, SEED_LIMIT)
FLOAT32_MIN_NORMAL = 2.0**-126  # ~1.18e-38; smaller values are subnormal or 0 in float32
FLOAT32_MAX = (2 - 2.0**-23) * 2.0**127  # ~3.40e38; larger values are inf in float32


class RequestOutputKind(enum.IntEnum):
    """vLLM's `RequestOutputKind`: what a streamed RequestOutput carries. An IntEnum (vLLM's is a
    plain Enum) so that it is written to JSON as its number and read back from it."""

    CUMULATIVE = 0  # the whole output so far in every RequestOutput
    DELTA = 1  # only what is new since the previous RequestOutput
    FINAL_ONLY = 2  # no intermediate RequestOutput


def _require(condition: bool, name: str, allowed: str, value: object) -> None:
    if not condition:
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    """An integer that is not a bool (numpy integers count; `True` does not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A real number that is not a bool (ints and numpy floats count)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_finite_real(value: object) -> bool:
    return _is_real(value) and math.isfinite(value)


def _is_int32(value: object, low: int) -> bool:
    """An int (not a bool) in [low, INT32_MAX]."""
    return _is_int(value) and low <= value <= INT32_MAX


def _token_id_list(value: object, name: str, *, allow_empty: bool) -> list[int]:
    """A list/tuple of token ids >= 0, returned as a fresh list of Python ints."""
    allowed = "a list of token ids (ints >= 0)" + ("" if allow_empty else ", not empty")
    _require(isinstance(value, list | tuple), name, allowed, value)
    _require(allow_empty or len(value) > 0, name, allowed, value)
    _require(all(_is_int(t) and t >= 0 for t in value), name, allowed, value)
    return [int(t) for t in value]


def _string_list(value: object, name: str) -> list[str]:
    """A str or a list/tuple of non-empty str, returned as a fresh list (vLLM's normalization)."""
    if isinstance(value, str):
        value = [value]
    allowed = "a str or a list of non-empty str"
    _require(isinstance(value, list | tuple), name, allowed, value)
    _require(all(isinstance(s, str) and s for s in value), name, allowed, value)
    return list(value)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """vLLM's `SamplingParams` for offline generation; see vLLM's docs for each field's meaning.

    Normalized at construction: `seed=-1` -> None, `top_k=-1` -> 0, `stop` as a list, None lists
    as empty lists, `logit_bias` clamped to +-100, `output_kind` as a RequestOutputKind, and (as
    vLLM does) a greedy request has `temperature=0`, `top_p=1`, `top_k=0` and `min_p=0` because
    those cannot change an argmax. Normalizing twice changes nothing, so
    `SamplingParams(**dataclasses.asdict(params))` equals `params`.

    `seed`: any int in [0, 2**64). Seeds below 2**32 are the request's key seed as they are;
    larger ones are mixed down to the 32-bit key seed (`row_seed`), so two of them collide with
    probability 2**-32 -- the device key is built from 32 bits.

    `truncate_prompt_tokens` (vLLM): keep only the last k prompt tokens; -1 keeps the most the
    model takes. Applied where prompts are tokenized (jaxinfer/engine/intake.py).
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    truncate_prompt_tokens: int | None = None
    logits_processors: None = None
    # Constrained output (jaxinfer/structured_outputs.py); `guided_decoding` is vLLM's older name,
    # moved into `structured_outputs` at construction.
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        # Frozen: normalized values are written through object.__setattr__.
        def set_(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        structured = as_structured_outputs(self.structured_outputs, "structured_outputs")
        guided = as_structured_outputs(self.guided_decoding, "guided_decoding")
        if structured is not None and guided is not None and structured != guided:
            raise ValueError(
                "SamplingParams.structured_outputs and guided_decoding (its older name) differ; "
                "pass one of them"
            )
        set_("structured_outputs", structured or guided)
        set_("guided_decoding", None)

        _require(_is_int32(self.n, 1), "n", f"an int in [1, {INT32_MAX}]", self.n)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_finite_real(value) and -2 <= value <= 2, name, "in [-2, 2]", value)
        _require(
            _is_real(self.repetition_penalty)
            and FLOAT32_MIN_NORMAL <= self.repetition_penalty <= FLOAT32_MAX,
            "repetition_penalty",
            "> 0 and a normal float32 number, in [1.2e-38, 3.4e38] (0 or inf in float32 would "
            "divide logits by zero or by inf)",
            self.repetition_penalty,
        )
        _require(
            _is_real(self.temperature) and 0 <= self.temperature <= FLOAT32_MAX,
            "temperature",
            "a number in [0, 3.4e38] (finite in float32)",
            self.temperature,
        )
        _require(
            _is_real(self.top_p) and FLOAT32_MIN_NORMAL <= self.top_p <= 1,
            "top_p",
            "in (0, 1] and at least 1.2e-38 (smaller values are 0 in float32, which keeps no "
            "token)",
            self.top_p,
        )
        _require(
            _is_int(self.top_k) and (self.top_k == -1 or 0 <= self.top_k <= INT32_MAX),
            "top_k",
            f"0 or -1 (disabled) or an int in [1, {INT32_MAX}]",
            self.top_k,
        )
        _require(_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _require(
            self.seed is None or (_is_int(self.seed) and -1 <= self.seed < SEED_LIMIT),
            "seed",
            "None, -1 or an int in [0, 2**64)",
            self.seed,
        )
        _require(
            self.max_tokens is None or _is_int32(self.max_tokens, 1),
            "max_tokens",
            f"None or an int in [1, {INT32_MAX}]",
            self.max_tokens,
        )
        _require(
            _is_int32(self.min_tokens, 0),
            "min_tokens",
            f"an int in [0, {INT32_MAX}]",
            self.min_tokens,
        )
        _require(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"<= max_tokens={self.max_tokens}",
            self.min_tokens,
        )
        for name in (
            "include_stop_str_in_output",
            "ignore_eos",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "detokenize",
        ):
            _require(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(
                value is None or _is_int32(value, -1),
                name,
                f"None, an int in [0, {INT32_MAX}], or -1 (the whole vocabulary)",
                value,
            )
        _require(
            self.truncate_prompt_tokens is None
            or (_is_int32(self.truncate_prompt_tokens, -1) and self.truncate_prompt_tokens != 0),
            "truncate_prompt_tokens",
            f"None, -1 (the model's maximum) or an int in [1, {INT32_MAX}]",
            self.truncate_prompt_tokens,
        )
        _require(
            self.logits_processors is None,
            "logits_processors",
            "None (per-request logits processors are not supported: a Python callback per step "
            "cannot run inside the compiled sampler; use logit_bias, allowed_token_ids or "
            "bad_words)",
            self.logits_processors,
        )
        kinds = ", ".join(f"{kind.name} ({kind.value})" for kind in RequestOutputKind)
        _require(
            isinstance(self.output_kind, RequestOutputKind)
            or (_is_int(self.output_kind) and self.output_kind in set(RequestOutputKind)),
            "output_kind",
            f"a RequestOutputKind or its int value: {kinds}",
            self.output_kind,
        )

        set_("stop", _string_list([] if self.stop is None else self.stop, "stop"))
        _require(
            self.detokenize or not self.stop,
            "stop",
            "empty when detokenize=False (as vLLM: stop strings are matched on the text)",
            self.stop,
        )
        set_(
            "stop_token_ids",
            _token_id_list(
                [] if self.stop_token_ids is None else self.stop_token_ids,
                "stop_token_ids",
                allow_empty=True,
            ),
        )
        bad_words = [] if self.bad_words is None else self.bad_words
        _require(
            isinstance(bad_words, list | tuple)
            and all(isinstance(w, str) and w for w in bad_words),
            "bad_words",
            "a list of non-empty str",
            self.bad_words,
        )
        set_("bad_words", list(bad_words))
        if self.allowed_token_ids is not None:
            set_(
                "allowed_token_ids",
                _token_id_list(self.allowed_token_ids, "allowed_token_ids", allow_empty=False),
            )
        if self.logit_bias is not None:
            set_("logit_bias", self._clamped_logit_bias(self.logit_bias))

        set_("n", int(self.n))
        set_("top_k", 0 if self.top_k == -1 else int(self.top_k))
        set_("seed", None if self.seed in (None, -1) else int(self.seed))
        if self.max_tokens is not None:
            set_("max_tokens", int(self.max_tokens))
        set_("min_tokens", int(self.min_tokens))
        for name in ("logprobs", "prompt_logprobs", "truncate_prompt_tokens"):
            if getattr(self, name) is not None:
                set_(name, int(getattr(self, name)))
        set_("output_kind", RequestOutputKind(int(self.output_kind)))
        for name in (
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "temperature",
            "top_p",
            "min_p",
        ):
            set_(name, float(getattr(self, name)))
        if self.min_p < FLOAT32_MIN_NORMAL:
            set_("min_p", 0.0)  # what it is in float32 (and in vLLM's tensors): off

        if self.is_greedy:
            # vLLM: a greedy request ignores the truncation parameters, and n > 1 greedy samples
            # would be n copies of one answer. Temperature 0: a value just below 1e-5 could
            # round up to float32(1e-5) on the device and stop being greedy there.
            _require(self.n == 1, "n", "1 when sampling greedily (temperature < 1e-5)", self.n)
            set_("temperature", 0.0)
            set_("top_p", 1.0)
            set_("top_k", 0)
            set_("min_p", 0.0)

    @staticmethod
    def _clamped_logit_bias(logit_bias: object) -> dict[int, float]:
        allowed = "a dict {token id (int >= 0): finite float}"
        _require(isinstance(logit_bias, dict), "logit_bias", allowed, logit_bias)
        clamped = {}
        for token, bias in logit_bias.items():
            _require(_is_int(token) and token >= 0, "logit_bias", allowed, logit_bias)
            _require(_is_finite_real(bias), "logit_bias", allowed, logit_bias)
            clamped[int(token)] = min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(bias)))
        return clamped

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate_for_model(self, vocab_size: int, max_logprobs: int) -> None:
        """Checks what needs the model: token ids against the vocabulary, logprob counts.

        As vLLM: `logprobs=-1` asks for the whole vocabulary and so counts as `vocab_size`
        against `max_logprobs`; `max_logprobs=-1` means no bound. `top_k` above the vocabulary is
        rejected as vLLM does, rather than silently meaning "all tokens".
        """
        token_lists: dict[str, Sequence[int]] = {
            "stop_token_ids": self.stop_token_ids or [],
            "logit_bias": list(self.logit_bias or {}),
            "allowed_token_ids": self.allowed_token_ids or [],
        }
        for name, token_ids in token_lists.items():
            out_of_vocab = sorted({t for t in token_ids if t >= vocab_size})
            _require(
                not out_of_vocab,
                name,
                f"token ids < vocab_size={vocab_size} (out of vocabulary: {out_of_vocab})",
                getattr(self, name),
            )
        _require(self.top_k <= vocab_size, "top_k", f"<= vocab_size={vocab_size}", self.top_k)
        limit = vocab_size if max_logprobs == -1 else max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            requested = vocab_size if value == -1 else value
            _require(
                requested <= limit,
                name,
                f"<= max_logprobs={max_logprobs} (-1 counts as vocab_size={vocab_size})",
                value,
            )
