"""Per-request host state: tokens so far, how many of them are in the KV cache, and its blocks.

A `Sequence` is deliberately lean. Everything the scheduler and block manager need lives here;
everything else about a request (sampling params, request id, rng key, detokenizer state) the
engine keeps in its own maps keyed by `seq_id`, so this file never grows with new features.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# vLLM's FinishReason strings; "error": the request could not go on (its logits were not finite).
FINISH_REASONS = ("stop", "length", "abort", "error")


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # owns no KV blocks: new, or preempted and waiting to recompute
    RUNNING = enum.auto()  # owns KV blocks (possibly only partially prefilled)
    FINISHED = enum.auto()


@dataclass(eq=False)  # identity semantics: two requests with equal tokens are still two requests
class Sequence:
    seq_id: int  # unique, increasing in submission order; also the scheduler's tie-breaker
    prompt_token_ids: list[int]
    max_tokens: int  # resolved max new tokens (>= 1)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are already in the cache
    block_table: list[int] = field(default_factory=list)
    # Prefix cache: chain hashes of its full blocks so far (kept across preemption: the tokens do
    # not change), how many leading blocks of `block_table` are in the cache, and whether it may
    # reuse cached blocks at all (not when it asked for prompt logprobs: those are computed).
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    num_cached_blocks: int = 0
    reuse_cached_prefix: bool = True
    finish_reason: str | None = None  # "stop" | "length" | "abort"; set through finish()
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    # prompt + outputs kept as one list so the per-step slice `all_token_ids[start:end]` costs
    # no concatenation; `append_token` keeps it in step with `output_token_ids`.
    _token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        self._token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by outputs. The list is shared, not a copy: read it, don't mutate it."""
        return self._token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self._token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)

    def set_last_token(self, token_id: int) -> None:
        """Replace the newest token: under async scheduling a placeholder is appended when the
        next step is planned and the real token is written once the device hands it back."""
        self.output_token_ids[-1] = token_id
        self._token_ids[-1] = token_id

    def drop_last_token(self) -> None:
        """Take the newest token back: a placeholder whose step produced no real token."""
        self.output_token_ids.pop()
        self._token_ids.pop()

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark finished. Releasing blocks is the scheduler's job (`Scheduler.finish`)."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
