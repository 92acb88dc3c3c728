"""The server's pure parts, no engine: error wording, body forms, CLI flags -> engine arguments."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from jaxinfer.cli import _parser
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.server.errors import validation_message
from jaxinfer.server.protocol import ChatCompletionRequest, CompletionRequest
from jaxinfer.server.sampling import chat_params, completion_params, request_error
from jaxinfer.server.serve import engine_arguments

USER = [{"role": "user", "content": "Hi"}]


def _sampling_error(**fields) -> ValueError:
    with pytest.raises(ValueError) as error:
        SamplingParams(**fields)
    return error.value


def test_engine_errors_are_reworded_with_the_request_field_names():
    chat = ChatCompletionRequest(messages=USER, max_completion_tokens=0)
    error = request_error(_sampling_error(max_tokens=0), chat, "messages", many=False)
    assert error.param == "max_completion_tokens"
    assert str(error).startswith("max_completion_tokens must be")
    # The prompt at fault, with a field named only as a hint: the prompt is the param.
    hint = ValueError(
        "prompts[1] has 200 tokens; ... (or set SamplingParams.truncate_prompt_tokens)"
    )
    error = request_error(hint, CompletionRequest(prompt=["a", "b"]), "prompt", many=True)
    assert error.param == "prompt"
    assert str(error) == "prompt[1] has 200 tokens; ... (or set truncate_prompt_tokens)"
    leading = ValueError("prompts[0]: SamplingParams.logprobs must be <= max_logprobs=5, got 9")
    error = request_error(leading, ChatCompletionRequest(messages=USER), "messages", many=False)
    assert error.param == "top_logprobs" and str(error).startswith("messages: top_logprobs must")


def test_server_defaults_fill_only_what_the_request_leaves_out():
    defaults = {"temperature": 0.3, "top_k": 7}
    params = completion_params(CompletionRequest(prompt="x", top_k=2), defaults)
    assert (params.temperature, params.top_k, params.max_tokens) == (0.3, 2, 16)
    params = chat_params(
        ChatCompletionRequest(messages=USER, max_tokens=5, max_completion_tokens=9), defaults
    )
    assert params.max_tokens == 9  # max_completion_tokens wins over the deprecated max_tokens
    assert chat_params(ChatCompletionRequest(messages=USER), {}).max_tokens is None


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ('{"prompt": 5}', "prompt: must be a string, a list of strings", "prompt"),
        ('{"prompt": "x", "n": true}', "n: Input should be a valid integer, got True", "n"),
        ('{"prompt": "x", "bogus": 1}', "unknown field 'bogus'", "bogus"),
        ('{"prompt": "x",', "the request body is not valid JSON", None),
    ],
)
def test_validation_messages_name_the_field(body, message, param):
    with pytest.raises(ValidationError) as error:
        CompletionRequest.model_validate_json(body)
    got, got_param = validation_message(error.value.errors())
    assert got.startswith(message) and got_param == param


def test_chat_content_union_tags_are_not_part_of_the_field_name():
    body = '{"messages": [{"role": "user", "content": 5}]}'
    with pytest.raises(ValidationError) as error:
        ChatCompletionRequest.model_validate_json(body)
    assert validation_message(error.value.errors())[1] == "messages.0.content"


def test_prompt_forms():
    assert CompletionRequest(prompt="a").prompts == ["a"]
    assert CompletionRequest(prompt=["a", "b"]).prompts == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2]).prompts == [[1, 2]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts == [[1], [2, 3]]
    for bad in ([], [1, "a"], [[]], [-1], [True]):
        with pytest.raises(ValidationError):
            CompletionRequest(prompt=bad)


def test_serve_flags_are_vllm_engine_arguments():
    args = _parser().parse_args(
        ["serve", "some/model", "--max-model-len", "64", "-tp", "2", "--no-enable-prefix-caching",
         "--gpu-memory-utilization", "0.5", "--seed", "3", "--port", "9000",
         "--kv-cache-dtype", "fp8"]
    )  # fmt: skip
    assert args.model_tag == "some/model" and args.port == 9000
    assert engine_arguments(args) == {
        "max_model_len": 64,
        "tensor_parallel_size": 2,
        "enable_prefix_caching": False,
        "gpu_memory_utilization": 0.5,
        "seed": 3,
        "kv_cache_dtype": "fp8",
    }
