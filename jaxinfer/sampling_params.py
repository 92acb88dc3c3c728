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
  `GREEDY_TEMPERATURE` is greedy and anything above is used as given.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below this mean greedy
LOGIT_BIAS_LIMIT = 100.0  # vLLM (like OpenAI) clamps each bias to [-100, 100]


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
    as empty lists, `logit_bias` clamped to +-100, and (as vLLM does) a greedy request has
    `top_p=1`, `top_k=0` and `min_p=0` because those cannot change an argmax.
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

    def __post_init__(self) -> None:
        # Frozen: normalized values are written through object.__setattr__.
        def set_(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        _require(_is_int(self.n) and self.n >= 1, "n", "an int >= 1", self.n)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_finite_real(value) and -2 <= value <= 2, name, "in [-2, 2]", value)
        _require(
            _is_finite_real(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "a finite number > 0",
            self.repetition_penalty,
        )
        _require(
            _is_finite_real(self.temperature) and self.temperature >= 0,
            "temperature",
            "a finite number >= 0",
            self.temperature,
        )
        _require(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _require(
            _is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 0),
            "top_k",
            "0 or -1 (disabled) or an int >= 1",
            self.top_k,
        )
        _require(_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _require(
            self.seed is None or (_is_int(self.seed) and self.seed >= -1),
            "seed",
            "None, -1 or an int >= 0",
            self.seed,
        )
        _require(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            "None or an int >= 1",
            self.max_tokens,
        )
        _require(
            _is_int(self.min_tokens) and self.min_tokens >= 0,
            "min_tokens",
            "an int >= 0",
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
        ):
            _require(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(
                value is None or (_is_int(value) and value >= -1),
                name,
                "None, an int >= 0, or -1 (the whole vocabulary)",
                value,
            )

        set_("stop", _string_list([] if self.stop is None else self.stop, "stop"))
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
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                set_(name, int(getattr(self, name)))
        for name in (
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "temperature",
            "top_p",
            "min_p",
        ):
            set_(name, float(getattr(self, name)))

        if self.is_greedy:
            # vLLM: a greedy request ignores the truncation parameters, and n > 1 greedy samples
            # would be n copies of one answer.
            _require(self.n == 1, "n", "1 when sampling greedily (temperature < 1e-5)", self.n)
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
