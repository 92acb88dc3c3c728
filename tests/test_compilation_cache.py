"""The persistent compilation cache: on by default, where it lives, and keys that do not depend on
where the checkpoint or the working folder is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxinfer import cli
from jaxinfer.config import COMPILATION_CACHE_ENV, EngineConfig, default_compilation_cache_dir

ROOT = Path(__file__).resolve().parents[1]


def _cache_dir(**fields) -> str | None:
    return EngineConfig(model="unused", **fields).compilation_cache_dir


def test_default_is_the_user_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(COMPILATION_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = Path(_cache_dir())
    assert default.parent == tmp_path / "xdg" / "jaxinfer" / "xla"
    assert default.name.count("-") == 1  # <machine>-<cpu feature hash>: one folder per CPU type
    assert _cache_dir() == default_compilation_cache_dir() == str(default)  # stable

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Path(_cache_dir()).parent == tmp_path / "home" / ".cache" / "jaxinfer" / "xla"


def test_environment_variable_and_explicit_values(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(COMPILATION_CACHE_ENV, str(tmp_path / "from-env"))
    assert _cache_dir() == str(tmp_path / "from-env")
    for off in ("", "off", "OFF"):
        monkeypatch.setenv(COMPILATION_CACHE_ENV, off)
        assert _cache_dir() is None
    # Explicit values win over the environment; None, "" and "off" turn the cache off.
    monkeypatch.setenv(COMPILATION_CACHE_ENV, str(tmp_path / "from-env"))
    for off in (None, "", "off", " Off "):
        assert _cache_dir(compilation_cache_dir=off) is None
    assert _cache_dir(compilation_cache_dir="~/xla") == str(tmp_path / "xla")
    config = EngineConfig(model="unused", compilation_cache_dir="off")
    assert config.replace(max_num_seqs=3).compilation_cache_dir is None
    with pytest.raises(ValueError, match="compilation_cache_dir"):
        EngineConfig(model="unused", compilation_cache_dir=3)


def test_cli_uses_the_default_unless_told(monkeypatch, tmp_path):
    monkeypatch.setenv(COMPILATION_CACHE_ENV, str(tmp_path / "xla"))
    model = str(tmp_path)  # never loaded here
    parse = cli._parser().parse_args
    loaded = cli._load(parse(["generate", "--model", model, "--prompt", "x"]))
    assert loaded.engine.compilation_cache_dir == str(tmp_path / "xla")
    flags = ["generate", "--model", model, "--prompt", "x", "--compilation-cache-dir", "off"]
    assert cli._load(parse(flags)).engine.compilation_cache_dir is None


_GENERATE = (
    "import sys\n"
    "from jaxinfer import Engine, EngineConfig, SamplingParams\n"
    "e = Engine(EngineConfig(model=sys.argv[1], dtype='float32', max_model_len=64,"
    " num_kv_blocks=8, max_num_seqs=1))\n"
    "print(e.generate('hi', SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)"
    "[0].outputs[0].token_ids)\n"
)


def _entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if not p.name.endswith("-atime")}


def test_library_default_on_and_keys_independent_of_paths(tiny_llama, tmp_path):
    """An engine given no compilation_cache_dir persists its programs (here under the folder the
    environment names), and a second process, with the checkpoint copied elsewhere and another
    working folder, finds every one of them: nothing path-dependent is in the keys."""
    cache = tmp_path / "xla"
    env = {**os.environ, COMPILATION_CACHE_ENV: str(cache)}
    env["PYTHONPATH"] = str(ROOT)
    elsewhere = shutil.copytree(tiny_llama, tmp_path / "somewhere" / "else" / "llama")
    runs = []
    for model, cwd in ((tiny_llama, ROOT), (elsewhere, tmp_path)):
        done = subprocess.run(
            [sys.executable, "-c", _GENERATE, str(model)],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append((done.stdout.strip().splitlines()[-1], _entries(cache)))
    (tokens, first), (tokens_again, second) = runs
    assert len(first) >= 2  # at least one step and one cache writer
    assert second == first  # all hits: no new entry
    assert tokens_again == tokens
