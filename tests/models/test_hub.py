"""Models named by Hugging Face hub id (models/hub.py), offline, from a hub cache that the test
lays out itself (models--org--name/snapshots/<commit>/..., refs/<name>) from the tiny checkpoint:
huggingface_hub reads it as it reads what `hf download` leaves. Nothing is downloaded."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants

from jaxinfer import LLM, SamplingParams
from jaxinfer.models.loader import CheckpointSource, load_tokenizer
from tests.checkpoints import hf_greedy
from tests.gguf_checkpoint import write_llama_gguf

MAIN = "1" * 40  # commit hashes, as the hub names snapshot folders
OLDER = "2" * 40


def _snapshot(cache: Path, repo: str, commit: str, refs: tuple[str, ...] = ()) -> Path:
    folder = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    folder.mkdir(parents=True)
    for ref in refs:
        (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir(exist_ok=True)
        (cache / f"models--{repo.replace('/', '--')}" / "refs" / ref).write_text(commit)
    return folder


@pytest.fixture
def hub_cache(tiny_llama, tmp_path, monkeypatch):
    """$HF_HUB_CACHE (as huggingface_hub read it at import) -> a cache holding "org/tiny" (main:
    the tiny checkpoint; tag "v1": the same without its generation_config.json) and
    "org/tiny-GGUF" (the same weights as GGUF files of two "quantizations")."""
    assert constants.HF_HUB_OFFLINE  # tests/conftest.py: nothing here may reach the hub
    cache = tmp_path / "hub"
    shutil.copytree(tiny_llama, _snapshot(cache, "org/tiny", MAIN, ("main",)), dirs_exist_ok=True)
    older = _snapshot(cache, "org/tiny", OLDER, ("v1",))
    shutil.copytree(tiny_llama, older, dirs_exist_ok=True)
    (older / "generation_config.json").unlink()
    gguf = _snapshot(cache, "org/tiny-GGUF", MAIN, ("main",))
    write_llama_gguf(tiny_llama, gguf / "tiny-F32.gguf")
    shutil.copy(gguf / "tiny-F32.gguf", gguf / "tiny.Q8_0.gguf")  # a second file, another name
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_generates_from_the_cache_offline(hub_cache, tiny_llama):
    prompt = [0, 474, 446, 265, 86, 83]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(model="org/tiny", max_model_len=64, num_kv_blocks=32, max_num_seqs=4) as llm:
        assert (
            llm.llm_engine.model.source.folder == hub_cache / "models--org--tiny/snapshots" / MAIN
        )
        (out,) = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    assert out.outputs[0].token_ids == hf_greedy(tiny_llama, prompt, 6)


def test_revision_picks_the_snapshot(hub_cache, tmp_path):
    snapshots = hub_cache / "models--org--tiny" / "snapshots"
    for revision, commit in [(None, MAIN), ("main", MAIN), ("v1", OLDER), (OLDER, OLDER)]:
        source = CheckpointSource.resolve("org/tiny", revision=revision)
        assert source.folder == snapshots / commit, revision
    # vLLM's download_dir: the same cache named explicitly instead of through $HF_HUB_CACHE.
    moved = tmp_path / "elsewhere"
    shutil.copytree(hub_cache, moved)
    source = CheckpointSource.resolve("org/tiny", revision="v1", download_dir=str(moved))
    assert source.folder == moved / "models--org--tiny" / "snapshots" / OLDER
    with pytest.raises(ValueError, match=r"revision v2\) is not in the hub cache .*HF_HUB_OFFLINE"):
        CheckpointSource.resolve("org/tiny", revision="v2")


def test_offline_and_not_cached_says_what_to_do(hub_cache):
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"hub repo 'org/absent' (revision main) is not in the hub cache {hub_cache}"
        )
        + r", and HF_HUB_OFFLINE is set\. Download it while online \(`hf download org/absent`\)",
    ):
        LLM(model="org/absent")


def test_gguf_files_in_a_repo(hub_cache, tiny_llama):
    """transformers' gguf_file= and vLLM's "repo:QUANT" spellings, and a tokenizer by hub id."""
    folder = hub_cache / "models--org--tiny-GGUF" / "snapshots" / MAIN
    by_name = CheckpointSource.resolve("org/tiny-GGUF", gguf_file="tiny.Q8_0.gguf")
    assert (by_name.folder, by_name.gguf_file) == (folder, folder / "tiny.Q8_0.gguf")
    by_quant = CheckpointSource.resolve("org/tiny-GGUF:F32")
    assert by_quant.gguf_file == folder / "tiny-F32.gguf"
    assert CheckpointSource.resolve("org/tiny-GGUF:q8_0").gguf_file == folder / "tiny.Q8_0.gguf"
    with pytest.raises(ValueError, match=r"org/tiny-GGUF:Q4_K_M: no GGUF file named \*-Q4_K_M"):
        CheckpointSource.resolve("org/tiny-GGUF:Q4_K_M")
    tokenizer = load_tokenizer(by_quant, "org/tiny", revision="v1")
    assert (
        tokenizer("hello")["input_ids"]
        == load_tokenizer(CheckpointSource.resolve(str(tiny_llama)))("hello")["input_ids"]
    )


def test_revision_of_a_local_path_and_token_strings_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="revision='v1' applies to a Hugging Face hub id"):
        LLM(model=str(tiny_llama), revision="v1")
    with pytest.raises(
        ValueError, match=r"hf_token=<a token> is not supported: put the token"
    ) as e:
        LLM(model=str(tiny_llama), hf_token="hf_secret")
    assert "hf_secret" not in str(e.value)
