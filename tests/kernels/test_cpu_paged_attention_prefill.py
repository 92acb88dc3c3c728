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

import ctypes
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.kernels import paged_attention_cpu as kernel
from jaxinfer.kernels.native_build import build_shared_library
from jaxinfer.runtime.attention_backend import attention_fn
from pallas_kernels import reference
from tests.kernels.test_cpu_paged_attention import FACTOR, _args, _run

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the kernel is registered for XLA:CPU only"
)


@dataclass(frozen=True, kw_only=True)
class PrefillCase:
    seqs: tuple[tuple[int, int], ...]  # (cached positions, new tokens) of each sequence
    padding_tokens: int = 3
    padding_seqs: int = 1  # table rows with no tokens (a bucket's spare sequence slots)
    kv_heads: int = 2
    group: int = 3
    head_dim: int = 64
    block_size: int = 16
    width: int = 6
    spare_blocks: int = 3


def make_prefill_batch(case: PrefillCase, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    kv, group, dim, size = case.kv_heads, case.group, case.head_dim, case.block_size
    rows = len(case.seqs) + case.padding_seqs
    needed = [math.ceil((c + n) / size) for c, n in case.seqs]
    assert max(needed) <= case.width
    num_blocks = 1 + sum(needed) + case.spare_blocks
    pool = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((rows, case.width), np.int32)
    k_cache = np.full((kv, num_blocks, size, dim), np.nan, np.float32)
    v_cache = np.full_like(k_cache, np.nan)
    used = 0
    for s, ((cached, _), count) in enumerate(zip(case.seqs, needed, strict=True)):
        tables[s, :count] = pool[used : used + count]
        used += count
        for position in range(cached):  # the new tokens' own slots stay NaN
            block, offset = tables[s, position // size], position % size
            k_cache[:, block, offset] = rng.standard_normal((kv, dim))
            v_cache[:, block, offset] = rng.standard_normal((kv, dim))
    real = sum(n for _, n in case.seqs)
    tokens = real + case.padding_tokens
    q = rng.standard_normal((tokens, kv * group, dim)).astype(np.float32)
    k_new = rng.standard_normal((tokens, kv, dim)).astype(np.float32)
    v_new = rng.standard_normal((tokens, kv, dim)).astype(np.float32)
    for array in (q, k_new, v_new):
        array[real:] = np.nan
    starts = np.cumsum([0] + [n for _, n in case.seqs] + [0] * case.padding_seqs)
    return {
        "q": q,
        "k_new": k_new,
        "v_new": v_new,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": tables,
        "context_lens": np.array([c + n for c, n in case.seqs] + [0] * case.padding_seqs, np.int32),
        "query_start_loc": starts.astype(np.int32),
    }


def numpy_prefill_attention(batch, *, scale, window=None, cap=None) -> np.ndarray:
    """Each real token's heads over its sequence's cached positions and the step's tokens up to
    itself (inside the window), float64."""
    q, k_cache, v_cache = (batch[n].astype(np.float64) for n in ("q", "k_cache", "v_cache"))
    k_new, v_new = batch["k_new"].astype(np.float64), batch["v_new"].astype(np.float64)
    heads = q.shape[1]
    group, size = heads // k_cache.shape[0], k_cache.shape[2]
    starts = batch["query_start_loc"]
    out = np.zeros(q.shape)
    for s in range(len(starts) - 1):
        q_len = int(starts[s + 1] - starts[s])
        cached = int(batch["context_lens"][s]) - q_len
        for i in range(q_len):
            t, position = int(starts[s]) + i, cached + i
            visible = [p for p in range(position + 1) if window is None or p > position - window]
            for h in range(heads):
                kh = h // group
                keys, values = [], []
                for p in visible:
                    if p < cached:
                        block, offset = batch["block_tables"][s, p // size], p % size
                        keys.append(k_cache[kh, block, offset])
                        values.append(v_cache[kh, block, offset])
                    else:
                        keys.append(k_new[int(starts[s]) + p - cached, kh])
                        values.append(v_new[int(starts[s]) + p - cached, kh])
                scores = np.stack(keys) @ (q[t, h] * scale)
                if cap is not None:
                    scores = cap * np.tanh(scores / cap)
                weights = np.exp(scores - scores.max())
                out[t, h] = weights @ np.stack(values) / weights.sum()
    return out


CASES = {
    # fresh prompts of 1, 16, 17 and 40 tokens; a prefix hit (16 cached + 9); a later chunk of
    # chunked prefill (33 cached + 20, crossing blocks): the rows a unified step's prefill holds
    "gqa3-d64": PrefillCase(seqs=((0, 1), (0, 16), (0, 17), (16, 9), (33, 20), (0, 40))),
    "mha-d24-p8": PrefillCase(  # a head dim with a lane tail, 8-token blocks, more than P new
        seqs=((0, 5), (8, 19), (3, 30)), group=1, head_dim=24, block_size=8, width=5
    ),
}


@pytest.mark.parametrize("window", [None, 1, 7, 20])
@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_error_within_a_factor_of_the_references(name, window, cap):
    case = CASES[name]
    batch = make_prefill_batch(case, seed=len(name) + (window or 0))
    static = {"scale": case.head_dim**-0.5, "sliding_window": window, "soft_cap": cap}
    got = _run(kernel.paged_attention, batch, **static)
    ours = _run(reference.paged_attention, batch, **static)
    exact = numpy_prefill_attention(batch, scale=static["scale"], window=window, cap=cap)
    real = int(batch["query_start_loc"][-1])
    assert np.isfinite(got).all()
    assert (got[real:] == 0).all(), "padding tokens output zeros"
    error, yardstick = np.abs(got - exact).max(), np.abs(ours - exact).max()
    assert error <= FACTOR * yardstick, (error, yardstick)
    if window == 1:  # only the token itself is visible: its value row, exactly
        np.testing.assert_array_equal(got[:real], np.repeat(batch["v_new"][:real], case.group, 1))


def test_a_tokens_result_does_not_depend_on_the_other_sequences_or_threads():
    """A sequence's tokens give the same bits alone, beside other sequences, on one thread or
    two; and a decode row (one new token) gives the same bits as the decode-only call."""
    case = CASES["gqa3-d64"]
    batch = make_prefill_batch(case, seed=11)
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
    batch = make_prefill_batch(CASES["gqa3-d64"], seed=5)
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


@pytest.mark.parametrize(
    ("isa", "flags"),
    [("avx2", ("-mno-avx512f",)), ("portable", ("-mno-avx2", "-mno-fma", "-mno-avx512f"))],
)
def test_other_instruction_sets_give_the_same_bits_on_prefill_chunks(isa, flags):
    path = build_shared_library(kernel.SOURCE, (jax.ffi.include_dir(),), extra_flags=flags)
    assert path is not None
    library = ctypes.CDLL(str(path))
    case = CASES["mha-d24-p8"]
    batch = make_prefill_batch(case, seed=3)
    attrs = {
        "scale": np.float32(0.2),
        "sliding_window": np.int64(11),
        "soft_cap": np.float32(4.0),
        "max_threads": np.int64(0),
    }
    static = {"scale": 0.2, "sliding_window": 11, "soft_cap": 4.0}
    for symbol, dtype in (("F32", jnp.float32), ("BF16", jnp.bfloat16)):
        target = f"jaxinfer_paged_attention_prefill_test_{isa}_{symbol}"
        handler = jax.ffi.pycapsule(getattr(library, f"JaxinferPagedAttention{symbol}"))
        jax.ffi.register_ffi_target(target, handler, platform="cpu")
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(batch["q"].shape, jnp.float32))
        got = np.asarray(jax.jit(lambda *a, call=call: call(*a, **attrs))(*_args(batch, dtype)))
        np.testing.assert_array_equal(got, _run(kernel.paged_attention, batch, dtype, **static))
