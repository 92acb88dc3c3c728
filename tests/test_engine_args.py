"""vLLM's engine arguments: accepted at their neutral values, refused (by name) where they would
need behaviour jaxinfer lacks; `task` checked against the model's kind."""

from __future__ import annotations

import pytest

from jaxinfer import LLM, EngineConfig
from jaxinfer.engine_args import engine_config


def test_neutral_vllm_arguments_become_an_engine_config():
    config, task = engine_config(
        "some/model",
        dict(
            trust_remote_code=False,
            revision=None,
            tokenizer_mode="auto",
            quantization=None,
            enable_lora=False,
            max_lora_rank=16,  # lm-eval's vllm backend passes it whether or not LoRA is on
            max_num_seqs=None,
            swap_space=4,
            enforce_eager=True,
            gpu_memory_utilization=0.5,
            seed=3,
            kv_cache_dtype="fp8",
            calculate_kv_scales=False,
        ),
    )
    assert task == "auto"
    assert config == EngineConfig(
        model="some/model", gpu_memory_utilization=0.5, seed=3, kv_cache_dtype="fp8"
    )


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("trust_remote_code", True),
        ("enable_lora", True),
        ("tokenizer_mode", "slow"),
        ("cpu_offload_gb", 4),
        ("calculate_kv_scales", True),
    ],
)
def test_arguments_that_would_change_behaviour_are_refused_by_name(argument, value):
    with pytest.raises(ValueError, match=rf"{argument}={value!r} is not supported"):
        engine_config("some/model", {argument: value})


def test_unknown_arguments_and_tasks_are_clear_errors():
    with pytest.raises(TypeError, match="unknown engine arguments \\['max_num_sequences'\\]"):
        engine_config("some/model", {"max_num_sequences": 4})
    with pytest.raises(ValueError, match="task must be one of"):
        engine_config("some/model", {"task": "classify"})


def test_vllm_documented_constructor_runs_and_task_is_checked(tiny_llama):
    llm = LLM(
        model=str(tiny_llama),
        dtype="auto",
        gpu_memory_utilization=0.9,
        max_model_len=128,
        tensor_parallel_size=1,
        trust_remote_code=False,
        num_kv_blocks=16,
        task="generate",
    )
    assert llm.config.max_model_len == 128
    assert llm.llm_engine.model_config.max_model_len == 128  # where vLLM clients read it
    llm.shutdown()
    with pytest.raises(ValueError, match="task='embed' does not fit .* a generative model"):
        LLM(model=str(tiny_llama), max_model_len=128, num_kv_blocks=16, task="embed")


def test_max_model_len_one_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"max_model_len must be >= 2 \(a prompt of at least one"):
        EngineConfig(model="some/model", max_model_len=1)
