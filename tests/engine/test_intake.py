"""Request intake: every prompt form vLLM takes is accepted, every bad one fails naming its index.

Host only (no JAX), with the tiny Llama checkpoint's real byte-level BPE tokenizer (512 tokens,
BOS 0, EOS 1). The limits are small so that every check can be reached: prompts shorter than 64
tokens, a KV cache of 12 blocks of 4 tokens (48 tokens for one sequence).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.engine.intake import (
    IntakeLimits,
    PreparedRequest,
    as_prompt_list,
    bad_word_token_ids,
    encode_prompts,
    params_for,
    prepare_request,
    prepare_requests,
    render_chats,
)
from jaxinfer.inputs import TextPrompt, TokensPrompt
from jaxinfer.sampling_params import SamplingParams
from tests.checkpoints import tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
LIMITS = IntakeLimits(
    max_model_len=64,
    vocab_size=512,
    max_logprobs=5,
    max_num_seqs=4,
    block_size=4,
    num_usable_blocks=12,
    eos_token_ids=frozenset({1}),
)
DEFAULT = SamplingParams()  # max_tokens 16


@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))


def prepare(tokenizer, prompts, params=None, limits=LIMITS):
    return prepare_requests(
        prompts, params, tokenizer=tokenizer, limits=limits, default_params=DEFAULT
    )


def test_intake_imports_without_jax() -> None:
    code = (
        "import sys, jaxinfer.engine.intake, jaxinfer.inputs; "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')], "
        "sorted(m for m in sys.modules if m.startswith('jax'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# ---- accepted forms -----------------------------------------------------------------------------


def test_every_vllm_prompt_form_is_accepted(tokenizer):
    hello = tokenizer.encode("hello")
    cases = [
        ("hello", "hello", hello),
        (TextPrompt(prompt="hello"), "hello", hello),
        (TokensPrompt(prompt_token_ids=[5, 6]), None, [5, 6]),
        ({"prompt_token_ids": [5, 6], "prompt": "text"}, "text", [5, 6]),  # ids win, text kept
        ({"prompt": "hello", "cache_salt": "tenant-1"}, "hello", hello),
        ([5, 6], None, [5, 6]),
        ((5, 6), None, [5, 6]),
        ([np.int64(5), 6], None, [5, 6]),
        (np.array([5, 6], np.int32), None, [5, 6]),
        (np.array([5, 6], np.uint16), None, [5, 6]),
        ({"prompt_token_ids": np.array([511])}, None, [511]),
        ("", "", tokenizer.encode("")),  # the BOS token alone
    ]
    for prompt, text, ids in cases:
        (request,) = prepare(tokenizer, prompt)
        assert (request.prompt, request.prompt_token_ids) == (text, ids), prompt
        assert all(type(t) is int for t in request.prompt_token_ids)
        assert request.params is DEFAULT


def test_as_prompt_list():
    assert as_prompt_list("a") == ["a"]
    assert as_prompt_list({"prompt": "a"}) == [{"prompt": "a"}]
    assert as_prompt_list(["a", "b"]) == ["a", "b"]
    assert as_prompt_list([1, 2, 3]) == [[1, 2, 3]]  # one prompt of token ids
    assert as_prompt_list(iter(["a"])) == ["a"]
    assert as_prompt_list([[1], [2, 3]]) == [[1], [2, 3]]
    rows = as_prompt_list(np.array([[1, 2], [3, 4]]))
    assert len(rows) == 2 and list(rows[1]) == [3, 4]


def test_params_for():
    a, b = SamplingParams(seed=1), SamplingParams(seed=2)
    assert params_for(2, None, DEFAULT) == [DEFAULT, DEFAULT]
    assert params_for(2, a, DEFAULT) == [a, a]
    assert params_for(2, (a, b), DEFAULT) == [a, b]
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        params_for(2, [a], DEFAULT)
    with pytest.raises(TypeError, match=r"sampling_params\[1\] must be SamplingParams, got dict"):
        params_for(2, [a, {"temperature": 0}], DEFAULT)
    with pytest.raises(TypeError, match="sampling_params must be None, a SamplingParams"):
        params_for(1, {"temperature": 0}, DEFAULT)


def test_truncate_prompt_tokens_keeps_the_last_tokens(tokenizer):
    ids = list(range(10, 110))
    (last3,) = prepare(tokenizer, [ids], SamplingParams(truncate_prompt_tokens=3))
    assert last3.prompt_token_ids == [107, 108, 109]
    roomy = dataclasses.replace(LIMITS, num_usable_blocks=100)
    (longest,) = prepare(tokenizer, [ids], SamplingParams(truncate_prompt_tokens=-1), roomy)
    assert longest.prompt_token_ids == ids[-63:]  # max_model_len - 1: room for one new token


def test_encode_prompts_and_render_chats(tokenizer):
    assert encode_prompts(["hi", [3, 4]], tokenizer) == [
        ("hi", tokenizer.encode("hi")),
        (None, [3, 4]),
    ]
    conversation = [{"role": "user", "content": "hello"}]
    (prompt,) = render_chats(tokenizer, conversation)
    ids = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=False, add_generation_prompt=True
    )
    assert prompt["prompt_token_ids"] == list(ids) and "hello" in prompt["prompt"]
    assert len(render_chats(tokenizer, [conversation, conversation])) == 2
    with pytest.raises(ValueError, match=r"messages\[1\] must be a non-empty list"):
        render_chats(tokenizer, [conversation, []])


# ---- rejected prompts: each error names prompts[i] and what is allowed --------------------------

BAD_PROMPTS = [  # (prompt, exception, message pattern), each as prompts[1] after a good prompt
    (None, TypeError, r"prompts\[1\] must be a str, .*; got NoneType"),
    (b"abc", TypeError, r"prompts\[1\] is bytes: decode it to str"),
    (3, TypeError, r"prompts\[1\] must be a str, .*; got int"),
    ([1.0, 2.0], TypeError, r"prompts\[1\]\[0\] must be an int token id, got float"),
    ([1, 2.5], TypeError, r"prompts\[1\]\[1\] must be an int token id, got float"),
    ([True, 2], TypeError, r"prompts\[1\]\[0\] must be an int token id, got bool"),
    (["a"], TypeError, r"prompts\[1\]\[0\] must be an int token id, got str"),
    (np.array([1.0, 2.0]), TypeError, r"prompts\[1\] must be a 1-D integer array .* float64"),
    (np.array([True]), TypeError, r"prompts\[1\] must be a 1-D integer array .* bool"),
    (np.array([[1, 2]]), TypeError, r"prompts\[1\] must be a 1-D integer array .* \(1, 2\)"),
    ({"prompt_token_ids": None}, TypeError, r"prompts\[1\]\['prompt_token_ids'\] .* NoneType"),
    ({"prompt_token_ids": "abc"}, TypeError, r"prompts\[1\]\['prompt_token_ids'\] .* got str"),
    ({"prompt": None}, TypeError, r"prompts\[1\]\['prompt'\] must be a str, got NoneType"),
    ({"prompt": b"x"}, TypeError, r"prompts\[1\]\['prompt'\] must be a str, got bytes"),
    ({}, ValueError, r"prompts\[1\]: a prompt dict needs 'prompt' or 'prompt_token_ids'"),
    (
        {"prompt": "a", "multi_modal_data": {"image": None}},
        ValueError,
        r"prompts\[1\]: 'multi_modal_data' is not supported: .*text-only",
    ),
    (
        {"prompt_token_ids": [1], "prompt_embeds": None},
        ValueError,
        r"prompts\[1\]: 'prompt_embeds' is not supported",
    ),
    ({"prompt": "a", "foo": 1}, ValueError, r"prompts\[1\]: unknown key 'foo'; .*TextPrompt"),
    ({"prompt": "a", "cache_salt": 3}, TypeError, r"prompts\[1\]\['cache_salt'\] must be a str"),
    ([], ValueError, r"prompts\[1\] is empty"),
    ({"prompt_token_ids": []}, ValueError, r"prompts\[1\] is empty"),
    ([-1], ValueError, r"prompts\[1\]: token ids must be in \[0, vocab_size=512\); got \[0\]=-1"),
    ([5, 512], ValueError, r"prompts\[1\]: .* got \[1\]=512"),
    ([2**31], ValueError, r"prompts\[1\]: .* got \[0\]=2147483648"),
    ([2**70], ValueError, r"prompts\[1\]: .* got \[0\]=1180591620717411303424"),
    (np.array([2**40]), ValueError, r"prompts\[1\]: .* got \[0\]=1099511627776"),
    ([5] * 64, ValueError, r"prompts\[1\] has 64 tokens; it must be shorter than max_model_len=64"),
    ("\ud800", ValueError, r"prompts\[1\]: the tokenizer cannot encode"),
]


@pytest.mark.parametrize("case", BAD_PROMPTS, ids=[repr(c[0])[:40] for c in BAD_PROMPTS])
def test_bad_prompts_raise_naming_their_index(tokenizer, case):
    prompt, error, pattern = case
    with pytest.raises(error, match=pattern):
        prepare(tokenizer, ["fine", prompt])


@pytest.mark.parametrize(
    ("prompts", "error", "pattern"),
    [
        (None, TypeError, "prompts is None"),
        (b"abc", TypeError, "prompts is bytes"),  # not the token ids [97, 98, 99]
        ([], ValueError, "prompts is empty"),
        ({"a", "b"}, TypeError, "prompts is a set"),
        (np.array(5), TypeError, r"1-D \(one prompt\) or 2-D"),
        (5, TypeError, "prompts must be a prompt .* got int"),
    ],
)
def test_bad_prompt_containers(tokenizer, prompts, error, pattern):
    with pytest.raises(error, match=pattern):
        prepare(tokenizer, prompts)


# ---- rejected requests: parameters against the model and the cache ------------------------------


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        (SamplingParams(n=5), r"prompts\[1\]: SamplingParams.n=5 exceeds max_num_seqs=4"),
        (SamplingParams(logprobs=6), r"prompts\[1\]: SamplingParams.logprobs must be <= "),
        (SamplingParams(prompt_logprobs=-1), r"prompts\[1\]: SamplingParams.prompt_logprobs"),
        (SamplingParams(stop_token_ids=[600]), r"prompts\[1\]: SamplingParams.stop_token_ids"),
        (SamplingParams(allowed_token_ids=[512]), r"prompts\[1\]: .*allowed_token_ids"),
        (SamplingParams(top_k=513), r"prompts\[1\]: SamplingParams.top_k must be <= vocab"),
        (
            SamplingParams(bad_words=["ok", " "]),
            r"prompts\[1\]: SamplingParams.bad_words\[1\]=' ' encodes to no tokens",
        ),
        (SamplingParams(bad_words=["\n"]), r"bad_words\[0\]='\\n' encodes to no tokens"),
        (SamplingParams(bad_words=[" \t "]), r"bad_words\[0\]=' \\t ' encodes to no tokens"),
        (
            SamplingParams(allowed_token_ids=[92], bad_words=["x"]),  # "x" is token 92
            r"prompts\[1\]: every token of SamplingParams.allowed_token_ids \[92\] is a bad word",
        ),
        (
            SamplingParams(allowed_token_ids=[1], min_tokens=1),  # 1 is eos
            r"prompts\[1\]: SamplingParams.min_tokens=1 can never be met",
        ),
        (
            SamplingParams(
                allowed_token_ids=[7, 92], stop_token_ids=[7], bad_words=["x"], min_tokens=2
            ),
            r"min_tokens=2 can never be met: every allowed token \[7\] is eos or a stop_token_id",
        ),
    ],
)
def test_bad_parameters_raise_naming_the_prompt(tokenizer, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        prepare(tokenizer, ["fine", "also fine"], [DEFAULT, params])


def test_bad_word_ids_outside_the_model_vocabulary(tokenizer):
    small = dataclasses.replace(LIMITS, vocab_size=290)  # "hello" encodes to ..., 293
    with pytest.raises(
        ValueError, match=r"prompts\[0\]: SamplingParams.bad_words .* \[293\] outside"
    ):
        prepare(tokenizer, [[5, 6]], SamplingParams(bad_words=["hello"]), small)


def test_a_request_that_can_never_fit_the_kv_cache(tokenizer):
    # 48 tokens fit one sequence (12 blocks of 4).
    (fits,) = prepare(tokenizer, [[5] * 32], SamplingParams(max_tokens=16))
    assert len(fits.prompt_token_ids) == 32
    with pytest.raises(
        ValueError,
        match=(
            r"prompts\[1\] can never fit in the KV cache: 40 prompt tokens \+ 16 to generate "
            r"\(max_tokens, capped at max_model_len=64\) = 56 tokens need 14 blocks of 4, but the "
            r"cache has 12 \(48 tokens\); it needs max_tokens <= 8"
        ),
    ):
        prepare(tokenizer, ["ok", [5] * 40], SamplingParams(max_tokens=16))
    with pytest.raises(ValueError, match=r"40 prompt tokens \+ 24 to generate .* = 64 tokens"):
        prepare(tokenizer, [[5] * 40], SamplingParams(max_tokens=None))  # up to max_model_len
    tiny_cache = dataclasses.replace(LIMITS, num_usable_blocks=2)
    with pytest.raises(ValueError, match="it needs a prompt shorter than the whole cache"):
        prepare(tokenizer, [[5] * 10], SamplingParams(max_tokens=1), tiny_cache)
    # max_tokens beyond max_model_len is capped, not counted whole.
    roomy = dataclasses.replace(LIMITS, num_usable_blocks=16)
    prepare(tokenizer, [[5] * 60], SamplingParams(max_tokens=1000), roomy)


def test_bad_word_token_ids_follow_vllm(tokenizer):
    encode = tokenizer.encode
    # "a b" and " a b" differ in the first token only: both are banned (vLLM's rule).
    both = (
        tuple(encode("a b", add_special_tokens=False)),
        tuple(encode(" a b", add_special_tokens=False)),
    )
    assert both[0] != both[1] and len(both[0]) == len(both[1])
    assert bad_word_token_ids(tokenizer, ["a b"], 0) == both
    assert bad_word_token_ids(tokenizer, ["  a b"], 0) == both  # leading whitespace stripped
    # " hello" encodes to one more token than "hello": only the plain form (as vLLM).
    assert bad_word_token_ids(tokenizer, ["hello"], 0) == (
        tuple(encode("hello", add_special_tokens=False)),
    )
    (request,) = prepare(tokenizer, ["x"], SamplingParams(bad_words=["a b", "hello"]))
    assert request.bad_words_token_ids == (*both, tuple(encode("hello", add_special_tokens=False)))


def test_add_request_form_and_limits_validation(tokenizer):
    request = prepare_request({"prompt": "hi"}, DEFAULT, 7, tokenizer=tokenizer, limits=LIMITS)
    assert isinstance(request, PreparedRequest) and request.prompt == "hi"
    with pytest.raises(ValueError, match=r"prompts\[7\] is empty"):
        prepare_request([], DEFAULT, 7, tokenizer=tokenizer, limits=LIMITS)
    with pytest.raises(TypeError, match=r"prompts\[7\]: sampling params must be SamplingParams"):
        prepare_request("hi", {"n": 1}, 7, tokenizer=tokenizer, limits=LIMITS)
    with pytest.raises(ValueError, match=r"IntakeLimits.vocab_size must be in \[1, 2\*\*31\]"):
        dataclasses.replace(LIMITS, vocab_size=2**31 + 1)
    with pytest.raises(ValueError, match="IntakeLimits.block_size must be an int >= 1"):
        dataclasses.replace(LIMITS, block_size=0)


# ---- a whole call: all or nothing ---------------------------------------------------------------

_TEXT = st.text(alphabet="abcdefgh xyz", min_size=1, max_size=12)  # <= 13 tokens with BOS
_IDS = st.lists(st.integers(0, 511), min_size=1, max_size=12)
GOOD_PROMPTS = st.one_of(
    _TEXT,
    _TEXT.map(lambda text: {"prompt": text}),
    _IDS,
    _IDS.map(lambda ids: {"prompt_token_ids": ids}),
    _IDS.map(lambda ids: {"prompt_token_ids": ids, "prompt": "text"}),
    _IDS.map(lambda ids: np.array(ids, np.int64)),
)
# A bare int is left out: a call of bare ints is one prompt of token ids, and a valid one.
BAD_PROMPT = st.sampled_from([case[0] for case in BAD_PROMPTS if not isinstance(case[0], int)])
GOOD_PARAMS = [
    DEFAULT,
    SamplingParams(n=4, temperature=0.8, logprobs=5, bad_words=["a b", "x"], max_tokens=20),
    SamplingParams(temperature=0, max_tokens=30, truncate_prompt_tokens=8),
    SamplingParams(allowed_token_ids=[92, 93], bad_words=["x"], min_tokens=2),
    SamplingParams(max_tokens=40),  # fits the cache's 48 tokens with prompts of <= 8 tokens
]
BAD_PARAMS = [
    SamplingParams(n=5),
    SamplingParams(logprobs=6),
    SamplingParams(bad_words=["\n"]),
    SamplingParams(stop_token_ids=[512]),
    SamplingParams(allowed_token_ids=[1], min_tokens=3),
    SamplingParams(max_tokens=None),  # up to max_model_len = 64 tokens: never fits
]


def _fits_kv_cache(tokenizer, prompt, params: SamplingParams) -> bool:
    """The oracle's own count for a good prompt: prompt + max_tokens within 48 tokens."""
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
    count = len(tokenizer.encode(prompt)) if isinstance(prompt, str) else len(prompt)
    count = min(count, params.truncate_prompt_tokens or count)
    room = LIMITS.max_model_len - count
    return count + min(params.max_tokens or room, room) <= 48


def _truncation_rescues(prompt, params: SamplingParams) -> bool:
    """A prompt of max_model_len tokens or more is good when truncate_prompt_tokens cuts it below
    that: vLLM truncates before it checks the length (the other bad prompts stay bad)."""
    too_long = isinstance(prompt, list) and len(prompt) >= LIMITS.max_model_len
    keep = params.truncate_prompt_tokens
    return too_long and keep is not None and 0 < keep < LIMITS.max_model_len


@settings(max_examples=150, deadline=None)
@given(
    calls=st.lists(
        st.tuples(
            st.one_of(GOOD_PROMPTS.map(lambda p: (True, p)), BAD_PROMPT.map(lambda p: (False, p))),
            st.sampled_from(GOOD_PARAMS + BAD_PARAMS),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_a_call_is_all_or_nothing(tokenizer, calls):
    prompts = [prompt for (_, prompt), _ in calls]
    params = [p for _, p in calls]
    good = [
        (ok or _truncation_rescues(prompt, p))
        and not any(p is bad for bad in BAD_PARAMS)
        and _fits_kv_cache(tokenizer, prompt, p)
        for (ok, prompt), p in calls
    ]
    if all(good):
        prepared = prepare(tokenizer, prompts, params)
        assert len(prepared) == len(prompts)
        for request, p in zip(prepared, params, strict=True):
            assert isinstance(request, PreparedRequest) and request.params is p
            ids = request.prompt_token_ids
            assert 0 < len(ids) < LIMITS.max_model_len
            assert all(type(t) is int and 0 <= t < LIMITS.vocab_size for t in ids)
    else:
        with pytest.raises((ValueError, TypeError)) as raised:
            prepare(tokenizer, prompts, params)
        assert f"prompts[{good.index(False)}]" in str(raised.value)
