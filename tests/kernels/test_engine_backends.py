"""The engine end to end on the Pallas kernel (compiled on a GPU, interpreted on CPU) and how a
backend is chosen."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxinfer import Engine, EngineConfig, SamplingParams
from jaxinfer.runtime.attention_backend import resolve_backend

SMALL = {
    "dtype": "float32",
    "max_model_len": 128,
    "num_kv_blocks": 40,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 64,
    "max_prefill_seqs": 2,
    "seq_buckets": (4,),
    "token_buckets": (64,),
}
# The kernel as the engine runs it here: compiled on a GPU (benchmarks/gpu_check.sh), else
# interpreted.
KERNEL_BACKEND = "pallas" if jax.default_backend() == "gpu" else "pallas_interpret"


def test_pallas_engine_gives_the_reference_greedy_tokens(tiny_llama):
    """Mixed prompt lengths with chunked prefill (prompts longer than a step's 64 tokens) and
    decode past a block boundary: the kernel reads cached context, new tokens and both at once."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, 512, size=n).tolist() for n in (1, 9, 70, 33, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = {}
    for backend in ("reference", KERNEL_BACKEND):
        with Engine(EngineConfig(model=str(tiny_llama), attention_backend=backend, **SMALL)) as e:
            assert e.llm_engine.runner.attention_backend == backend
            results[backend] = [o.outputs[0].token_ids for o in e.generate(prompts, params)]
    assert results[KERNEL_BACKEND] == results["reference"]
    assert all(len(tokens) == 24 for tokens in results["reference"])


def test_auto_picks_the_kernel_on_gpu_only():
    assert resolve_backend("auto", 128, platform="gpu") == "pallas"
    assert resolve_backend("auto", 128, platform="cpu") == "reference"
    assert resolve_backend("auto", 96, platform="gpu") == "reference"  # the kernel cannot
    assert resolve_backend("pallas_interpret", 96, platform="cpu") == "pallas_interpret"


def test_pallas_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a GPU.*pallas_interpret"):
        resolve_backend("pallas", 128, platform="cpu")
    with pytest.raises(ValueError, match="head_dim 96"):
        resolve_backend("pallas", 96, platform="gpu")


def test_a_jax_without_pallas_triton_falls_back_or_says_so(monkeypatch):
    """Pallas' Triton backend is deprecated (jax 0.11) and will go: "auto" then takes the
    reference on GPU, and "pallas" is refused with the reason; interpret mode needs no Triton."""
    from pallas_kernels import paged_attention as kernel

    monkeypatch.setattr(kernel, "TRITON_AVAILABLE", False)
    assert resolve_backend("auto", 128, platform="gpu") == "reference"
    with pytest.raises(ValueError, match="Triton backend, which jax .* no longer has"):
        resolve_backend("pallas", 128, platform="gpu")
    assert resolve_backend("pallas_interpret", 128, platform="cpu") == "pallas_interpret"


def test_unknown_backend_names_the_field():
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(model="m", attention_backend="triton")
