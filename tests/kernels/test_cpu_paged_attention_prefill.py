"""The CPU paged-attention kernel on prefill chunks: ragged tokens of several sequences in one call.

Each sequence feeds `q_len` new tokens after `cached` positions already in the cache (a fresh
prompt: cached 0; a prefix-cache hit or a later chunk of chunked prefill: cached > 0). Against a
float64 numpy implementation and with the jnp reference's own error as the yardstick, as in
test_cpu_paged_attention.py (same FACTOR, same reasoning): cache slots that are not a real
earlier position of their sequence are NaN, and so are the padding tokens' q / k_new / v_new.
Also: a sequence's bits do not depend on the others or the threads, the AVX2 and portable builds
give the same bits, and the "reference" backend lowers prefill calls to the kernel on the CPU
(the engine's greedy tokens with and without it: test_cpu_paged_attention.py's engine test).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.kernels import paged_attention_cpu as kernel
from jaxinfer.runtime.attention_backend import attention_fn
from pallas_kernels import reference
from tests.kernels.test_cpu_paged_attention import (
    OTHER_ISAS,
    RaggedCase,
    _args,
    _run,
    assert_other_isa_gives_the_same_bits,
    check_against_float64,
    make_ragged_batch,
    numpy_attention,
)

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the kernel is registered for XLA:CPU only"
)


CASES = {
    # fresh prompts of 1, 16, 17 and 40 tokens; a prefix hit (16 cached + 9); a later chunk of
    # chunked prefill (33 cached + 20, crossing blocks): the rows a unified step's prefill holds
    "gqa3-d64": RaggedCase(seqs=((0, 1), (0, 16), (0, 17), (16, 9), (33, 20), (0, 40))),
    "mha-d24-p8": RaggedCase(  # a head dim with a lane tail, 8-token blocks, more than P new
        seqs=((0, 5), (8, 19), (3, 30)), group=1, head_dim=24, block_size=8, width=5
    ),
}


@pytest.mark.parametrize("window", [None, 1, 7, 20])
@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_error_within_a_factor_of_the_references(name, window, cap):
    case = CASES[name]
    batch = make_ragged_batch(case, seed=len(name) + (window or 0))
    check_against_float64(
        batch, reference.paged_attention, numpy_attention, group=case.group,
        scale=case.head_dim**-0.5, window=window, cap=cap,
    )  # fmt: skip


def test_a_tokens_result_does_not_depend_on_the_other_sequences_or_threads():
    """A sequence's tokens give the same bits alone, beside other sequences, on one thread or
    two; and a decode row (one new token) gives the same bits as the decode-only call."""
    case = CASES["gqa3-d64"]
    batch = make_ragged_batch(case, seed=11)
    static = {"scale": 0.125, "sliding_window": None, "soft_cap": None}
    together = _run(kernel.paged_attention, batch, **static)
    for threads in (1, 2):
        again = _run(kernel.paged_attention, batch, max_threads=threads, **static)
        np.testing.assert_array_equal(again, together)
    starts = batch["query_start_loc"]
    for s in (3, 4):  # a prefix hit, a later chunk
        tokens = slice(int(starts[s]), int(starts[s + 1]))
        alone = {n: batch[n][tokens] for n in ("q", "k_new", "v_new")}
        alone |= {n: batch[n][s : s + 1] for n in ("block_tables", "context_lens")}
        alone |= {"k_cache": batch["k_cache"], "v_cache": batch["v_cache"]}
        alone["query_start_loc"] = np.array([0, tokens.stop - tokens.start], np.int32)
        np.testing.assert_array_equal(
            _run(kernel.paged_attention, alone, **static), together[tokens]
        )


def test_the_reference_backend_sends_prefill_calls_to_the_kernel_on_cpu(monkeypatch):
    batch = make_ragged_batch(CASES["gqa3-d64"], seed=5)
    local = attention_fn("reference")

    def lowered(cache_dtype=jnp.float32) -> str:
        function = jax.jit(lambda *a: local(*a, scale=0.125, decode_only=False))
        return function.lower(*_args(batch, cache_dtype)).compile().as_text()

    assert "jaxinfer_paged_attention_f32" in lowered()
    assert "jaxinfer_paged_attention_bf16" in lowered(jnp.bfloat16)
    assert "jaxinfer_paged_attention" not in lowered(jnp.float16)
    np.testing.assert_array_equal(
        _run(local, batch, scale=0.125, decode_only=False),
        _run(kernel.paged_attention, batch, scale=0.125),
    )
    monkeypatch.setenv("JAXINFER_CPU_KERNELS", "0")
    assert "jaxinfer_paged_attention" not in lowered()


@pytest.mark.parametrize(("isa", "flags"), OTHER_ISAS)
def test_other_instruction_sets_give_the_same_bits_on_prefill_chunks(isa, flags):
    batch = make_ragged_batch(CASES["mha-d24-p8"], seed=3)
    assert_other_isa_gives_the_same_bits(isa, flags, batch, window=11, cap=4.0)
