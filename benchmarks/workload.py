"""The seeded workload every throughput-style benchmark runs: lengths, token ids, engine limits.

benchmarks/throughput.py's docstring says why it is drawn this way (log-uniform lengths, uniform
ids, greedy with `ignore_eos`, so every engine does the same work whatever the weights say); the
other benchmarks (batch_invariant, parallel, prefix_caching, structured_outputs, vs_llamacpp) reuse
it so their numbers compare with throughput.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BLOCK_SIZE = 16
FIRST_TOKEN_ID = 16  # stay clear of the special tokens at the start of the vocabulary


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    max_num_seqs: int
    max_num_batched_tokens: int
    hf_batch_size: int

    @property
    def max_model_len(self) -> int:
        longest = self.prompt_range[1] + self.output_range[1]
        return -(-longest // BLOCK_SIZE) * BLOCK_SIZE


FULL = WorkloadSpec(
    256, (16, 512), (16, 256), max_num_seqs=64, max_num_batched_tokens=512, hf_batch_size=16
)
QUICK = WorkloadSpec(
    16, (8, 64), (8, 32), max_num_seqs=8, max_num_batched_tokens=128, hf_batch_size=8
)


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def median_prompt(self) -> list[int]:
        order = sorted(range(len(self.prompts)), key=lambda i: len(self.prompts[i]))
        return self.prompts[order[len(order) // 2]]


def _log_uniform(rng: np.random.Generator, low: int, high: int, n: int) -> list[int]:
    draws = np.exp(rng.uniform(math.log(low), math.log(high + 1), size=n))
    return [int(min(high, max(low, d))) for d in draws]


def make_workload(spec: WorkloadSpec, seed: int, vocab_size: int) -> Workload:
    """Lengths depend only on the seed; ids on the seed and the vocabulary."""
    lengths_rng, ids_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    prompt_lens = _log_uniform(lengths_rng, *spec.prompt_range, spec.num_requests)
    output_lens = _log_uniform(lengths_rng, *spec.output_range, spec.num_requests)
    prompts = [ids_rng.integers(FIRST_TOKEN_ID, vocab_size, size=n).tolist() for n in prompt_lens]
    return Workload(prompts, output_lens)
