"""`kv_cache_dtype` (vLLM's name and values): K and V stored as 8-bit floats.

The reference is transformers itself with every key and value rounded to the same fp8 type before
attention (its own sdpa attention, registered under another name with the rounding in front): what
vLLM's fp8 cache computes with its default scale of 1.0, where attention reads the step's own
tokens back from the cache too.

Tolerance: the engine's float32 logits are within 1e-5 of transformers' without rounding (the
Llama parity tests allow 1e-4). Rounding adds one effect: a key or value that the two sides compute
a float32 ulp apart (different summation orders, here or in an earlier layer) can round to
neighbouring fp8 values when it sits on a rounding boundary, and then every later token's logits
move with it. Measured on this tiny Llama (2 layers, prompts up to 120 tokens): up to 6.9e-5 with
no such flip, 1.3e-2 with one (e4m3, the whole 120-token prompt, once the CPU kernel read the fp8
cache). Not rounding, or rounding something else, moves the logits by 1.2 (e4m3) to 2.4 (e5m2).
LOGIT_ATOL = 0.1 leaves room for a few flips and stays an order of magnitude below a missing or
wrong rounding; each test asserts the unrounded reference is more than 5x that far off, so the
comparison could fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from jaxinfer import Engine, EngineConfig, SamplingParams
from jaxinfer.runtime import kv_cache
from tests.checkpoints import hf_greedy_batch, hf_model, hf_prefill_logits
from tests.parity import engine_prefill_logits

LOGIT_ATOL = 0.1
TORCH_TYPES = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

rng = np.random.default_rng(0)
PROMPTS = [rng.integers(5, 512, size=n).tolist() for n in (1, 7, 33, 120)]


def _rounding_sdpa(dtype: torch.dtype):
    def attention(module, query, key, value, attention_mask, **kwargs):
        key, value = key.to(dtype).to(query.dtype), value.to(dtype).to(query.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return attention


def _reference(path, kv_cache_dtype: str):
    name = f"jaxinfer_test_round_{kv_cache_dtype}"
    AttentionInterface.register(name, _rounding_sdpa(TORCH_TYPES[kv_cache_dtype]))
    AttentionMaskInterface.register(name, sdpa_mask)  # padded batches: sdpa's masks
    model = hf_model(path)
    model.set_attn_implementation(name)
    return model


def _engine(path, **kw) -> Engine:
    return Engine(
        EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64, max_model_len=256, **kw)
    )


@pytest.mark.parametrize("chunk_size", [None, 10])
@pytest.mark.parametrize("kv_cache_dtype", sorted(TORCH_TYPES))
def test_prefill_logits_match_transformers_with_keys_rounded(
    tiny_llama, kv_cache_dtype, chunk_size
):
    """Chunked (10 tokens a step) the later chunks read the earlier ones back from the fp8 cache;
    whole, every key is the step's own: both see every key rounded, so both match."""
    engine = _engine(tiny_llama, kv_cache_dtype=kv_cache_dtype)
    runner = engine.llm_engine.runner
    assert runner.kv_cache_dtype == kv_cache.cache_dtype(kv_cache_dtype, "float32")
    assert runner.stages[0].kv_cache[0][0].dtype == np.uint8  # its bytes (kv_cache.storage_dtype)
    rounded, plain = _reference(tiny_llama, kv_cache_dtype), hf_model(tiny_llama)
    ours = engine_prefill_logits(engine, PROMPTS, chunk_size=chunk_size)
    off_if_unrounded = 0.0
    for prompt, logits in zip(PROMPTS, ours, strict=True):
        np.testing.assert_allclose(
            logits, hf_prefill_logits(rounded, prompt), atol=LOGIT_ATOL, rtol=0
        )
        unrounded = np.abs(logits - hf_prefill_logits(plain, prompt)).max()
        off_if_unrounded = max(off_if_unrounded, unrounded)
    assert off_if_unrounded > 5 * LOGIT_ATOL
    manager = engine.llm_engine.block_manager
    assert manager.num_free_blocks == manager.num_usable_blocks


def test_the_pallas_kernel_reads_an_fp8_cache(tiny_llama):
    """The GPU kernel (interpreted here) widens the fp8 pages it loads: chunked prefill through it
    matches the rounded reference like the CPU path does."""
    engine = _engine(tiny_llama, kv_cache_dtype="fp8", attention_backend="pallas_interpret")
    rounded = _reference(tiny_llama, "fp8")
    for prompt, logits in zip(PROMPTS, engine_prefill_logits(engine, PROMPTS, 10), strict=True):
        np.testing.assert_allclose(
            logits, hf_prefill_logits(rounded, prompt), atol=LOGIT_ATOL, rtol=0
        )


@pytest.mark.parametrize("kv_cache_dtype", sorted(TORCH_TYPES))
def test_greedy_decode_matches_transformers_with_keys_rounded(tiny_llama, kv_cache_dtype):
    """Decode steps read every earlier key from the fp8 cache and their own rounded."""
    prompts = PROMPTS[1:3]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = _engine(tiny_llama, kv_cache_dtype=kv_cache_dtype).generate(
        prompts, params, use_tqdm=False
    )
    expected = hf_greedy_batch(_reference(tiny_llama, kv_cache_dtype), prompts, 12)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected


def test_fp8_holds_four_times_the_float32_blocks_in_the_same_memory(tiny_llama):
    def blocks(**kw) -> int:
        config = EngineConfig(
            model=str(tiny_llama),
            dtype="float32",
            max_model_len=256,
            max_num_seqs=64,
            kv_cache_memory_bytes=1 << 20,
            **kw,
        )
        return Engine(config).llm_engine.runner.num_blocks

    assert blocks(kv_cache_dtype="fp8") == 4 * blocks()


def test_an_unknown_kv_cache_dtype_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match=r"EngineConfig\.kv_cache_dtype must be one of .*'fp8'"):
        EngineConfig(model=str(tiny_llama), kv_cache_dtype="int4")


def test_multi_step_decode_writes_the_fp8_cache_like_single_steps(tiny_llama):
    """The multi-step loop writes each layer's new K/V into the cache's bytes itself
    (runtime/multi_step.py): its tokens are the single-step loop's."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for steps in (1, 4):
        engine = _engine(tiny_llama, kv_cache_dtype="fp8", num_scheduler_steps=steps)
        outputs = engine.generate(PROMPTS[1:3], params, use_tqdm=False)
        tokens[steps] = [list(o.outputs[0].token_ids) for o in outputs]
    assert tokens[4] == tokens[1]
