"""SamplingParams with vLLM's field names, defaults and validation (the subset the engine runs today).

Every bad value fails when the object is built, naming the field and the allowed range, so no
request with impossible parameters ever reaches the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY_TEMPERATURE = 1e-5


def _require(condition: bool, name: str, allowed: str, value: object) -> None:
    if not condition:
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        _require(
            isinstance(self.n, int) and self.n == 1, "n", "1 (n > 1 is not supported yet)", self.n
        )
        _require(
            isinstance(self.temperature, int | float)
            and math.isfinite(self.temperature)
            and self.temperature >= 0,
            "temperature",
            "a finite number >= 0",
            self.temperature,
        )
        if self.seed == -1:
            object.__setattr__(self, "seed", None)
        _require(
            self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
            "seed",
            "None, -1 or an int >= 0",
            self.seed,
        )
        _require(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "max_tokens",
            "None or an int >= 1",
            self.max_tokens,
        )
        object.__setattr__(self, "stop_token_ids", list(self.stop_token_ids or []))
        _require(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "a list of token ids >= 0",
            self.stop_token_ids,
        )
        _require(
            self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
            "logprobs",
            "None or an int >= 0",
            self.logprobs,
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
