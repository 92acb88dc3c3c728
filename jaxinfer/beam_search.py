"""Beam search's parameters and results, with vLLM's names (`vllm.sampling_params.BeamSearchParams`,
`vllm.beam_search.BeamSearchSequence` / `BeamSearchOutput`).

    outputs = llm.beam_search([{"prompt": "The capital of France is"}],
                              BeamSearchParams(beam_width=4, max_tokens=16))
    best = outputs[0].sequences[0]          # best first: .text, .tokens, .cum_logprob

The search itself follows transformers' `generate(num_beams=beam_width, do_sample=False,
length_penalty=..., early_stopping=False)` (engine/beam_search.py says where vLLM differs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from jaxinfer.outputs import Logprob


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's `BeamSearchParams(beam_width, max_tokens, ignore_eos, temperature, length_penalty,
    include_stop_str_in_output)`; positional as in vLLM. Checked here, before anything runs.

    `length_penalty`: a finished beam scores `cum_logprob / generated_len ** length_penalty`
    (transformers' definition: generated tokens, eos included; vLLM counts the prompt too and
    leaves eos out). Wrong types raise TypeError, bad values ValueError. `temperature` is accepted (>= 0) but changes nothing: the scores are the
    raw log-softmax, as in vLLM V1 (raw logprobs) and in transformers' beam search without
    sampling. `include_stop_str_in_output` has no effect (beam search has no stop strings).
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"BeamSearchParams.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"BeamSearchParams.{name} must be >= 1, got {value!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"BeamSearchParams.{name} must be a bool, got {getattr(self, name)!r}"
                )
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"BeamSearchParams.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"BeamSearchParams.{name} must be finite, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"BeamSearchParams.temperature must be >= 0, got {self.temperature!r}")


@dataclass
class BeamSearchSequence:
    """One finished beam (vLLM's fields). `tokens` holds the prompt's ids and then the generated
    ones (eos included when it ended the beam); `logprobs` has one dict per generated token: the
    top candidates the engine returned at that step; `text` is the generated part decoded, eos
    left out; `cum_logprob` sums the generated tokens' log-probabilities."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    lora_request: None = None
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (eos) or "length" (max_tokens)
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The `beam_width` best beams of one prompt, best (highest score) first."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)
