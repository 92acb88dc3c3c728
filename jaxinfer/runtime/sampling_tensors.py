"""Per-row sampling parameters as arrays padded with neutral values, and their numpy builder.

Everything the sampler needs arrives as one registered pytree of arrays whose shapes depend only on
(num_rows S, vocab_size V), so a new mix of parameters never recompiles: a disabled feature is a
neutral value (top_k 0, top_p 1, bias 0, mask True, penalty 1 or 0), not a different program.

Memory: the five [S, V] arrays take 11 bytes per entry (f32 bias, i32 counts, three bool masks):
64 rows x 151,936 tokens = 107 MB, 64 x 32,000 = 23 MB. Dense is fine at S <= 64 and keeps every
step a few elementwise passes; far larger batches would want sparse (row, token, value) lists.

Host/device split: `SamplingRow` and `build_sampling_tensors` are numpy only (the runner turns the
result into device arrays); `advance` is the device-side update a multi-step decode loop applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.sampling_params import SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling state for one batch of S rows over a vocabulary of V tokens.

    Neutral (padding) rows are greedy with every feature off, so an all-padding or all-greedy
    batch takes the sampler's draw-free fast path.

    A row's random key is `fold_in(key(seeds[r]), positions[r])` (threefry): the token a request
    draws at output position t is a function of its seed and t only, never of its batch, bucket or
    slot. For n > 1 the host folds the sample index into the seed (`row_seed`).
    """

    temperature: Any  # [S] f32; < GREEDY_TEMPERATURE means greedy
    top_k: Any  # [S] i32; 0 = off
    top_p: Any  # [S] f32; 1 = off
    min_p: Any  # [S] f32; 0 = off
    presence_penalty: Any  # [S] f32; 0 = off
    frequency_penalty: Any  # [S] f32; 0 = off
    repetition_penalty: Any  # [S] f32; 1 = off
    min_tokens: Any  # [S] i32; stop_mask applies while num_output_tokens < min_tokens
    num_output_tokens: Any  # [S] i32; tokens generated so far by this row's sequence
    seeds: Any  # [S] u32; see row_seed
    positions: Any  # [S] i32; output position of the token being sampled (folded into the key)
    logit_bias: Any  # [S, V] f32; 0 = neutral
    allowed_mask: Any  # [S, V] bool; False = banned (allowed_token_ids, bad words)
    stop_mask: Any  # [S, V] bool; eos and stop_token_ids, banned while min_tokens is unmet
    output_counts: Any  # [S, V] i32; occurrences of each token in the row's output so far
    prompt_mask: Any  # [S, V] bool; token occurs in the prompt (repetition penalty only)

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.logit_bias.shape[1]

    @classmethod
    def neutral(cls, num_rows: int, vocab_size: int) -> SamplingTensors:
        """Padding rows (numpy): greedy, no penalties, no masks, no bias."""
        s, v = num_rows, vocab_size
        return cls(
            temperature=np.zeros(s, np.float32),
            top_k=np.zeros(s, np.int32),
            top_p=np.ones(s, np.float32),
            min_p=np.zeros(s, np.float32),
            presence_penalty=np.zeros(s, np.float32),
            frequency_penalty=np.zeros(s, np.float32),
            repetition_penalty=np.ones(s, np.float32),
            min_tokens=np.zeros(s, np.int32),
            num_output_tokens=np.zeros(s, np.int32),
            seeds=np.zeros(s, np.uint32),
            positions=np.zeros(s, np.int32),
            logit_bias=np.zeros((s, v), np.float32),
            allowed_mask=np.ones((s, v), bool),
            stop_mask=np.zeros((s, v), bool),
            output_counts=np.zeros((s, v), np.int32),
            prompt_mask=np.zeros((s, v), bool),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingRow:
    """What the host knows about one row at one step.

    `banned_token_ids` carries the bad words banned at this step: every single-token bad word,
    and the last token of each multi-token bad word whose prefix ends the output (vLLM's rule,
    which needs the output history, so the engine evaluates it on the host each step).
    `eos_token_ids` are banned with `stop_token_ids` while `min_tokens` is unmet (vLLM bans eos
    then even with `ignore_eos`).
    """

    params: SamplingParams
    seed: int  # uint32, see row_seed
    position: int | None = None  # default: len(output_token_ids)
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    eos_token_ids: Sequence[int] = ()
    banned_token_ids: Sequence[int] = ()


def build_sampling_tensors(rows: Sequence[SamplingRow | None], vocab_size: int) -> SamplingTensors:
    """numpy SamplingTensors for `rows` (None = padding), one row per entry, in order."""
    t = SamplingTensors.neutral(len(rows), vocab_size)
    for r, row in enumerate(rows):
        if row is None:
            continue
        p = row.params
        t.temperature[r] = p.temperature
        t.top_k[r] = p.top_k
        t.top_p[r] = p.top_p
        t.min_p[r] = p.min_p
        t.presence_penalty[r] = p.presence_penalty
        t.frequency_penalty[r] = p.frequency_penalty
        t.repetition_penalty[r] = p.repetition_penalty
        t.min_tokens[r] = p.min_tokens
        t.num_output_tokens[r] = len(row.output_token_ids)
        t.seeds[r] = row.seed
        t.positions[r] = len(row.output_token_ids) if row.position is None else row.position
        if p.logit_bias:
            t.logit_bias[r, list(p.logit_bias)] = list(p.logit_bias.values())
        if p.allowed_token_ids is not None:
            t.allowed_mask[r] = False
            t.allowed_mask[r, p.allowed_token_ids] = True
        t.allowed_mask[r, list(row.banned_token_ids)] = False
        t.stop_mask[r, list(row.eos_token_ids) + list(p.stop_token_ids)] = True
        if len(row.output_token_ids):
            t.output_counts[r] = np.bincount(row.output_token_ids, minlength=vocab_size)
        t.prompt_mask[r, list(row.prompt_token_ids)] = True
    return t


def advance(t: SamplingTensors, tokens: jax.Array, active: jax.Array) -> SamplingTensors:
    """Device-side: count each active row's sampled token and move it to the next position.

    tokens [S] int32, active [S] bool (False for padding rows and rows that just finished).
    """
    step = active.astype(jnp.int32)  # [S]
    rows = jnp.arange(tokens.shape[0])
    return dataclasses.replace(
        t,
        output_counts=jnp.asarray(t.output_counts).at[rows, tokens].add(step),
        num_output_tokens=t.num_output_tokens + step,
        positions=t.positions + step,
    )
