"""Engine.chat: the tokenizer's chat template through transformers, then generate."""

from __future__ import annotations

import pytest

from jaxinfer import Engine, EngineConfig, SamplingParams
from tests.checkpoints import hf_greedy

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    return Engine(
        EngineConfig(model=str(tiny_llama), dtype="float32", max_model_len=256, num_kv_blocks=64)
    )


def test_chat_ids_equal_apply_chat_template_and_generation_matches_transformers(engine, tiny_llama):
    conversations = [
        [{"role": "user", "content": "hello there"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is a cat"},
            {"role": "assistant", "content": "an animal"},
            {"role": "user", "content": "and a dog"},
        ],
    ]
    outputs = engine.chat(conversations, GREEDY, use_tqdm=False, chat_template=TEMPLATE)
    tokenizer = engine.get_tokenizer()
    for conversation, output in zip(conversations, outputs, strict=True):
        expected_ids = tokenizer.apply_chat_template(
            conversation,
            chat_template=TEMPLATE,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        assert output.prompt_token_ids == list(expected_ids)
        assert output.prompt.endswith("<|assistant|>") and "<|user|>" in output.prompt
        assert output.outputs[0].token_ids == hf_greedy(tiny_llama, output.prompt_token_ids, 8)
    # one conversation on its own is accepted too, and gives the same result
    single = engine.chat(conversations[0], GREEDY, use_tqdm=False, chat_template=TEMPLATE)
    assert single[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids


def test_chat_uses_the_tokenizers_own_template_by_default(engine):
    tokenizer = engine.get_tokenizer()
    assert tokenizer.chat_template and "im_start" in tokenizer.chat_template
    conversation = [{"role": "user", "content": "hello there"}]
    out = engine.chat(conversation, GREEDY, use_tqdm=False)
    expected = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert out[0].prompt_token_ids == list(expected)


def test_chat_without_a_template_or_with_bad_messages_fails_clearly(engine, monkeypatch):
    monkeypatch.setattr(engine.get_tokenizer(), "chat_template", None)
    with pytest.raises(ValueError, match="no chat template"):
        engine.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)
    for bad in ([], [{"content": "no role"}], [[]], "hello"):
        with pytest.raises(ValueError, match="messages"):
            engine.chat(bad, GREEDY, use_tqdm=False, chat_template=TEMPLATE)
