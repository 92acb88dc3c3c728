"""Structured outputs through the server, asked for as vLLM's OpenAI server takes them: OpenAI's
`response_format` (json_schema, json_object), vLLM's `structured_outputs` and its older
`guided_json` / `guided_regex` / `guided_choice`.

The server runs a tiny random checkpoint, whose free text matches none of these constraints
(tests/test_structured_outputs.py checks that), so every output below is held to its constraint
by the grammar. Each is checked by a tool that is not llguidance: `jsonschema`, `re.fullmatch`,
membership; and a seeded request must give `LLM.generate`'s tokens for the same
`StructuredOutputsParams`, token for token.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from jaxinfer import SamplingParams, StructuredOutputsParams
from tests.server.conftest import MODEL_NAME, extra_field
from tests.server.test_bad_requests import _check_error, _post

# Compact JSON ("x-guidance": no free whitespace), so a random model closes the object well
# within the token budget; nested object, array and enums.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["red", "green"]},
        "box": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        },
        "flags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["id", "tag", "box", "flags"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}
PLAIN_SCHEMA = {k: v for k, v in SCHEMA.items() if k != "x-guidance"}
DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
CHOICES = ["yes", "no", "maybe later"]
USER = [{"role": "user", "content": "Describe a thing as JSON."}]
SEEDED = {"temperature": 1.0, "seed": 5}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True},
}


def test_chat_json_schema_validates_and_streams_the_same_text(client):
    kwargs = dict(
        model=MODEL_NAME, messages=USER, n=2, max_completion_tokens=64,
        response_format=RESPONSE_FORMAT, **SEEDED,
    )  # fmt: skip
    response = client.chat.completions.create(**kwargs)
    texts = [choice.message.content for choice in response.choices]
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PLAIN_SCHEMA)
    # Streamed with the same seed: the constrained deltas concatenate to the same JSON texts.
    streamed = ["", ""]
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts


def test_json_object_gives_a_json_object(client):
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, max_completion_tokens=64,
        response_format={"type": "json_object"}, **SEEDED,
    )  # fmt: skip
    (choice,) = response.choices
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content), dict)


def test_completions_guided_regex_matches_in_full(client):
    response = client.completions.create(
        model=MODEL_NAME, prompt=["Today is", "The date:"], n=2, max_tokens=24,
        extra_body={"guided_regex": DATE}, **SEEDED,
    )  # fmt: skip
    assert len(response.choices) == 4
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        assert re.fullmatch(DATE, choice.text), choice.text


@pytest.mark.parametrize("field", ["guided_choice", "structured_outputs"])
def test_choices_are_members(client, field):
    extra = {"guided_choice": CHOICES} if field == "guided_choice" else {
        "structured_outputs": {"choice": CHOICES}
    }  # fmt: skip
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, n=3, max_completion_tokens=16, extra_body=extra,
        **SEEDED,
    )  # fmt: skip
    completion = client.completions.create(
        model=MODEL_NAME, prompt="Pick:", n=3, max_tokens=16, extra_body=extra, **SEEDED
    )
    texts = [c.message.content for c in chat.choices] + [c.text for c in completion.choices]
    assert set(texts) <= set(CHOICES), texts


def test_seeded_server_equals_llm_generate(client, llm):
    """The same StructuredOutputsParams offline and through each way of asking: same tokens."""
    constraint = StructuredOutputsParams(json=SCHEMA)
    params = SamplingParams(n=2, max_tokens=64, structured_outputs=constraint, **SEEDED)
    (want,) = llm.generate(["Describe a thing:"], params, use_tqdm=False)
    for extra in ({"guided_json": SCHEMA}, {"structured_outputs": {"json": SCHEMA}}):
        response = client.completions.create(
            model=MODEL_NAME, prompt="Describe a thing:", n=2, max_tokens=64,
            extra_body={"return_token_ids": True, **extra}, **SEEDED,
        )  # fmt: skip
        for choice, sample in zip(response.choices, want.outputs, strict=True):
            assert extra_field(choice, "token_ids") == sample.token_ids
            assert choice.text == sample.text
    (chat_want,) = llm.chat(USER, params, use_tqdm=False)
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, n=2, max_completion_tokens=64,
        response_format=RESPONSE_FORMAT, extra_body={"return_token_ids": True}, **SEEDED,
    )  # fmt: skip
    for choice, sample in zip(response.choices, chat_want.outputs, strict=True):
        assert extra_field(choice, "token_ids") == sample.token_ids


BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
# (route, body, the param the 400 must name, words its message must hold)
BAD = [
    ("chat/completions", {"messages": USER, "response_format": BAD_SCHEMA}, "response_format",
     "response_format.json_schema.schema is invalid"),
    ("completions", {"prompt": "x", "response_format": BAD_SCHEMA}, "response_format",
     "response_format.json_schema.schema is invalid"),
    ("completions", {"prompt": "x", "guided_regex": "[0-9"}, "guided_regex",
     "guided_regex is invalid"),
    ("completions", {"prompt": "x", "guided_json": "{not json"}, "guided_json",
     "guided_json is invalid"),
    ("chat/completions", {"messages": USER, "structured_outputs": {"grammar": "start: nothing"}},
     "structured_outputs", "structured_outputs.grammar is invalid"),
    # valid Lark, but the tokenizer has no such token: caught before queuing too
    ("completions", {"prompt": "x", "guided_grammar": "start: <[999999]>"}, "guided_grammar",
     "guided_grammar is invalid"),
    ("completions", {"prompt": "x", "guided_regex": DATE, "guided_choice": CHOICES},
     "guided_regex", "guided_regex, guided_choice"),
    ("chat/completions", {"messages": USER, "response_format": {"type": "json_object"},
                          "structured_outputs": {"regex": DATE}},
     "response_format", "response_format, structured_outputs.regex"),
    ("completions", {"prompt": "x", "structured_outputs": {"regex": DATE, "choice": CHOICES}},
     "structured_outputs", "structured_outputs.regex, structured_outputs.choice"),
    ("completions", {"prompt": "x", "structured_outputs": {}}, "structured_outputs", "one of"),
    ("completions", {"prompt": "x", "guided_choice": []}, "guided_choice", "non-empty"),
    ("completions", {"prompt": "x", "response_format": {"type": "json_schema"}},
     "response_format", "schema is required"),
    ("completions", {"prompt": "x", "response_format": {"type": "structural_tag"}},
     "response_format.type", "response_format.type"),
    ("completions", {"prompt": "x", "structured_outputs": {"regex": DATE, "backend": "x"}},
     "structured_outputs.backend", "unknown field"),
    ("completions", {"prompt": "x", "guided_regex": DATE, "guided_decoding_backend": "xgrammar"},
     "guided_decoding_backend", "llguidance"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "param", "words"), BAD, ids=[b[3] for b in BAD])
def test_bad_constraint_is_400_naming_the_field(server, route, body, param, words):
    message = _check_error(_post(server, route, body), 400, param)
    assert words in message, message


def test_openai_client_raises_bad_request_for_an_invalid_schema(client, server):
    with pytest.raises(openai.BadRequestError, match="response_format") as raised:
        client.chat.completions.create(
            model=MODEL_NAME, messages=USER, response_format=BAD_SCHEMA, max_completion_tokens=8
        )
    assert raised.value.body["param"] == "response_format"
    for route, body, _, _ in BAD:
        _post(server, route, body)
    metrics = httpx.get(f"{server.url}/metrics").text  # nothing queued, no KV block held
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        (value,) = re.findall(rf"^vllm:{name}\{{[^}}]*\}} (\S+)$", metrics, re.MULTILINE)
        assert float(value) == 0.0, name
