"""Engines built and shut down in a loop leave no device buffers behind (a notebook's second
engine must not run out of memory because the first one's cache is still alive)."""

from __future__ import annotations

import gc

import jax
import pytest

from jaxinfer import Engine, EngineConfig, SamplingParams


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def test_shutdown_frees_weights_cache_and_sampling_state(tiny_llama):
    gc.collect()
    baseline = _live_bytes()
    config = EngineConfig(
        model=str(tiny_llama), dtype="float32", max_model_len=128, num_kv_blocks=32, max_num_seqs=4
    )
    for _ in range(3):
        with Engine(config) as engine:
            out = engine.generate(["hello"], SamplingParams(max_tokens=3, temperature=0), False)
            assert len(out[0].outputs[0].token_ids) == 3
            held = _live_bytes() - baseline
            assert held >= engine.llm_engine.model.weight_bytes  # weights + cache + sampling state
        gc.collect()
        assert _live_bytes() == baseline
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate(["hello"], SamplingParams(max_tokens=1), use_tqdm=False)
