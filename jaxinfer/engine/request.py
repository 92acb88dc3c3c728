"""One record per request: its prompt, parameters, and each of its n samples' progress.

The scheduler and block manager see only `Sequence`s (tokens, blocks, status); everything else
that belongs to a request lives here, in one place, instead of in side tables keyed by sequence
id: its samples' key seeds, sampling-state slots, stop matchers, logprobs, and how much of each
sample's output has already been handed to the caller (for streamed deltas).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jaxinfer.engine.sequence import Sequence
from jaxinfer.engine.stop_strings import StopStringMatcher

if TYPE_CHECKING:
    from jaxinfer.engine.structured_output import GrammarMatcher
from jaxinfer.outputs import Logprob
from jaxinfer.sampling_params import SamplingParams


@dataclass(kw_only=True, eq=False)
class Sample:
    """One of a request's n samples: its sequence and what its output accumulates."""

    index: int  # which of the request's n samples
    seed: int  # uint32 key seed: row_seed(request seed, index)
    seq: Sequence
    stop_matcher: StopStringMatcher | None = None
    grammar: GrammarMatcher | None = None  # structured outputs (engine/structured_output.py)
    slot: int | None = None  # its row of the device sampling state while running
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    # Streaming (DELTA): output tokens and text characters already handed to the caller.
    sent_tokens: int = 0
    sent_chars: int = 0
    sent_final: bool = False  # its finished output was delivered


@dataclass(kw_only=True, eq=False)
class Request:
    """A request as the engine core tracks it from `add_request` until it finishes or aborts."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seed: int  # the request's key seed: its own, or derived from the engine seed and its index
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    samples: list[Sample] = field(default_factory=list)
    micro_batch: int = 0  # the scheduler (pipeline micro-batch) its samples run in
    # prompt position -> its logprobs entry (filled chunk by chunk during prefill)
    prompt_logprobs: dict[int, dict[int, Logprob]] = field(default_factory=dict)
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(sample.seq.is_finished for sample in self.samples)

    def banned_now(self, sample: Sample) -> tuple[int, ...]:
        """Tokens banned at this step only: the last token of each multi-token bad word whose
        other tokens the output ends with (single-token bad words are banned in the slot row)."""
        output = sample.seq.output_token_ids
        banned = tuple(
            ids[-1]
            for ids in self.bad_words_token_ids
            if len(ids) > 1
            and len(output) >= len(ids) - 1
            and tuple(output[len(output) - len(ids) + 1 :]) == ids[:-1]
        )
        allowed = self.params.allowed_token_ids
        if banned and allowed is not None:
            # Never ban the last allowed tokens: with none left the sampler could only leave
            # `allowed_token_ids`, which is the stronger promise (vLLM keeps it too).
            if not set(allowed) - set(self.single_token_bad_words) - set(banned):
                return ()
        return banned

    @property
    def single_token_bad_words(self) -> list[int]:
        return [ids[0] for ids in self.bad_words_token_ids if len(ids) == 1]
