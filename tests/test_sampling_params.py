"""SamplingParams: vLLM's defaults, every validation error naming its field, the normalizations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from jaxinfer.sampling_params import (
    FLOAT32_MAX,
    FLOAT32_MIN_NORMAL,
    GREEDY_TEMPERATURE,
    RequestOutputKind,
    SamplingParams,
)

# vLLM's SamplingParams() after its __post_init__ (stop/stop_token_ids/bad_words become lists).
VLLM_DEFAULTS = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "seed": None,
    "stop": [],
    "stop_token_ids": [],
    "bad_words": [],
    "include_stop_str_in_output": False,
    "ignore_eos": False,
    "max_tokens": 16,
    "min_tokens": 0,
    "logprobs": None,
    "prompt_logprobs": None,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "logit_bias": None,
    "allowed_token_ids": None,
    "detokenize": True,
    "output_kind": RequestOutputKind.CUMULATIVE,
    "truncate_prompt_tokens": None,
    "logits_processors": None,
    "structured_outputs": None,
    "guided_decoding": None,
}


def test_defaults_equal_vllm():
    params = SamplingParams()
    assert {f.name: getattr(params, f.name) for f in dataclasses.fields(params)} == VLLM_DEFAULTS
    assert not params.is_greedy


def test_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        SamplingParams(1)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


INVALID = [
    ("n", 0),
    ("n", 1.0),
    ("n", True),
    ("n", 2, {"temperature": 0.0}),  # n > 1 with greedy sampling
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("presence_penalty", math.nan),
    ("frequency_penalty", -3.0),
    ("frequency_penalty", math.inf),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("temperature", -0.1),
    ("temperature", math.inf),
    ("temperature", math.nan),
    ("temperature", "1.0"),
    ("top_p", 0.0),
    ("top_p", 1.1),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", True),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("seed", -2),
    ("seed", 1.0),
    ("seed", False),
    ("max_tokens", 0),
    ("max_tokens", 2.0),
    ("max_tokens", True),
    ("min_tokens", -1),
    ("min_tokens", 17),  # > max_tokens=16
    ("min_tokens", 5, {"max_tokens": 4}),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", [1]),
    ("stop", 3),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", 5),
    ("bad_words", [""]),
    ("bad_words", "word"),
    ("bad_words", [3]),
    ("include_stop_str_in_output", 1),
    ("ignore_eos", "yes"),
    ("skip_special_tokens", None),
    ("spaces_between_special_tokens", 0),
    ("logprobs", -2),
    ("logprobs", True),
    ("logprobs", 1.0),
    ("prompt_logprobs", -5),
    ("prompt_logprobs", False),
    ("logit_bias", {1: math.nan}),
    ("logit_bias", {1: math.inf}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"1": 1.0}),
    ("logit_bias", {True: 1.0}),
    ("logit_bias", {1: True}),
    ("logit_bias", [(1, 1.0)]),
    ("allowed_token_ids", []),
    ("allowed_token_ids", [-1]),
    ("allowed_token_ids", [0.5]),
    ("allowed_token_ids", 3),
    # Counts travel to the device as int32 (once an OverflowError deep in the engine).
    ("n", 2**31),
    ("max_tokens", 2**31),
    ("min_tokens", 2**31, {"max_tokens": None}),
    ("logprobs", 2**31),
    ("prompt_logprobs", 2**31),
    ("top_k", 2**31),
    # Seeds are in [0, 2**64): 2**64 and 2**65 once gave the same key.
    ("seed", 2**64),
    ("seed", 2**65),
    # Values that would be 0 or inf in float32.
    ("top_p", 1e-300),
    ("top_p", 1e-39),  # subnormal in float32
    ("repetition_penalty", 1e-300),
    ("repetition_penalty", 1e-39),
    ("repetition_penalty", 1e39),
    ("temperature", 1e39),
    # vLLM's extra fields.
    ("detokenize", 1),
    ("detokenize", None),
    ("stop", "END", {"detokenize": False}),
    ("output_kind", 3),
    ("output_kind", "DELTA"),
    ("output_kind", True),
    ("output_kind", 1.0),
    ("truncate_prompt_tokens", 0),
    ("truncate_prompt_tokens", -2),
    ("truncate_prompt_tokens", 1.5),
    ("truncate_prompt_tokens", True),
    ("truncate_prompt_tokens", 2**31),
    ("logits_processors", []),
    ("logits_processors", [abs]),
]


@pytest.mark.parametrize("case", INVALID, ids=[f"{c[0]}={c[1]!r}" for c in INVALID])
def test_invalid_values_raise_naming_the_field(case):
    name, value, *extra = case
    kwargs = {name: value, **(extra[0] if extra else {})}
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{name} must be .*, got "):
        SamplingParams(**kwargs)


def test_normalizations():
    params = SamplingParams(
        seed=-1,
        top_k=-1,
        stop="END",
        stop_token_ids=(3, np.int64(4)),
        bad_words=("bad",),
        logit_bias={5: 150.0, np.int32(6): -1000, 7: 0.5},
        allowed_token_ids=(1, 2),
        temperature=1,
        n=np.int64(2),
    )
    assert params.seed is None
    assert params.top_k == 0
    assert params.stop == ["END"]
    assert params.stop_token_ids == [3, 4] and all(type(t) is int for t in params.stop_token_ids)
    assert params.bad_words == ["bad"]
    assert params.logit_bias == {5: 100.0, 6: -100.0, 7: 0.5}
    assert all(type(t) is int for t in params.logit_bias)
    assert params.allowed_token_ids == [1, 2]
    assert type(params.temperature) is float and type(params.n) is int


def test_input_lists_are_copied():
    stop_ids = [1, 2]
    params = SamplingParams(stop_token_ids=stop_ids)
    stop_ids.append(3)
    assert params.stop_token_ids == [1, 2]


def test_greedy_resets_truncation_like_vllm():
    params = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert params.is_greedy
    assert (params.top_p, params.top_k, params.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=GREEDY_TEMPERATURE / 2).is_greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).is_greedy


def test_valid_edges_are_accepted():
    SamplingParams(presence_penalty=-2, frequency_penalty=2, top_p=1, min_p=1, top_k=1)
    SamplingParams(max_tokens=None, min_tokens=1000, n=4, seed=0, logprobs=-1, prompt_logprobs=0)
    SamplingParams(max_tokens=4, min_tokens=4, repetition_penalty=1e-3)
    int32_max = 2**31 - 1
    SamplingParams(n=int32_max, max_tokens=int32_max, min_tokens=int32_max, top_k=int32_max)
    SamplingParams(logprobs=int32_max, prompt_logprobs=int32_max, truncate_prompt_tokens=int32_max)
    SamplingParams(seed=2**64 - 1, top_p=FLOAT32_MIN_NORMAL, temperature=FLOAT32_MAX)
    SamplingParams(repetition_penalty=FLOAT32_MIN_NORMAL)
    SamplingParams(repetition_penalty=FLOAT32_MAX)
    SamplingParams(truncate_prompt_tokens=-1, detokenize=False, logits_processors=None)


def test_float32_and_vllm_field_normalizations():
    assert np.float32(FLOAT32_MIN_NORMAL) > 0 and np.isfinite(np.float32(FLOAT32_MAX))
    assert SamplingParams(min_p=1e-300).min_p == 0.0  # what it is in float32: off
    assert SamplingParams(min_p=FLOAT32_MIN_NORMAL).min_p == FLOAT32_MIN_NORMAL
    # Greedy is temperature 0, so no float32 rounding can make the device see it otherwise.
    just_below = np.nextafter(GREEDY_TEMPERATURE, 0.0)
    assert np.float32(just_below) == np.float32(GREEDY_TEMPERATURE)  # the hazard
    assert SamplingParams(temperature=just_below).temperature == 0.0
    kind = SamplingParams(output_kind=np.int64(2)).output_kind
    assert kind is RequestOutputKind.FINAL_ONLY
    assert SamplingParams(output_kind=RequestOutputKind.DELTA).output_kind == 1
    params = SamplingParams(truncate_prompt_tokens=np.int32(5), output_kind=1, temperature=1e-6)
    assert type(params.truncate_prompt_tokens) is int
    # Normalizing is idempotent: fields round-trip (evaluation.py and config files rely on it).
    assert SamplingParams(**dataclasses.asdict(params)) == params


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"stop_token_ids": [99, 100]}, "stop_token_ids"),
        ({"logit_bias": {100: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": [0, 100]}, "allowed_token_ids"),
        ({"top_k": 101}, "top_k"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"logprobs": -1}, "logprobs"),  # -1 counts as the whole vocabulary (100 > 20)
    ],
)
def test_validate_for_model_rejects(kwargs, field):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field} must be"):
        SamplingParams(**kwargs).validate_for_model(vocab_size=100, max_logprobs=20)


def test_validate_for_model_accepts():
    params = SamplingParams(
        stop_token_ids=[99],
        logit_bias={0: 1.0, 99: -1.0},
        allowed_token_ids=[5, 99],
        top_k=100,
        logprobs=20,
        prompt_logprobs=0,
    )
    params.validate_for_model(vocab_size=100, max_logprobs=20)
    # -1 (whole vocabulary) passes when max_logprobs allows it, or is itself -1 (unbounded).
    SamplingParams(logprobs=-1).validate_for_model(vocab_size=100, max_logprobs=100)
    SamplingParams(logprobs=-1, prompt_logprobs=-1).validate_for_model(100, max_logprobs=-1)
    with pytest.raises(ValueError, match="max_logprobs"):
        SamplingParams(logprobs=101).validate_for_model(vocab_size=100, max_logprobs=-1)
