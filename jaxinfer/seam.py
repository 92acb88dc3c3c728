"""The host/device contract: what one step takes and gives back, declared once, no JAX here.

The host (`engine/`) fills a `StepInputs` with numpy arrays of one bucket's exact shape; the device
(`runtime/`) registers these dataclasses as pytrees (`runtime/seam_pytrees.py`) and derives the
abstract shapes it compiles against from `StepInputs.spec(bucket)`, so a field's shape and dtype are
written in exactly one place. Shapes use the bucket's letters:

    T  tokens in the step (padded)        S  sequences (rows) in the step (padded)
    B  block-table width (blocks per row) K  top logprobs a step can return (engine-wide)
    W  int32 words of a packed token mask, ceil(vocab_size / 32)

Why plain dataclasses and not `flax.struct`: `flax.struct.dataclass` registers the pytree at class
creation, which imports JAX, and this module must stay importable (and testable) without it. The
device side registers the same classes with `jax.tree_util.register_dataclass`, which is all that
`flax.struct` would do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

MAX_BANNED_PER_STEP = 8  # bad-word bans of one row in one step (multi-token bad words)


@dataclass(frozen=True, order=True)
class Bucket:
    """One compiled shape. Decode buckets have T == S (one token per sequence).

    A prefill bucket may lead with `num_decode_seqs` decode rows (a unified step: running decodes
    and prefill chunks together): rows 0..D-1 own exactly tokens 0..D-1, one each, and the
    prefill rows' ragged tokens follow from token D on. The device runs attention for the two
    parts with their own formulations and everything else (projections, MLP, sampler) once.
    """

    is_prefill: bool
    num_tokens: int  # T
    num_seqs: int  # S
    num_blocks: int  # B: block-table width
    num_decode_seqs: int = 0  # D: leading one-token decode rows of a prefill bucket

    @property
    def decode_rows(self) -> int:
        """Leading rows that own one token each: all of them in a decode bucket."""
        return self.num_decode_seqs if self.is_prefill else self.num_seqs

    def describe(self) -> str:
        """The bucket in words, for the log and the progress bar."""
        if self.num_decode_seqs:
            return (
                f"the unified step for {self.num_decode_seqs} decodes and "
                f"{self.num_tokens - self.num_decode_seqs} prefill tokens of "
                f"{self.num_seqs - self.num_decode_seqs} sequences"
            )
        if self.is_prefill:
            return f"the prefill step for {self.num_tokens} tokens of {self.num_seqs} sequences"
        return f"the decode step for {self.num_seqs} sequences"


@dataclass(frozen=True, order=True)
class EncoderBucket:
    """One compiled encoder call: a dense [num_seqs, seq_len] batch of token ids."""

    num_seqs: int
    seq_len: int


@dataclass(frozen=True)
class ArraySpec:
    """A field's declared shape (letters of the legend above, or ints) and dtype."""

    shape: tuple[str | int, ...]
    dtype: type

    def resolve(self, sizes: dict[str, int]) -> tuple[tuple[int, ...], np.dtype]:
        dims = tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)
        return dims, np.dtype(self.dtype)


def _array(*shape: str | int, dtype: type) -> np.ndarray:
    """A dataclass field holding an array of the declared shape and dtype."""
    return field(metadata={"spec": ArraySpec(tuple(shape), dtype)})


def _sizes(bucket: Bucket, num_logprobs: int = 0, vocab_size: int = 1) -> dict[str, int]:
    return {
        "T": bucket.num_tokens,
        "S": bucket.num_seqs,
        "B": bucket.num_blocks,
        "S+1": bucket.num_seqs + 1,
        "K": num_logprobs,
        "W": -(-vocab_size // 32),
    }


class _Declared:
    """Shared helpers of the declared dataclasses below: their specs, and zero-filled instances."""

    @classmethod
    def specs(cls) -> dict[str, ArraySpec | type]:
        """Field name -> its ArraySpec, or the nested declared dataclass."""
        out: dict[str, ArraySpec | type] = {}
        for f in dataclasses.fields(cls):
            out[f.name] = f.metadata["spec"] if "spec" in f.metadata else f.metadata["nested"]
        return out

    @classmethod
    def build(cls, bucket: Bucket, leaf, num_logprobs: int = 0, vocab_size: int = 1):
        """An instance whose every array field is `leaf(name, shape, dtype)`; nested classes too.
        `vocab_size` sizes the packed token mask (W); the runner passes the model's."""
        sizes = _sizes(bucket, num_logprobs, vocab_size)
        values = {}
        for name, spec in cls.specs().items():
            if isinstance(spec, ArraySpec):
                shape, dtype = spec.resolve(sizes)
                values[name] = leaf(name, shape, dtype)
            else:
                values[name] = spec.build(bucket, leaf, num_logprobs, vocab_size)
        return cls(**values)

    @classmethod
    def spec(cls, bucket: Bucket, num_logprobs: int = 0, vocab_size: int = 1):
        """An instance whose leaves are (shape, dtype) pairs: the runner's abstract inputs."""
        return cls.build(bucket, lambda _, shape, dtype: (shape, dtype), num_logprobs, vocab_size)

    def check(self, bucket: Bucket, num_logprobs: int = 0, vocab_size: int = 1) -> None:
        """Raise if any array differs from its declared shape or dtype (tests, debugging)."""
        expected = type(self).spec(bucket, num_logprobs, vocab_size)
        for name, value in self.__dict__.items():
            want = getattr(expected, name)
            if isinstance(value, _Declared):
                value.check(bucket, num_logprobs, vocab_size)
            elif (value.shape, value.dtype) != want:
                raise ValueError(
                    f"{type(self).__name__}.{name}: {value.shape} {value.dtype} != {want}"
                )


# Padding rows carry these values: greedy, no penalties, nothing banned.
NEUTRAL_SAMPLING = {"top_p": 1.0, "repetition_penalty": 1.0}


@dataclass(frozen=True, kw_only=True)
class SamplingScalars(_Declared):
    """Per-row sampling scalars [S]; the [V]-wide state stays on the device (slot_state.py)."""

    temperature: np.ndarray = _array("S", dtype=np.float32)
    top_k: np.ndarray = _array("S", dtype=np.int32)
    top_p: np.ndarray = _array("S", dtype=np.float32)
    min_p: np.ndarray = _array("S", dtype=np.float32)
    presence_penalty: np.ndarray = _array("S", dtype=np.float32)
    frequency_penalty: np.ndarray = _array("S", dtype=np.float32)
    repetition_penalty: np.ndarray = _array("S", dtype=np.float32)
    min_tokens: np.ndarray = _array("S", dtype=np.int32)
    num_output_tokens: np.ndarray = _array("S", dtype=np.int32)
    seeds: np.ndarray = _array("S", dtype=np.uint32)
    positions: np.ndarray = _array("S", dtype=np.int32)  # output position folded into the key

    @classmethod
    def neutral(cls, bucket: Bucket) -> SamplingScalars:
        return cls.build(
            bucket, lambda name, shape, dtype: np.full(shape, NEUTRAL_SAMPLING.get(name, 0), dtype)
        )


@dataclass(frozen=True, kw_only=True)
class StepInputs(_Declared):
    """Host arrays of one bucket's exact shape; the runner ships them to the device as they are.

    Padding is inert by construction: padded tokens write their K/V into reserved block 0, padded
    sequences have no tokens and context length 0, and padded block-table entries point at block 0.
    """

    token_ids: np.ndarray = _array("T", dtype=np.int32)
    positions: np.ndarray = _array("T", dtype=np.int32)
    slot_mapping: np.ndarray = _array("T", dtype=np.int32)  # block * block_size + offset
    block_tables: np.ndarray = _array("S", "B", dtype=np.int32)
    context_lens: np.ndarray = _array("S", dtype=np.int32)  # tokens in the cache after this step
    query_start_loc: np.ndarray = _array("S+1", dtype=np.int32)
    logits_indices: np.ndarray = _array("S", dtype=np.int32)  # last token of each sequence
    slots: np.ndarray = _array("S", dtype=np.int32)  # sampling-state row (padding: padding slot)
    sampled: np.ndarray = _array("S", dtype=np.bool_)  # the row samples a token this step
    want_logprobs: np.ndarray = _array("S", dtype=np.bool_)
    banned: np.ndarray = _array("S", MAX_BANNED_PER_STEP, dtype=np.int32)  # vocab_size = none
    # The prompt token after token t when its prompt logprob is wanted; vocab_size otherwise.
    prompt_next_ids: np.ndarray = _array("T", dtype=np.int32)
    # Structured outputs: packed allowed-token bits (bit t % 32 of word t // 32 = token t), from
    # the row's grammar matcher; all ones (-1) = no constraint, as every row without a grammar.
    token_bitmask: np.ndarray = _array("S", "W", dtype=np.int32)
    sampling: SamplingScalars = field(metadata={"nested": SamplingScalars})

    def replace(self, **changes) -> StepInputs:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class StepOutputs(_Declared):
    """What a step gives back: per row [S] the sampled token and its logprob; per token [T] the
    prompt logprobs (zeros unless some row asked). K = the engine's top-logprob count."""

    tokens: np.ndarray = _array("S", dtype=np.int32)
    token_logprob: np.ndarray = _array("S", dtype=np.float32)  # raw log-softmax (vLLM's default)
    token_rank: np.ndarray = _array("S", dtype=np.int32)
    top_ids: np.ndarray = _array("S", "K", dtype=np.int32)
    top_logprobs: np.ndarray = _array("S", "K", dtype=np.float32)
    prompt_logprob: np.ndarray = _array("T", dtype=np.float32)
    prompt_rank: np.ndarray = _array("T", dtype=np.int32)
    prompt_top_ids: np.ndarray = _array("T", "K", dtype=np.int32)
    prompt_top_logprobs: np.ndarray = _array("T", "K", dtype=np.float32)
    # Per row: the model's logits held no NaN or inf. A row without it sampled nothing real (its
    # token is whatever an argmax over NaN gives): the host ends that request with an error.
    logits_finite: np.ndarray = _array("S", dtype=np.bool_)

    def step(self, index: int) -> StepOutputs:
        """One step of a multi-step decode's outputs, whose per-row fields are stacked
        [steps, S, ...] (runtime/multi_step.py): those fields at `index`, the rest as they are."""
        return dataclasses.replace(
            self, **{name: getattr(self, name)[index] for name in STEP_ROW_FIELDS}
        )


# StepOutputs' per-row fields: the ones a multi-step decode stacks, one entry per step.
STEP_ROW_FIELDS = (
    "tokens",
    "token_logprob",
    "token_rank",
    "top_ids",
    "top_logprobs",
    "logits_finite",
)
