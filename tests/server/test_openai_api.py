"""The official `openai` client against `jaxinfer serve`: completions, chat, streaming, logprobs.

The reference is `LLM.generate` / `LLM.chat` in this process on the server's own config file: with
the same seed and parameters the server must return the same tokens, token for token (read
through vLLM's `return_token_ids`). Logprobs are compared with a relative tolerance of 1e-5: the
server batches the request differently from the offline call, and XLA:CPU's float32 results for a
row may move by a few ulps with the batch around it (measured here: identical or < 1e-6).
"""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from jaxinfer import SamplingParams
from tests.server.conftest import API_KEY, MODEL_NAME, extra_field

PROMPTS = ["Hello there", "The capital of France is"]
SEEDED = {"temperature": 0.8, "top_p": 0.9, "seed": 7, "max_tokens": 10}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, who are you?"}]


def test_models_lists_the_served_model(client):
    (card,) = client.models.list().data
    assert card.id == MODEL_NAME
    assert extra_field(card, "max_model_len") == 128


def test_seeded_completions_equal_llm_generate(client, llm):
    expected = llm.generate(PROMPTS, SamplingParams(n=2, ignore_eos=True, **SEEDED), False)
    response = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPTS,
        n=2,
        **SEEDED,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert len(response.choices) == 4
    for choice in response.choices:
        want = expected[choice.index // 2]
        sample = want.outputs[choice.index % 2]
        assert extra_field(choice, "token_ids") == sample.token_ids
        assert extra_field(choice, "prompt_token_ids") == want.prompt_token_ids
        assert choice.text == sample.text
        assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert response.usage.completion_tokens == 4 * 10
    assert response.usage.total_tokens == response.usage.prompt_tokens + 40


def test_token_id_prompts_and_vllm_extra_sampling_fields(client, llm):
    ids = llm.tokenizer.encode("Once upon a time")
    extras = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 3}
    params = SamplingParams(**SEEDED, **extras)
    (want,) = llm.generate([ids], params, use_tqdm=False)
    response = client.completions.create(
        model=MODEL_NAME, prompt=ids, **SEEDED, extra_body={"return_token_ids": True, **extras}
    )
    (choice,) = response.choices
    assert extra_field(choice, "token_ids") == want.outputs[0].token_ids
    assert choice.text == want.outputs[0].text


def test_stop_strings_end_the_completion_as_in_the_engine(client, llm):
    (free,) = llm.generate([PROMPTS[1]], SamplingParams(**SEEDED), use_tqdm=False)
    text = free.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # a piece of what it would say
    assert stop.strip()
    (want,) = llm.generate([PROMPTS[1]], SamplingParams(**SEEDED, stop=[stop]), use_tqdm=False)
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[1], stop=[stop], **SEEDED,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    (choice,) = response.choices
    assert choice.text == want.outputs[0].text and stop not in choice.text
    assert extra_field(choice, "token_ids") == want.outputs[0].token_ids
    assert choice.finish_reason == "stop" and extra_field(choice, "stop_reason") == stop


def test_seeded_chat_equals_llm_chat(client, llm):
    (want,) = llm.chat(CHAT, SamplingParams(**SEEDED), use_tqdm=False)
    response = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        temperature=SEEDED["temperature"],
        top_p=SEEDED["top_p"],
        seed=SEEDED["seed"],
        max_completion_tokens=SEEDED["max_tokens"],
        extra_body={"return_token_ids": True},
    )
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == want.outputs[0].text
    assert extra_field(choice, "token_ids") == want.outputs[0].token_ids
    assert extra_field(response, "prompt_token_ids") == want.prompt_token_ids
    assert response.usage.prompt_tokens == len(want.prompt_token_ids)
    assert response.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_streamed_completion_is_the_same_completion_with_exact_usage(client):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPTS[1], n=2, **SEEDED)
    whole = client.completions.create(**kwargs, extra_body={"return_token_ids": True})
    texts, tokens, usage, chunks = {0: "", 1: ""}, {0: [], 1: []}, None, 0
    stream = client.completions.create(
        **kwargs,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True},
    )
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            assert not chunk.choices  # the usage chunk comes alone, last
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            tokens[choice.index] += extra_field(choice, "token_ids")
    assert chunks > 3  # token by token, not one block
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert tokens[choice.index] == extra_field(choice, "token_ids")
    assert usage.completion_tokens == sum(len(t) for t in tokens.values())
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_ends_with_done_and_usage(server, client):
    kwargs = {"model": MODEL_NAME, "messages": CHAT, "seed": 3, "max_completion_tokens": 8}
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage == whole.usage
    # The raw event stream: OpenAI's framing, ending with [DONE].
    body = {**kwargs, "stream": True}
    raw = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: {") for event in events[:-2])


def test_completion_logprobs_and_echo_match_the_engine(client, llm):
    params = SamplingParams(**SEEDED, logprobs=2, prompt_logprobs=2)
    (want,) = llm.generate([PROMPTS[0]], params, use_tqdm=False)
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], **SEEDED, logprobs=2, echo=True
    )
    (choice,) = response.choices
    assert choice.text == PROMPTS[0] + want.outputs[0].text
    prompt_len = len(want.prompt_token_ids)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == prompt_len + 10
    assert logprobs.token_logprobs[0] is None  # nothing predicts the first prompt token
    expected = [e[t].logprob for t, e in zip(want.prompt_token_ids[1:], want.prompt_logprobs[1:])]
    expected += [e[t].logprob for t, e in zip(want.outputs[0].token_ids, want.outputs[0].logprobs)]
    for got, value in zip(logprobs.token_logprobs[1:], expected, strict=True):
        assert math.isclose(got, value, rel_tol=1e-5, abs_tol=1e-6)
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs[1:])  # chosen + top 2
    offsets = logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_chat_logprobs_are_ranked_alternatives(client, llm):
    (want,) = llm.chat(CHAT, SamplingParams(**SEEDED, logprobs=3), use_tqdm=False)
    response = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        temperature=SEEDED["temperature"],
        top_p=SEEDED["top_p"],
        seed=SEEDED["seed"],
        max_completion_tokens=SEEDED["max_tokens"],
        logprobs=True,
        top_logprobs=3,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 10
    for item, token, entry in zip(
        content, want.outputs[0].token_ids, want.outputs[0].logprobs, strict=True
    ):
        assert math.isclose(item.logprob, entry[token].logprob, rel_tol=1e-5, abs_tol=1e-6)
        assert len(item.top_logprobs) == 3
        values = [top.logprob for top in item.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert bytes(item.bytes).decode("utf-8") == item.token


def test_tokenize_and_detokenize_round_trip(server, llm):
    ids = llm.tokenizer.encode(PROMPTS[1])
    tokenized = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPTS[1]}).json()
    assert tokenized["tokens"] == ids and tokenized["count"] == len(ids)
    assert tokenized["max_model_len"] == 128
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    (rendered,) = llm.chat(CHAT, SamplingParams(max_tokens=1), use_tqdm=False)
    assert chat["tokens"] == rendered.prompt_token_ids
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == llm.tokenizer.decode(ids)


def test_health_version_and_metrics_names(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    client.completions.create(model=MODEL_NAME, prompt="a b c", max_tokens=3, stream=True)
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ):
        assert f'{name}{{model_name="{MODEL_NAME}"' in metrics or f"{name}{{" in metrics, name


def test_api_key_is_required_on_v1_routes(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "AuthenticationError"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
