"""The public API end to end: prompt forms, outputs, stop conditions, bad input, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxinfer import LLM, CompletionOutput, Engine, EngineConfig, RequestOutput, SamplingParams
from jaxinfer.cli import INSTALL_HINT, main

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    return Engine(
        EngineConfig(model=str(tiny_llama), dtype="float32", max_model_len=128, num_kv_blocks=64)
    )


def _all_blocks_free(engine: Engine) -> bool:
    return (
        engine.llm_engine.block_manager.num_free_blocks
        == engine.llm_engine.block_manager.num_usable_blocks
    )


def test_prompt_forms_give_the_same_tokens(engine):
    text = "The quick brown fox"
    ids = engine.get_tokenizer().encode(text)
    by_text = engine.generate(text, GREEDY, use_tqdm=False)
    by_list = engine.generate([text, text], GREEDY, use_tqdm=False)
    by_ids = engine.generate(ids, GREEDY, use_tqdm=False)
    by_dict = engine.generate([{"prompt_token_ids": ids}], GREEDY, use_tqdm=False)
    expected = by_text[0].outputs[0].token_ids
    assert len(expected) == 8
    for outputs in (by_list, by_ids, by_dict):
        assert all(o.outputs[0].token_ids == expected for o in outputs)
    assert by_text[0].prompt == text and by_ids[0].prompt is None
    assert by_text[0].prompt_token_ids == ids


def test_output_objects_have_vllm_fields(engine):
    out = engine.generate(["a b c", "d e"], GREEDY, use_tqdm=False)
    assert [type(o) for o in out] == [RequestOutput, RequestOutput]
    assert out[0].request_id != out[1].request_id
    completion = out[0].outputs[0]
    assert isinstance(completion, CompletionOutput) and completion.index == 0
    assert completion.text == engine.get_tokenizer().decode(
        completion.token_ids, skip_special_tokens=True
    )
    assert completion.finish_reason == "length" and completion.stop_reason is None
    assert completion.cumulative_logprob is None  # vLLM: only when logprobs are requested
    with_logprobs = engine.generate(
        "a b c", SamplingParams(temperature=0, max_tokens=4, logprobs=0)
    )
    assert with_logprobs[0].outputs[0].cumulative_logprob < 0


def test_per_prompt_sampling_params_and_input_order(engine):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 1)]
    out = engine.generate(["one", "two three", "four"], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 9, 1]
    assert [o.prompt for o in out] == ["one", "two three", "four"]


def test_stop_token_ids_and_eos(engine):
    prompt = "Once upon a time"
    free_run = engine.generate(
        prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    tokens = free_run[0].outputs[0].token_ids
    stop_at = tokens[4]
    first = tokens.index(stop_at)
    stopped = engine.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at], ignore_eos=True),
    )[0].outputs[0]
    assert stopped.token_ids == tokens[: first + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_at)
    # The same token as the model's eos: generation stops there unless ignore_eos.
    eos_before = engine.llm_engine.eos_token_ids
    engine.llm_engine.eos_token_ids = (stop_at,)
    try:
        as_eos = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    finally:
        engine.llm_engine.eos_token_ids = eos_before
    assert as_eos.token_ids == tokens[: first + 1]
    assert (as_eos.finish_reason, as_eos.stop_reason) == ("stop", None)
    assert _all_blocks_free(engine)


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = engine.generate("seeded", params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=n, ignore_eos=True) for n in (5, 20, 9)]
    batch = engine.generate(
        ["x y", "seeded", "z", "long prompt here"], [others[0], params, *others[1:]]
    )
    assert batch[1].outputs[0].token_ids == alone
    different_seed = SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True)
    assert engine.generate("seeded", different_seed)[0].outputs[0].token_ids != alone


def test_max_tokens_none_runs_to_max_model_len(engine):
    out = engine.generate(
        [[5] * 100], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    )
    assert len(out[0].outputs[0].token_ids) == 28  # max_model_len 128 - 100 prompt tokens
    assert out[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([[5] * 128], r"prompts\[1\] has 128 tokens.*max_model_len=128"),
        ([[]], r"prompts\[1\] is empty"),
        ([[5, 600]], r"prompts\[1\]: token ids must be in \[0, vocab_size=512\)"),
        ([3.5], r"prompts\[1\] must be a str.*got float"),
    ],
)
def test_bad_prompt_rejected_before_any_work(engine, prompts, message):
    steps_before = engine.num_compilations
    with pytest.raises((ValueError, TypeError), match=message):
        engine.generate(["a good prompt", *prompts], GREEDY, use_tqdm=False)
    assert engine.llm_engine.scheduler.num_waiting == engine.llm_engine.scheduler.num_running == 0
    assert _all_blocks_free(engine) and engine.num_compilations == steps_before
    # The engine is unharmed: the good prompt alone still runs.
    assert engine.generate("a good prompt", GREEDY, use_tqdm=False)[0].finished


def test_bad_sampling_params_are_rejected(engine):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        engine.generate(["a", "b"], [GREEDY])
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.generate("a", SamplingParams(stop_token_ids=[10**6]))


def test_llm_alias_takes_vllm_style_keywords(tiny_llama):
    llm = LLM(model=str(tiny_llama), dtype="float32", max_model_len=64, num_kv_blocks=16)
    assert isinstance(llm, Engine) and llm.config.max_model_len == 64
    assert llm.generate("hi", GREEDY)[0].outputs[0].token_ids


def test_max_model_len_defaults_to_and_is_checked_against_the_model(tiny_llama):
    engine = Engine(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=33))
    assert engine.config.max_model_len == 512
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        Engine(EngineConfig(model=str(tiny_llama), max_model_len=4096, num_kv_blocks=16))


def test_kv_cache_sized_from_memory_budget(tiny_llama):
    from jaxinfer.runtime.kv_cache import bytes_per_block

    budget = 1 << 20
    engine = Engine(
        EngineConfig(
            model=str(tiny_llama), dtype="float32", max_model_len=512, kv_cache_memory_bytes=budget
        )
    )
    per_block = bytes_per_block(engine.llm_engine.model.model_config, 16, "float32")
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4  # layers * (k, v) * tokens * kv heads * dim * bytes
    assert engine.llm_engine.runner.num_blocks == budget // per_block
    k_cache, _ = engine.llm_engine.runner.kv_cache[0]
    assert k_cache.shape == (2, budget // per_block, 16, 16)  # [K, N, P, D]


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="EngineConfig.block_size"):
        EngineConfig(model="x", block_size=12)
    with pytest.raises(ValueError, match="EngineConfig.dtype"):
        EngineConfig(model="x", dtype="int8")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(model="x", gpu_memory_utilization=1.5)


def test_missing_folder_unknown_architecture_and_corrupt_weights(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Engine(EngineConfig(model=str(tmp_path / "nowhere")))
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_llama, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (unknown / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="supported: .*LlamaForCausalLM"):
        Engine(EngineConfig(model=str(unknown)))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt safetensors"):
        Engine(EngineConfig(model=str(corrupt)))


def test_loading_names_unmapped_missing_and_misshapen_tensors(tiny_llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tiny_llama / "model.safetensors")

    def engine_with(changed: dict) -> None:
        folder = tmp_path / f"variant{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_llama, folder)
        save_file(changed, folder / "model.safetensors")
        Engine(EngineConfig(model=str(folder), num_kv_blocks=8))

    with pytest.raises(ValueError, match="'model.layers.0.extra.weight' .* not used"):
        engine_with({**tensors, "model.layers.0.extra.weight": np.zeros(3, np.float32)})
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="missing .*model.layers.1.mlp.up_proj.weight"):
        engine_with(missing)
    bad_shape = dict(tensors)
    bad_shape["model.norm.weight"] = np.ones(7, np.float32)
    with pytest.raises(ValueError, match="'model.norm.weight' has shape \\(7,\\)"):
        engine_with(bad_shape)


def test_cli_generates_with_a_given_model(tiny_llama, capsys):
    assert (
        main(["generate", "--model", str(tiny_llama), "--prompt", "hello", "--max-tokens", "4"])
        == 0
    )
    printed = capsys.readouterr()
    assert "finish_reason=" in printed.out and "4 tokens" in printed.out
    assert "jaxinfer: compiling the prefill step" in printed.err


def test_cli_explains_how_to_get_a_missing_default_model(monkeypatch, capsys):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert main(["generate", "--prompt", "hi"]) == 2
    assert INSTALL_HINT in capsys.readouterr().err


def test_cli_default_model_runs(smollm2_gguf):
    """The README's first command, as a subprocess: SmolLM2 by default, greedy."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxinfer.cli",
            "generate",
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "8",
            "--max-model-len",
            "256",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert "Paris" in result.stdout  # flushed before console_main's immediate exit
    assert result.stdout.rstrip().endswith("finish_reason=length")
    assert "jaxinfer: compiling the decode step" in result.stderr  # the user is told why it waits
    # One prompt: max_num_seqs defaults to 1, so the cache holds one 256-token sequence (16
    # blocks of 16) plus the null block, not 16 sequences' worth.
    assert "KV cache: 17 blocks x 16 tokens" in result.stderr


def test_generation_config_supplies_default_sampling_params(tiny_llama, tmp_path):
    folder = tmp_path / "with-defaults"
    shutil.copytree(tiny_llama, folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    generation.update(do_sample=False, max_new_tokens=5, eos_token_id=[])
    (folder / "generation_config.json").write_text(json.dumps(generation))
    engine = Engine(
        EngineConfig(model=str(folder), dtype="float32", num_kv_blocks=16, max_model_len=64)
    )
    assert engine.get_default_sampling_params().temperature == 0.0
    out = engine.generate("hello there")[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    # Explicit params win over the checkpoint's defaults.
    assert (
        len(engine.generate("hello there", SamplingParams(max_tokens=2))[0].outputs[0].token_ids)
        == 2
    )


def test_compilation_cache_dir_persists_executables(tiny_llama, tmp_path):
    """JAX's persistent cache is process-global, so this runs in a subprocess."""
    cache = tmp_path / "xla-cache"
    script = (
        "from jaxinfer import Engine, EngineConfig, SamplingParams\n"
        f"e = Engine(EngineConfig(model={str(tiny_llama)!r}, dtype='float32', max_model_len=64,"
        f" num_kv_blocks=8, max_num_seqs=1, compilation_cache_dir={str(cache)!r}))\n"
        "e.generate('hi', SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    assert len(list(cache.iterdir())) >= 2  # at least one step and one cache writer


def test_progress_bar_reports_requests_and_token_rates(engine, capsys):
    engine.generate(["one", "two three"], GREEDY, use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "2/2" in err
    assert "est. speed input:" in err and "toks/s, output:" in err
    engine.generate(["one"], GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_kv_cache_too_small_for_one_sequence_is_refused_at_construction(tiny_llama):
    with pytest.raises(ValueError, match=r"holds 240 tokens .*max_model_len=512.*at most 240"):
        Engine(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=16))
