"""Evaluation runs: byte-identical results files across runs and engines, order-free lines."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import jax
import pytest

from jaxinfer import Engine
from jaxinfer.cli import main
from jaxinfer.config_file import load_config_file
from jaxinfer.evaluation import derive_seed, read_prompts, run_eval

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu-test.yaml"

PROMPTS = [
    {"id": "seeded", "prompt": "The quick brown fox", "temperature": 0.9, "seed": 7},
    {"id": "logprobs", "prompt": "Once upon a time", "temperature": 0.8, "logprobs": 2},
    {"id": "two", "prompt": "red green blue", "temperature": 1.0, "n": 2, "max_tokens": 5},
    {"id": "chat", "messages": [{"role": "user", "content": "Name a colour."}], "seed": 3},
    {"prompt": "a b c", "stop_token_ids": [5], "logit_bias": {"7": 2.5}, "prompt_logprobs": 1},
    {"id": 42, "prompt": "The engine schedules many requests", "temperature": 0.7, "top_k": 20},
]
NUM_SAMPLES = 7  # "two" has n=2


def _write_prompts(path: Path, prompts: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="module")
def tiny_config_file(tiny_llama):
    return load_config_file(TINY_CONFIG, model=str(tiny_llama))


@pytest.fixture(scope="module")
def engine(tiny_config_file):
    with Engine(tiny_config_file.engine) as engine:
        yield engine


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_runs_in_separate_engines_write_the_same_bytes(
    engine, tiny_config_file, tiny_llama, tmp_path
):
    prompts = _write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    first, second = tmp_path / "cli.jsonl", tmp_path / "python.jsonl"
    argv = ["eval", "--config", str(TINY_CONFIG), "--model", str(tiny_llama), "--no-progress"]
    assert main([*argv, "--prompts", str(prompts), "--out", str(first)]) == 0  # its own engine
    results = run_eval(engine, prompts, second, sampling=tiny_config_file.sampling, use_tqdm=False)
    assert first.read_bytes() == second.read_bytes()
    assert _lines(second) == [results.header, *results.samples]

    header, *samples = _lines(first)
    assert header["type"] == "header" and header["num_requests"] == len(PROMPTS)
    weights = tiny_llama / "model.safetensors"
    assert (
        header["model_files"]["model.safetensors"]
        == hashlib.sha256(weights.read_bytes()).hexdigest()
    )
    assert "tokenizer.json" in header["model_files"]
    assert header["versions"]["jax"] == jax.__version__ and header["versions"]["jaxinfer"]
    assert header["device"]["device_kind"] == jax.devices()[0].device_kind
    assert header["engine_config"]["seq_buckets"] == [4]
    assert header["sampling_defaults"]["max_tokens"] == 8  # the config file's sampling section

    assert len(samples) == NUM_SAMPLES
    assert [(s["id"], s["sample"]) for s in samples] == [
        ("seeded", 0), ("logprobs", 0), ("two", 0), ("two", 1), ("chat", 0), (4, 0), (42, 0)
    ]  # fmt: skip
    by_id = {(s["id"], s["sample"]): s for s in samples}
    seeded, with_logprobs = by_id["seeded", 0], by_id["logprobs", 0]
    assert (seeded["seed"], seeded["seed_derived"]) == (7, False)
    assert seeded["sampling_params"]["temperature"] == 0.9
    assert seeded["sampling_params"]["max_tokens"] == 8 and seeded["logprobs"] is None
    assert seeded["cumulative_logprob"] is None  # as vLLM: only with logprobs
    assert with_logprobs["seed"] == derive_seed(0, "logprobs") and with_logprobs["seed_derived"]
    assert len(with_logprobs["logprobs"]) == len(with_logprobs["token_ids"])
    for token, position in zip(with_logprobs["token_ids"], with_logprobs["logprobs"], strict=True):
        assert position[0]["token_id"] == token and 2 <= len(position) <= 3
    assert with_logprobs["cumulative_logprob"] == pytest.approx(
        sum(position[0]["logprob"] for position in with_logprobs["logprobs"]), abs=1e-4
    )
    assert by_id["two", 0]["token_ids"] != by_id["two", 1]["token_ids"]
    assert by_id["chat", 0]["messages"] == PROMPTS[3]["messages"]
    assert by_id["chat", 0]["prompt"].startswith("<|bos|><|im_start|>user\nName a colour.")
    unnamed = by_id[4, 0]
    assert unnamed["sampling_params"]["logit_bias"] == {"7": 2.5}
    assert unnamed["sampling_params"]["temperature"] == 0.0  # the config's greedy default
    assert len(unnamed["prompt_logprobs"]) == len(unnamed["prompt_token_ids"])
    assert unnamed["prompt_logprobs"][0] is None
    assert unnamed["finish_reason"] in ("stop", "length")
    tokenizer = engine.get_tokenizer()
    for sample in samples:
        assert sample["text"] == tokenizer.decode(sample["token_ids"], skip_special_tokens=True)


def test_shuffled_order_gives_the_same_per_request_lines(engine, tmp_path, capsys):
    """Tokens do not depend on the batch, so lines without logprobs match byte for byte; logprobs
    may move in the last float32 bits when the batches differ, so those are compared closely."""
    shuffled = PROMPTS[:4] + [{"id": 4, **PROMPTS[4]}] + PROMPTS[5:]  # position ids made explicit
    random.Random(1).shuffle(shuffled)
    assert [p.get("id") for p in shuffled] != [p.get("id", i) for i, p in enumerate(PROMPTS)]
    in_order = run_eval(engine, PROMPTS, tmp_path / "a.jsonl", use_tqdm=False)
    reordered = run_eval(engine, shuffled, tmp_path / "b.jsonl", use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err  # generate's progress bar

    def by_key(results):
        return {(s["id"], s["sample"]): s for s in results.samples}

    expected, got = by_key(in_order), by_key(reordered)
    assert expected.keys() == got.keys() and len(expected) == NUM_SAMPLES
    for key, line in expected.items():
        floats = ("logprobs", "prompt_logprobs", "cumulative_logprob")
        if all(line[name] is None for name in floats):
            assert json.dumps(line, sort_keys=True) == json.dumps(got[key], sort_keys=True), key
            continue
        assert {k: v for k, v in line.items() if k not in floats} == {
            k: v for k, v in got[key].items() if k not in floats
        }, key
        assert line["cumulative_logprob"] == pytest.approx(got[key]["cumulative_logprob"], abs=1e-4)
    assert in_order.header == reordered.header


def test_derived_seeds_depend_on_the_engine_seed_and_the_id_only():
    assert derive_seed(0, "a") == derive_seed(0, "a") == 3648530762  # fixed forever
    assert (
        len({derive_seed(0, "a"), derive_seed(1, "a"), derive_seed(0, "b"), derive_seed(0, 0)}) == 4
    )
    assert all(0 <= derive_seed(s, i) < 2**32 for s in range(3) for i in range(50))


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"prompt": "a", "temprature": 1}', r"line 2: unknown key\(s\) \['temprature'\]"),
        ('{"prompt": "a", "messages": []}', r"line 2: give exactly one of 'prompt'"),
        ('{"id": 1}', r"line 2: give exactly one of 'prompt'"),
        ('{"prompt": ""}', r"line 2: 'prompt' must be a non-empty string"),
        ('{"messages": [{"role": "user"}]}', r"line 2: 'messages' must be"),
        ('{"prompt": "a", "temperature": -1}', r"line 2: SamplingParams\.temperature"),
        ('{"prompt": "a", "id": "x"}', r"line 2: id 'x' repeats line 1"),
        ('{"prompt": "a", "id": [1]}', r"line 2: 'id' must be a string or an int"),
        ('["a"]', r"line 2: expected a JSON object"),
        ("{not json", r"line 2: not valid JSON"),
    ],
)
def test_bad_prompt_lines_name_the_file_and_line(tmp_path, line, pattern):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "x", "prompt": "first"}\n' + line + "\n")
    with pytest.raises(ValueError, match=pattern) as error:
        read_prompts(path)
    assert str(path) in str(error.value)


def test_a_bad_prompt_file_fails_before_any_engine_is_built(tmp_path):
    path = _write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "a", "n": 0}])
    # The config points at no model: reaching the engine would fail with another message.
    with pytest.raises(ValueError, match=r"line 1: SamplingParams\.n"):
        run_eval(load_config_file(TINY_CONFIG, model="/no/such/model"), path, tmp_path / "o")
    assert not (tmp_path / "o").exists()
