"""Run prompts through the engine's own paged prefill path and return every token's logits.

Used to compare against `transformers` logits: the sequences go through the real block manager,
bucket padding, cache writes and paged attention, optionally in several chunks so that later chunks
read earlier ones back from the cache.
"""

from __future__ import annotations

import numpy as np

from jaxinfer import Engine, SamplingParams
from jaxinfer.engine.batching import RowSampling, build_step_inputs
from jaxinfer.engine.sequence import Sequence
from jaxinfer.engine.step_plan import ScheduledSeq, StepPlan


def engine_prefill_logits(
    engine: Engine, prompts: list[list[int]], chunk_size: int | None = None
) -> list[np.ndarray]:
    """-> per prompt, logits [len(prompt), vocab], computed chunk by chunk over a shared batch."""
    block_size = engine.config.block_size
    seqs = [
        Sequence(seq_id=10_000 + i, prompt_token_ids=list(p), max_tokens=1)
        for i, p in enumerate(prompts)
    ]
    greedy = SamplingParams(temperature=0.0)
    padding_slot = engine.llm_engine.runner.slot_state.padding_slot
    sampling = {seq.seq_id: RowSampling(greedy, seed=0, slot=padding_slot) for seq in seqs}
    pieces: list[list[np.ndarray]] = [[] for _ in prompts]
    try:
        while any(seq.num_computed_tokens < seq.num_tokens for seq in seqs):
            scheduled, rows = [], []
            for row, seq in enumerate(seqs):
                start = seq.num_computed_tokens
                if start == seq.num_tokens:
                    continue
                count = seq.num_tokens - start
                if chunk_size is not None:
                    count = min(count, chunk_size)
                assert engine.llm_engine.block_manager.ensure_capacity(seq, start + count)
                scheduled.append(ScheduledSeq(seq, count, start, start + count == seq.num_tokens))
                rows.append(row)
            plan = StepPlan(is_prefill=True, scheduled=tuple(scheduled), preempted=())
            bucket = engine.llm_engine.buckets.select(plan, block_size)
            inputs = build_step_inputs(
                plan,
                bucket,
                block_size,
                sampling,
                padding_slot=padding_slot,
                vocab_size=engine.vocab_size,
            )
            logits = engine.llm_engine.runner.all_logits(bucket, inputs)
            for row, item, begin, end in zip(
                rows,
                scheduled,
                inputs.query_start_loc[:-1],
                inputs.query_start_loc[1:],
                strict=False,
            ):
                pieces[row].append(logits[begin:end])
                item.seq.num_computed_tokens += item.num_new_tokens
    finally:
        for seq in seqs:
            engine.llm_engine.block_manager.free(seq)
    return [np.concatenate(p) for p in pieces]
