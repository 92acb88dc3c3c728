"""What one engine step runs: the scheduler's plan, read by the batcher and the step loop.

Kept apart from the scheduler that makes it: the batcher (`batching.build_step_inputs`) turns a
plan into the device's arrays, the step loop (`step_loop.py`) replays multi-step plans, and tests
build plans by hand, none of which needs the scheduler's queues.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxinfer.engine.sequence import Sequence


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens fed this step: seq.all_token_ids[start : start + num_new_tokens]
    start: int  # == seq.num_computed_tokens at schedule time: position of the first fed token
    samples: bool  # start + num_new_tokens == seq.num_tokens: the last logits give the next token


@dataclass(frozen=True)
class StepPlan:
    is_prefill: bool  # some item is a prefill chunk (possibly beside decodes: a unified step)
    # Decodes first (admission order), then prefill chunks: in-progress prefills first, then
    # admissions in FIFO order. Deterministic for the same inputs.
    scheduled: tuple[ScheduledSeq, ...]
    preempted: tuple[Sequence, ...]  # sequences preempted while building this plan
    block_copies: tuple[tuple[int, int], ...] = ()  # (src, dst) KV blocks to copy before the step
    num_decodes: int = 0  # the leading items that decode one token (all of a decode plan's)

    def __post_init__(self) -> None:
        if not self.is_prefill:
            object.__setattr__(self, "num_decodes", len(self.scheduled))

    @property
    def num_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)
