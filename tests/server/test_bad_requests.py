"""Bad bodies get HTTP 400 with OpenAI's error JSON naming the field, never a 500.

Each case is posted raw (the `openai` client would refuse some of them itself) to the running
server; afterwards nothing is queued and no KV block is held (read through /metrics).
"""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
USER = [{"role": "user", "content": "Hi"}]

# (route, body, the field the error must name)
CASES = [
    ("completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "x", "n": True}, "n"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": "x", "foo": 1}, "foo"),
    ("completions", {"prompt": "x", "top_k": -5}, "top_k"),
    ("completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "x", "logprobs": 9}, "logprobs"),  # max_logprobs is 5
    ("completions", {"prompt": "x", "seed": -3}, "seed"),
    ("completions", {"prompt": "x", "logit_bias": {"abc": 1.0}}, "logit_bias"),
    ("completions", {"prompt": ["fine", [99999]]}, "prompt"),  # out of the vocabulary
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("completions", {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {}, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("chat/completions", {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat/completions", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 7}, "top_logprobs"),
    ("chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, "tools"),
    ("chat/completions", {"messages": USER, "temperature": 0, "n": 2}, "n"),
    ("embeddings", {"input": "x"}, "model"),  # a generative model has no embeddings
]


def _post(server, route: str, body=None, content: bytes | None = None) -> httpx.Response:
    headers = {**HEADERS, "content-type": "application/json"}
    return httpx.post(
        f"{server.url}/v1/{route}", json=body, content=content, headers=headers, timeout=60
    )


def _check_error(response: httpx.Response, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["code"] == status
    assert "Traceback" not in error["message"]
    return error["message"]


@pytest.mark.parametrize(("route", "body", "param"), CASES, ids=[str(c[1])[:50] for c in CASES])
def test_bad_body_is_400_naming_the_field(server, route, body, param):
    message = _check_error(_post(server, route, body), 400, param)
    assert param.split(".")[0] in message


def test_invalid_json_is_400(server):
    message = _check_error(_post(server, "completions", content=b'{"prompt": "x",'), 400, None)
    assert "JSON" in message


def test_unknown_model_is_404_as_in_openai_and_vllm(server):
    message = _check_error(
        _post(server, "completions", {"prompt": "x", "model": "gpt-9"}), 404, "model"
    )
    assert "gpt-9" in message and MODEL_NAME in message


def test_prompt_over_max_model_len_is_400_with_the_numbers(server):
    response = _post(server, "completions", {"prompt": [7] * 200, "max_tokens": 4})
    message = _check_error(response, 400, "prompt")
    assert re.search(r"\b200 tokens\b", message) and "max_model_len=128" in message
    chat = _post(
        server, "chat/completions", {"messages": [{"role": "user", "content": "w " * 300}]}
    )
    assert "max_model_len=128" in _check_error(chat, 400, "messages")


def test_openai_client_raises_bad_request_with_the_message(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=-2)


def test_bad_requests_leave_nothing_queued(server):
    for route, body, _ in CASES:
        _post(server, route, body)
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        (value,) = re.findall(
            rf'^{name}\{{model_name="{MODEL_NAME}"\}} (\S+)$', metrics, re.MULTILINE
        )
        assert float(value) == 0.0, name
