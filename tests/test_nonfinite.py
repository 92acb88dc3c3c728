"""NaN and inf: non-finite weights are found at load naming the tensor, and a step whose logits are
not finite never becomes a token: the request ends with finish_reason "error" (vLLM's) and
`generate()` raises naming it, with its blocks freed and the other requests unharmed."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxinfer import LLM, SamplingParams
from jaxinfer.engine.offline import NonFiniteLogitsError
from tests.checkpoints import hf_greedy, hf_model

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _with_tensors(tiny_llama, folder, **changes):
    """A copy of the tiny checkpoint with some tensors' values changed: name -> fn(array)."""
    shutil.copytree(tiny_llama, folder)
    tensors = load_file(folder / "model.safetensors")
    for name, change in changes.items():
        tensors[name] = change(tensors[name].copy())
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _set(index, value):
    def change(array):
        array[index] = value
        return array

    return change


def test_non_finite_weights_are_found_at_load_naming_the_tensor(tiny_llama, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    nan = _with_tensors(tiny_llama, tmp_path / "nan", **{name: _set((3, 5), np.nan)})
    with pytest.raises(ValueError, match=re.escape(f"tensor {name!r} holds 1 non-finite value")):
        LLM(model=str(nan))
    # float16 ends at 65504: a weight that fits float32 overflows to inf in the cast.
    big = _with_tensors(tiny_llama, tmp_path / "big", **{name: _set((0, 0), 1e6)})
    with pytest.raises(ValueError, match=re.escape(f"{name!r} holds 1 non-finite value(s)")):
        LLM(model=str(big), dtype="float16")
    with LLM(model=str(big), max_model_len=64, num_kv_blocks=8, max_num_seqs=2) as llm:
        assert llm.llm_engine.model.dtype == "float32"  # which holds it


@pytest.fixture(scope="module")
def poisoned(tiny_llama, tmp_path_factory):
    """(engine, prompts, transformers' greedy tokens, the poisoned token): one embedding row is
    NaN, so any sequence that reads that token gets NaN logits from then on; the load check is
    off to let it through. `prompts["decode"]` generates the token itself at its 4th step."""
    reference = hf_model(tiny_llama)
    tokenizer_prompts = {
        "decode": [0, 51, 82, 71, 73, 225, 89, 84, 83, 82, 269, 261, 491, 73],
        "good": [0, 474, 446, 265, 86, 83, 91, 82, 435, 83, 92],
    }
    expected = {k: hf_greedy(reference, p, NEW_TOKENS) for k, p in tokenizer_prompts.items()}
    token = expected["decode"][3]
    clean = [*tokenizer_prompts["good"], *expected["good"], *tokenizer_prompts["decode"]]
    assert token not in clean + expected["decode"][:3]  # only where the test puts it
    prompts = {**tokenizer_prompts, "prefill": [0, 474, token, 446]}
    folder = _with_tensors(
        tiny_llama,
        tmp_path_factory.mktemp("poisoned") / "ckpt",
        **{"model.embed_tokens.weight": _set(token, np.nan)},
    )
    with LLM(
        model=str(folder),
        check_weights_finite=False,
        max_model_len=64,
        num_kv_blocks=32,
        max_num_seqs=4,
        # One prompt per prefill step: the reference prefill attention contracts every token's
        # weights with the values of all the step's tokens (zero weights for other sequences',
        # but 0 * NaN is NaN), so a NaN prompt also fails the prompts prefilled beside it.
        max_prefill_seqs=1,
    ) as llm:
        yield llm, prompts, expected, token


def _all_blocks_free(llm) -> bool:
    core = llm.llm_engine
    return (
        not core.has_unfinished_requests()
        and core.block_manager.num_free_blocks == core.block_manager.num_usable_blocks
    )


def test_non_finite_logits_raise_naming_the_request_and_leave_the_engine_usable(poisoned):
    llm, prompts, expected, _ = poisoned
    batch = [{"prompt_token_ids": prompts[k]} for k in ("good", "prefill", "good")]
    with pytest.raises(
        NonFiniteLogitsError,
        match=r"request \d+ \(prompt 1 of this call\): the model's logits were not finite "
        r"\(NaN or inf\) after 0 generated token\(s\)",
    ):
        llm.generate(batch, GREEDY, use_tqdm=False)
    assert _all_blocks_free(llm)
    (good,) = llm.generate({"prompt_token_ids": prompts["good"]}, GREEDY, use_tqdm=False)
    assert good.outputs[0].token_ids == expected["good"]


def _doomed_beside_fine(llm, prompts, expected, token) -> None:
    """Step the engine (vLLM's LLMEngine API) through a request that generates the poisoned
    token at its 4th step beside a clean one: the first ends with finish_reason "error" and the
    tokens it really generated, none invented; the other is unharmed; every block is free."""
    core = llm.llm_engine
    core.add_request("doomed", {"prompt_token_ids": prompts["decode"]}, GREEDY)
    core.add_request("fine", {"prompt_token_ids": prompts["good"]}, GREEDY)
    final = {}
    while core.has_unfinished_requests():
        for output in core.step():
            if output.finished:
                final[output.request_id] = output.outputs[0]
    assert final["doomed"].finish_reason == "error"
    assert final["doomed"].token_ids == expected["decode"][:4]  # ends with the poisoned token
    assert final["doomed"].token_ids[-1] == token
    assert final["fine"].finish_reason == "length"
    assert final["fine"].token_ids == expected["good"]
    assert _all_blocks_free(llm)


def test_a_request_ends_with_finish_reason_error_and_its_real_tokens(poisoned):
    """Step by step (the vLLM LLMEngine API), in steady decoding, where the next step is already
    dispatched when the poisoned one comes back (async scheduling): the request ends with the
    tokens it really generated, none invented, and the request beside it is unharmed."""
    llm, prompts, expected, token = poisoned
    steps_ahead = llm.llm_engine.stats.num_steps_ahead
    _doomed_beside_fine(llm, prompts, expected, token)
    assert llm.llm_engine.stats.num_steps_ahead > steps_ahead  # the run-ahead path was taken


def test_multi_step_decode_ends_the_request_mid_call_with_its_real_tokens(poisoned):
    """The same under multi-step decode (num_scheduler_steps): the NaN step falls inside a call
    of several steps; the request ends there with the tokens it really generated, and the
    request beside it goes on with transformers' tokens."""
    llm, prompts, expected, token = poisoned
    with LLM(llm.llm_engine.config.replace(num_scheduler_steps=4)) as multi:
        _doomed_beside_fine(multi, prompts, expected, token)
        assert multi.llm_engine.stats.num_multi_step_calls >= 1


def test_stream_raises_naming_the_request(poisoned):
    llm, prompts, expected, _ = poisoned
    received = []
    with pytest.raises(NonFiniteLogitsError, match=r"after 4 generated token\(s\)"):
        for output in llm.stream({"prompt_token_ids": prompts["decode"]}, GREEDY):
            received += output.outputs[0].token_ids
    assert received == expected["decode"][:4]
    assert _all_blocks_free(llm)


def test_async_engine_raises_naming_the_request(poisoned):
    """The server's engine: the generator raises (the server answers 500, as vLLM), and the
    engine goes on serving."""
    import asyncio

    from jaxinfer.engine.async_engine import AsyncEngine

    llm, prompts, expected, _ = poisoned

    async def run() -> list[int]:
        engine = AsyncEngine(llm)  # not shut down: that would free the module's engine
        with pytest.raises(NonFiniteLogitsError, match="after 4 generated token"):
            async for _ in engine.generate({"prompt_token_ids": prompts["decode"]}, GREEDY):
                pass
        async for output in engine.generate({"prompt_token_ids": prompts["good"]}, GREEDY):
            final = output
        return final.outputs[0].token_ids

    assert asyncio.run(run()) == expected["good"]
    assert _all_blocks_free(llm)
