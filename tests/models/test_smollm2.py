"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers on the same file.

transformers dequantizes the same GGUF to float32 weights (the GGUF reader tests check ours are
bit-identical), so both sides run the same float32 network; greedy tokens must be equal.

Logit tolerance 2e-4 absolute (logits reach ~30, so ~7e-6 relative). Measured on this model:
transformers float32 is 4e-5 from transformers float64, jaxinfer float32 is 1.4e-4 from float64,
and the two float32 implementations differ by at most 1.6e-4 over 30 layers: XLA:CPU's transcendental
functions and summation order differ from PyTorch's. The tiny 2-layer families meet 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxinfer import Engine, EngineConfig, SamplingParams
from tests.checkpoints import hf_greedy, hf_prefill_logits
from tests.parity import engine_prefill_logits

LOGIT_ATOL = 2e-4
NEW_TOKENS = 64

PLAIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Water boils at",
    "import numpy as np\nx = np.arange(10)\n",
    "A haiku about autumn:",
    "1, 2, 3, 4,",
]
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the moon.",
    "How do I reverse a list in Python?",
    "What is 12 times 7?",
    "Give me three tips for better sleep.",
    "Who wrote Romeo and Juliet?",
    "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="module")
def engine(smollm2_gguf) -> Engine:
    return Engine(
        EngineConfig(model=str(smollm2_gguf), max_model_len=512, num_kv_blocks=200, max_num_seqs=16)
    )


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


def _chat_ids(tokenizer, question: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def test_loads_as_float32_llama(engine):
    cfg = engine.llm_engine.model.model_config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and engine.llm_engine.model.dtype == "float32"
    assert engine.llm_engine.eos_token_ids


def test_prefill_logits_match_transformers(engine, hf_smollm2):
    tokenizer = engine.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in PLAIN_PROMPTS[:3]]
    prompts.append(_chat_ids(tokenizer, CHAT_QUESTIONS[0]))
    for prompt, logits in zip(prompts, engine_prefill_logits(engine, prompts), strict=True):
        np.testing.assert_allclose(
            logits, hf_prefill_logits(hf_smollm2, prompt), atol=LOGIT_ATOL, rtol=0
        )


def test_greedy_16_prompts_match_transformers(engine, hf_smollm2):
    tokenizer = engine.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in PLAIN_PROMPTS]
    prompts += [_chat_ids(tokenizer, q) for q in CHAT_QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    mismatches = [
        i
        for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True))
        if out.outputs[0].token_ids != hf_greedy(hf_smollm2, prompt, NEW_TOKENS)
    ]
    assert mismatches == []
    assert (
        engine.llm_engine.block_manager.num_free_blocks
        == engine.llm_engine.block_manager.num_usable_blocks
    )


def test_greedy_chat_names_paris(engine):
    prompt = _chat_ids(
        engine.get_tokenizer(), "What is the capital of France?", "You are a helpful assistant."
    )
    out = engine.generate(
        {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=32)
    )
    completion = out[0].outputs[0]
    assert completion.text.strip() == "The capital of France is Paris."
    assert completion.finish_reason == "stop"  # stopped at the model's end-of-turn token


def test_chat_api_gives_the_template_ids_and_names_paris(engine):
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    out = engine.chat(conversation, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert out[0].prompt_token_ids == _chat_ids(
        engine.get_tokenizer(), "What is the capital of France?", "You are a helpful assistant."
    )
    assert out[0].outputs[0].text.strip() == "The capital of France is Paris."
