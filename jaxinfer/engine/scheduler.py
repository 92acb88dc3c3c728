"""Continuous batching: decide, each step, which sequences run and how many tokens each feeds.

A step (vLLM V1's unified step) carries one token for every running sequence past its prefill
(the decodes) and, in what is left of the `max_num_batched_tokens` budget, prefill chunks: the
in-progress prefills first, then new admissions. A long prompt is split into chunks (chunked
prefill) that ride along with the decodes, so it never stalls them for its whole prefill. The
device runs the decode rows and the prefill rows with their own attention formulations inside one
compiled step (see `seam.Bucket`). `unified=False` restores the older alternation, a prefill step
whenever a prefill can run and a decode step otherwise, for comparison.

New requests join the batch as soon as a seat and blocks free up (continuous batching), first
taking back any prefix of full blocks already in the prefix cache (`BlockManager.lookup`). When a
decode runs out of KV blocks, the most recently admitted sequence is preempted by recompute: its
blocks are freed (its full blocks stay in the prefix cache until evicted) and it re-enters the
front of the waiting queue to prefill prompt + outputs again, which puts every token back at the
same position.

Parallel samples (n > 1) prefill their prompt once. The first sample (the parent) prefills all but
the last prompt token; then the others fork its block table (shared blocks, reference-counted) and
each decodes the last prompt token itself, sampling its own first token with its own key. The block
that token lands in is copied first if it is shared and partly filled (copy-on-write): the plan
lists such copies in `block_copies`, and the device performs them before the step.

The engine drives it as:
    plan = scheduler.schedule()
    sampled = device(plan)                    # {seq_id: token} for items with samples=True
    for seq in scheduler.update(plan, sampled):
        if <stop condition>: scheduler.finish(seq, reason)
"""

from __future__ import annotations

import logging
from collections import deque

from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.sequence import Sequence, SequenceStatus
from jaxinfer.engine.step_plan import ScheduledSeq, StepPlan

__all__ = ["ScheduledSeq", "Scheduler", "StepPlan"]

logger = logging.getLogger("jaxinfer")


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_prefill_seqs: int,
        max_model_len: int,
        unified: bool = True,
    ) -> None:
        for name, value in [
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_prefill_seqs", max_prefill_seqs),
            ("max_model_len", max_model_len),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        # A decode step feeds one token per running sequence and must fit the token budget too.
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({max_num_seqs})"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_seqs = max_prefill_seqs
        self.max_model_len = max_model_len
        self.unified = unified
        self.waiting: deque[Sequence] = deque()  # no blocks: new or preempted; FIFO
        self.running: list[Sequence] = []  # own blocks; in admission order (last = newest)
        # seq_ids admitted but whose sampling chunk has not run yet. Membership only, never
        # iterated, so the plan order stays deterministic.
        self._prefilling: set[int] = set()
        self._seqs: dict[int, Sequence] = {}  # every unfinished sequence, for abort()
        # parent seq_id -> the samples that will fork its prompt blocks (n > 1), and the reverse
        self._pending_forks: dict[int, list[Sequence]] = {}
        self._fork_parent: dict[int, int] = {}
        self.num_preemptions = 0

    # ---- queue state -------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_unfinished(self) -> int:
        """Sequences waiting or running, forks not yet started included."""
        return len(self.running) + len(self.waiting) + sum(map(len, self._pending_forks.values()))

    def add(self, seq: Sequence, forks: list[Sequence] | tuple[Sequence, ...] = ()) -> None:
        """Queue a new sequence, rejecting now any that could never run (it would livelock).

        `forks`: further samples of the same prompt (n > 1), fresh sequences with the same prompt
        and max_tokens; they share `seq`'s prompt blocks and run alongside it.
        """
        group = [seq, *forks]
        if len(group) > self.max_num_seqs:
            raise ValueError(
                f"{len(group)} parallel samples exceed max_num_seqs ({self.max_num_seqs})"
            )
        for other in forks:
            if other.prompt_token_ids != seq.prompt_token_ids:
                raise ValueError(f"fork {other.seq_id} has a different prompt than {seq.seq_id}")
            self._check_fresh(other)
        self._check_fresh(seq)
        for other in forks:
            self._seqs[other.seq_id] = other
            self._fork_parent[other.seq_id] = seq.seq_id
        if forks:
            self._pending_forks[seq.seq_id] = list(forks)
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def _check_fresh(self, seq: Sequence) -> None:
        if seq.seq_id in self._seqs:
            raise ValueError(f"seq_id {seq.seq_id} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} is not fresh (status {seq.status.name})")
        if seq.num_prompt_tokens == 0:
            raise ValueError(f"sequence {seq.seq_id} has an empty prompt")
        if seq.num_prompt_tokens > self.max_model_len:
            raise ValueError(
                f"sequence {seq.seq_id}: prompt of {seq.num_prompt_tokens} tokens is longer than "
                f"max_model_len ({self.max_model_len})"
            )
        if seq.max_tokens < 1:
            raise ValueError(
                f"sequence {seq.seq_id}: max_tokens must be >= 1, got {seq.max_tokens}"
            )
        # Alone in the cache it must fit its longest possible life, or preempting everyone else
        # still would not make room and the engine would spin forever.
        max_len = min(seq.num_prompt_tokens + seq.max_tokens, self.max_model_len)
        blocks = self.block_manager.blocks_for_tokens(max_len)
        if blocks > self.block_manager.num_usable_blocks:
            raise ValueError(
                f"sequence {seq.seq_id} can never fit: {max_len} tokens (prompt "
                f"{seq.num_prompt_tokens} + max_tokens {seq.max_tokens}, capped at max_model_len "
                f"{self.max_model_len}) need {blocks} KV blocks of {self.block_manager.block_size}"
                f" tokens, but the cache has only {self.block_manager.num_usable_blocks}"
            )

    # ---- planning ----------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """Plan the next step; None when there is nothing left to do."""
        # A second pass when the first planned nothing: a parent whose whole prompt came from
        # the prefix cache starts its forks at admission, and they decode from the next pass.
        for _ in range(2):
            plan = self._schedule_unified() if self.unified else self._schedule_separate()
            if plan is not None:
                return plan
        if self.has_unfinished:
            # Unreachable while add() rejects sequences that cannot fit alone: at most one running
            # sequence is mid-prefill and it is the newest, so decode can always preempt its way
            # to progress. Fail loudly rather than let the engine loop spin.
            raise RuntimeError(
                f"scheduler made no progress: {self.num_running} running, {self.num_waiting} "
                f"waiting, {self.block_manager.num_free_blocks} free blocks"
            )
        return None

    def _schedule_unified(self) -> StepPlan | None:
        """vLLM V1's step: every running decode first, then prefill chunks in what is left of
        the token budget, so a long prompt arriving never stalls the decodes for its whole
        prefill. A step that had to preempt admits nobody new (as vLLM): the victims would
        only be readmitted at once."""
        preempted: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        decodes = self._schedule_decode(preempted, copies)
        budget = self.max_num_batched_tokens - len(decodes)
        prefills = self._schedule_prefill(budget, admit=not preempted)
        if not decodes and not prefills:
            return None
        return StepPlan(
            is_prefill=bool(prefills),
            scheduled=tuple(decodes + prefills),
            preempted=tuple(preempted),
            block_copies=tuple(copies),
            num_decodes=len(decodes),
        )

    def _schedule_separate(self) -> StepPlan | None:
        """The step before unified steps: a prefill step whenever some prefill can run, a
        decode step otherwise (`unified=False`: for comparison)."""
        scheduled = self._schedule_prefill(self.max_num_batched_tokens)
        if scheduled:
            return StepPlan(is_prefill=True, scheduled=tuple(scheduled), preempted=())
        preempted: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        scheduled = self._schedule_decode(preempted, copies)
        if scheduled:
            return StepPlan(
                is_prefill=False,
                scheduled=tuple(scheduled),
                preempted=tuple(preempted),
                block_copies=tuple(copies),
            )
        return None

    def _schedule_prefill(self, budget: int, admit: bool = True) -> list[ScheduledSeq]:
        """In-progress prefills first (admission order), then admissions from `waiting` (FIFO)
        unless `admit` is False, within `budget` tokens.

        Never preempts to make room: a prefill that finds no blocks ends the step's prefill
        planning, and decode (which frees blocks as sequences finish) goes on instead.
        """
        scheduled: list[ScheduledSeq] = []
        for seq in self.running:
            if seq.seq_id not in self._prefilling:
                continue
            if budget == 0 or len(scheduled) == self.max_prefill_seqs:
                return scheduled
            item = self._plan_chunk(seq, budget)
            if item is None:
                return scheduled
            scheduled.append(item)
            budget -= item.num_new_tokens
        while (
            admit
            and self.waiting
            and budget > 0
            and len(scheduled) < self.max_prefill_seqs
            and self._could_seat(self.waiting[0])
        ):
            seq = self.waiting[0]
            item = self._admit(seq, budget)
            if item is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if item.num_new_tokens == 0:  # forks with nothing left to prefill: they decode now
                self._fork(seq)
                continue
            self._prefilling.add(seq.seq_id)
            scheduled.append(item)
            budget -= item.num_new_tokens
        return scheduled

    def _admit(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        """Blocks for a waiting sequence: its longest cached prefix, then new blocks for its first
        chunk. -> that chunk (0 tokens when a parent of forks has nothing left to prefill), or
        None, changing nothing, if the blocks are not there.

        The last token is always computed, never reused, so the step that feeds it has its
        logits to sample from (a parent of forks stops before it anyway)."""
        cached = []
        if seq.reuse_cached_prefix:
            cached = self.block_manager.lookup(seq, seq.num_tokens - 1)
        start = len(cached) * self.block_manager.block_size
        num_new = min(self._tokens_to_prefill(seq) - start, budget)
        if not self.block_manager.allocate(seq, cached, start + num_new):
            return None
        seq.num_computed_tokens = start
        return ScheduledSeq(seq, num_new, start, samples=start + num_new == seq.num_tokens)

    def _seats_taken(self) -> int:
        """Running sequences plus the forks their parents will start once prefilled: each of
        those will run too, so a newcomer admitted into their seats would overfill the batch."""
        running = {seq.seq_id for seq in self.running}
        pending = sum(
            len(forks) for parent, forks in self._pending_forks.items() if parent in running
        )
        return len(self.running) + pending

    def _could_seat(self, seq: Sequence) -> bool:
        """Whether the batch has seats for `seq` and its forks now (blocks aside)."""
        return self._seats_taken() + self._group_size(seq) <= self.max_num_seqs

    def _group_size(self, seq: Sequence) -> int:
        return 1 + len(self._pending_forks.get(seq.seq_id, ()))

    def _tokens_to_prefill(self, seq: Sequence) -> int:
        """Uncomputed tokens to feed by prefill; a parent of forks holds back its last one."""
        return seq.num_uncomputed_tokens - (1 if self._pending_forks.get(seq.seq_id) else 0)

    def _fork(self, parent: Sequence) -> None:
        """Start the parent's samples on its prompt blocks; all of them decode from here."""
        self._prefilling.discard(parent.seq_id)
        for child in self._pending_forks.pop(parent.seq_id, []):
            del self._fork_parent[child.seq_id]
            child.block_table = self.block_manager.fork(parent.block_table)
            child.num_cached_blocks = parent.num_cached_blocks
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SequenceStatus.RUNNING
            self.running.append(child)

    def _plan_chunk(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        """The next prefill chunk of `seq` within `budget` tokens, with its blocks; None if no room."""
        start = seq.num_computed_tokens
        num_new = min(self._tokens_to_prefill(seq), budget)
        if not self.block_manager.ensure_capacity(seq, start + num_new):
            return None
        return ScheduledSeq(seq, num_new, start, samples=start + num_new == seq.num_tokens)

    def _schedule_decode(
        self, preempted: list[Sequence], copies: list[tuple[int, int]]
    ) -> list[ScheduledSeq]:
        """One token for each running sequence past prefill, preempting the newest when full."""
        scheduled: list[ScheduledSeq] = []
        for seq in [s for s in self.running if s.seq_id not in self._prefilling]:
            if seq.status is not SequenceStatus.RUNNING:  # preempted as a victim earlier
                continue
            assert seq.num_uncomputed_tokens == 1, f"seq {seq.seq_id} is not ready to decode"
            if seq.num_tokens > self.max_model_len:
                raise RuntimeError(
                    f"sequence {seq.seq_id} reached max_model_len ({self.max_model_len}); the "
                    "engine must finish it with reason 'length'"
                )
            while not self._make_room(seq, copies):
                # Victims come from the back of `running`, which holds only sequences not yet
                # scheduled in this step (or `seq` itself), so no planned item loses its blocks.
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, 1, seq.num_computed_tokens, samples=True))
        return scheduled

    def _make_room(self, seq: Sequence, copies: list[tuple[int, int]]) -> bool:
        """Blocks for `seq`'s next token, copying its shared partial last block first if needed."""
        position = seq.num_computed_tokens
        if position % self.block_manager.block_size:  # lands in an existing, partly filled block
            copy = self.block_manager.copy_on_write(seq, position // self.block_manager.block_size)
            if copy is None:
                return False
            if copy[0] != copy[1]:
                copies.append(copy)
        return self.block_manager.ensure_capacity(seq, seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: drop the KV, keep the outputs, requeue at the front."""
        self.running.remove(seq)
        self._prefilling.discard(seq.seq_id)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        # Victims are taken newest first, so pushing each to the front keeps admission order.
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        log = logger.warning if self.num_preemptions == 1 else logger.debug
        log(
            "Sequence %d is preempted by PreemptionMode.RECOMPUTE because there is not enough "
            "KV cache space. This can affect end-to-end performance. Increase "
            "kv_cache_memory_bytes / gpu_memory_utilization or decrease max_num_seqs to provide "
            "more KV cache memory. total_num_cumulative_preemption=%d",
            seq.seq_id,
            self.num_preemptions,
        )

    def can_run_ahead(self) -> bool:
        """Whether the next step can be planned before this one's tokens are known (async
        scheduling): every running sequence is decoding and will want another token whatever it
        samples now (max_tokens and max_model_len not reached), nothing waits to be admitted,
        and the free blocks cover one new block per sequence, so planning preempts nobody."""
        if self.waiting or self._prefilling or self._pending_forks or not self.running:
            return False
        if self.block_manager.num_free_blocks < len(self.running):
            return False
        return all(
            seq.num_output_tokens + 1 < seq.max_tokens and seq.num_tokens < self.max_model_len
            for seq in self.running
        )

    def reserve_steps(self, plan: StepPlan, max_steps: int) -> int:
        """How many decode steps `plan` may run in one multi-step call (vLLM's
        num_scheduler_steps), with the blocks of the later steps reserved now; 1 (reserving
        nothing) unless `plan` is a plain decode of every sequence with nothing else to plan:
        no prefill in progress, no fork pending, and nobody waiting who could be seated now (a
        full batch runs several steps while the queue waits for a seat, as in vLLM; a sequence
        that finishes early in the call holds its seat to the call's end).

        Steps stop short of any sequence's max_tokens and max_model_len, so each later step
        feeds every sequence that has not stopped, and are cut to what the free blocks cover:
        the device must find every block it writes into in the block tables it is given."""
        if (
            max_steps < 2
            or plan.is_prefill
            or plan.preempted
            or (self.waiting and self._could_seat(self.waiting[0]))
            or self._prefilling
            or self._pending_forks
            or len(plan.scheduled) != len(self.running)
        ):
            return 1
        seqs = [item.seq for item in plan.scheduled]
        steps = min(
            max_steps,
            *(seq.max_tokens - seq.num_output_tokens for seq in seqs),
            *(self.max_model_len - seq.num_tokens + 1 for seq in seqs),
        )
        free = self.block_manager.num_free_blocks
        needed = self.block_manager.blocks_needed
        while steps > 1 and sum(needed(seq, seq.num_tokens + steps - 1) for seq in seqs) > free:
            steps -= 1
        if steps > 1:
            for seq in seqs:  # covered by the free blocks counted above
                if not self.block_manager.ensure_capacity(seq, seq.num_tokens + steps - 1):
                    raise RuntimeError(f"sequence {seq.seq_id}: lookahead blocks vanished")
        return max(steps, 1)

    def next_decode(self, plan: StepPlan) -> StepPlan:
        """The decode step after `plan` for its sequences that are still running: the plans a
        multi-step call ran after its first (`reserve_steps` reserved their blocks), replayed
        at read-back so each goes through `update` like any step."""
        return StepPlan(
            is_prefill=False,
            scheduled=tuple(
                ScheduledSeq(item.seq, 1, item.seq.num_computed_tokens, samples=True)
                for item in plan.scheduled
                if not item.seq.is_finished
            ),
            preempted=(),
        )

    # ---- results -----------------------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: dict[int, int]) -> list[Sequence]:
        """Record a finished step; returns the sequences that got a new token, in plan order.

        The engine checks stop conditions on exactly those and calls `finish` on the ones done.
        Sequences aborted between schedule() and update() are skipped.
        """
        grew: list[Sequence] = []
        for item in plan.scheduled:
            seq = item.seq
            if seq.is_finished:
                continue
            assert seq.num_computed_tokens == item.start, f"seq {seq.seq_id}: stale plan"
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if self._pending_forks.get(seq.seq_id) and self._tokens_to_prefill(seq) == 0:
                self._fork(seq)
            if item.samples:
                self._prefilling.discard(seq.seq_id)
                seq.append_token(sampled[seq.seq_id])
                grew.append(seq)
        return grew

    def finish(self, seq: Sequence, reason: str | None = None, stop_reason=None) -> None:
        """Release a finished sequence's blocks and forget it.

        Pass `reason` to mark it finished here, or call `seq.finish(...)` first and omit it.
        """
        if reason is not None:
            seq.finish(reason, stop_reason)
        elif not seq.is_finished:
            raise ValueError(f"sequence {seq.seq_id} is not finished: pass a finish reason")
        if self._seqs.pop(seq.seq_id, None) is None:
            return  # already finished or aborted
        parent_id = self._fork_parent.pop(seq.seq_id, None)
        if parent_id is not None:  # a sample still waiting for its parent's prompt
            self._pending_forks[parent_id].remove(seq)
            return
        for child in self._pending_forks.pop(seq.seq_id, []):  # the parent goes: its forks too
            del self._fork_parent[child.seq_id]
            self._seqs.pop(child.seq_id, None)
            child.finish(seq.finish_reason or "abort")
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._prefilling.discard(seq.seq_id)
        self.block_manager.free(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish `seq_id` with reason "abort"; returns it, or None if unknown or already done."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        self.finish(seq, "abort")
        return seq
