"""Structured outputs on the real SmolLM2-135M-Instruct: 200 seeded samples per kind (a JSON
schema with a nested object, an array and enums; a date regex; choices) parse and validate, checked
by tools that are not llguidance (jsonschema, re.fullmatch, membership).

200 samples per kind is affordable on the 2-core CPU because each kind is one request with
`n=200`: its prompt is prefilled once and its blocks shared (copy-on-write), then the 200 samples,
each with its own seed (`seeds.row_seed(seed, i)`: independent streams) and its own matcher, decode
as one 200-row batch. 200 separate requests (seeds 0..199) cost about twice the steps on this
machine (41/23/16 steps for json/regex/choice against 31/12/5: admitting them ramps up over many
steps, and a step that admits all 200 at once is slower still, prefill attention growing with the
sequences in it). The schema's valid outputs are short (about 27 tokens, compact JSON), `max_tokens`
is tight, and every sample must finish with "stop", so truncation cannot hide.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from jaxinfer import LLM, EngineConfig, SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "role": {"enum": ["admin", "user", "guest"]},
        "user": {
            "type": "object",
            "properties": {
                "age": {"type": "integer", "minimum": 0, "maximum": 99},
                "lang": {"enum": ["en", "fr"]},
            },
            "required": ["age", "lang"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["role", "user", "tags"],
    "additionalProperties": False,
    # compact JSON: free whitespace would only spend the token budget
    "x-guidance": {"whitespace_flexible": False},
}
DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
CAPITALS = ["Paris", "London", "Berlin", "Madrid"]
SAMPLES = 200  # per kind, as the issue asks
# A 200-row decode program (and 16 rows for the single-sample calls below); prompts fit 64 tokens.
ENGINE = {
    "max_model_len": 128,
    "max_num_seqs": SAMPLES,
    "max_num_batched_tokens": 256,
    "seq_buckets": (16, SAMPLES),
    "token_buckets": (64, 256),
}


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    llm = LLM(EngineConfig(model=str(smollm2_gguf), **ENGINE))
    yield llm
    llm.shutdown()


def chat(llm: LLM, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return llm.get_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def sample(llm: LLM, constraint, question: str, max_tokens: int) -> list[str]:
    """SAMPLES seeded samples of one request (n=SAMPLES), every one finished by the grammar."""
    params = SamplingParams(
        n=SAMPLES, temperature=1.0, seed=0, max_tokens=max_tokens, structured_outputs=constraint
    )
    (output,) = llm.generate(chat(llm, question), params, use_tqdm=False)
    assert len(output.outputs) == SAMPLES
    assert all(c.finish_reason == "stop" for c in output.outputs)
    return [c.text for c in output.outputs]


def test_json_schema_samples_validate(smollm2):
    texts = sample(smollm2, StructuredOutputsParams(json=SCHEMA), "Describe a user as JSON.", 40)
    schema = {k: v for k, v in SCHEMA.items() if k != "x-guidance"}
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(texts)) > 1


def test_regex_samples_match_in_full(smollm2):
    texts = sample(smollm2, StructuredOutputsParams(regex=DATE), "What is today's date?", 16)
    assert all(re.fullmatch(DATE, text) for text in texts), texts
    assert len(set(texts)) > 1


def test_choice_samples_are_members_with_renormalized_logprobs(smollm2):
    constraint = StructuredOutputsParams(choice=CAPITALS)
    prompt = chat(smollm2, "What is the capital of France?")
    texts = sample(smollm2, constraint, "What is the capital of France?", 8)
    assert set(texts) <= set(CAPITALS)
    # The mask renormalizes the first token's distribution over the allowed tokens: each allowed
    # token's logprob rises by the same log(1 / allowed mass). (llguidance allows non-canonical
    # tokenizations, so "L" + "ondon" competes with the single token "Paris".) Both logprobs come
    # from one float32 log-softmax over the same logits; 1e-4 is far above their rounding.
    free = SamplingParams(temperature=0, max_tokens=1, logprobs=20)
    held = SamplingParams(temperature=0, max_tokens=8, logprobs=5, structured_outputs=constraint)
    raw = smollm2.generate(prompt, free, use_tqdm=False)[0].outputs[0].logprobs[0]
    constrained = smollm2.generate(prompt, held, use_tqdm=False)[0].outputs[0].logprobs[0]
    shared = [t for t, entry in constrained.items() if entry.logprob > -float("inf") and t in raw]
    assert len(shared) >= 2
    shifts = [constrained[t].logprob - raw[t].logprob for t in shared]
    assert shifts[0] > 0 and max(shifts) - min(shifts) < 1e-4, shifts
