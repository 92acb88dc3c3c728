"""The orbax weight cache: bitwise round trip, never stale, damaged entries ignored.

Checkpoints are copied into a temp folder so they can be touched and rewritten. The "racy"
guard (no saving while a file is younger than RACY_SECONDS) is off except in its own test: the
copies are seconds old at most.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxinfer import Engine, SamplingParams
from jaxinfer.models import loader, weight_cache
from jaxinfer.models.loader import CheckpointSource, load_model
from tests.checkpoints import hf_greedy


@pytest.fixture(autouse=True)
def no_racy_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weight_cache, "RACY_SECONDS", 0.0)


@pytest.fixture
def checkpoint(tiny_llama: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "checkpoint"))


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "weight-cache"


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """One entry per checkpoint conversion (a cache miss)."""
    calls: list[str] = []
    convert = loader._convert_params

    def counted(source, *args):
        calls.append(str(source.folder))
        return convert(source, *args)

    monkeypatch.setattr(loader, "_convert_params", counted)
    return calls


def _load(folder: Path, cache_dir: Path | None, dtype: str = "float32") -> dict:
    cache = None if cache_dir is None else str(cache_dir)
    return load_model(CheckpointSource.resolve(str(folder)), dtype, cache).params


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if not p.name.startswith("."))


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bitwise(checkpoint: Path, cache_dir: Path, conversions, dtype) -> None:
    plain = _load(checkpoint, None, dtype)
    saved = _load(checkpoint, cache_dir, dtype)
    assert len(conversions) == 2 and len(_entries(cache_dir)) == 1
    restored = _load(checkpoint, cache_dir, dtype)
    assert len(conversions) == 2  # served from the cache
    _assert_bitwise_equal(restored, plain)
    _assert_bitwise_equal(saved, plain)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert all(leaf.sharding == device for leaf in jax.tree.leaves(restored))


def test_restore_places_weights_on_a_mesh(checkpoint: Path, cache_dir: Path, conversions) -> None:
    """Restored straight into the mesh's shardings (a 1-device mesh here; orbax keeps arrays
    whole, so any mesh shape restores the same entry)."""
    from jaxinfer.runtime.mesh import build_mesh, named_sharding

    mesh = build_mesh(1)
    source = CheckpointSource.resolve(str(checkpoint))
    plain = _load(checkpoint, None)
    _load(checkpoint, cache_dir)
    model = load_model(source, "float32", str(cache_dir), mesh)
    assert len(conversions) == 2  # the second load restored
    _assert_bitwise_equal(model.params, plain)
    specs = model.family.declare_weights(model.model_config)
    assert model.params["layers"][0]["q"].sharding == named_sharding(
        mesh, specs["layers.0.q"].logical_axes
    )


def test_engine_from_cache_generates_the_same_tokens(
    checkpoint: Path, cache_dir: Path, conversions
) -> None:
    """The first engine converts and saves; the second restores and generates what transformers
    generates from the safetensors (compiling one engine's steps costs ~10 s here, not two)."""
    options = {  # small shapes: few buckets to compile
        "weight_cache_dir": str(cache_dir),
        "num_kv_blocks": 8,
        "max_model_len": 64,
        "max_num_seqs": 1,
        "max_num_batched_tokens": 16,
    }
    Engine(model=str(checkpoint), **options).shutdown()
    with Engine(model=str(checkpoint), **options) as engine:
        assert len(conversions) == 1  # restored, not converted
        prompt = engine.get_tokenizer().encode("Once upon a time")
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        output = engine.generate([prompt], params, use_tqdm=False)[0]
    assert output.outputs[0].token_ids == hf_greedy(checkpoint, prompt, max_new_tokens=8)


def test_touched_file_misses_and_replaces_the_old_entry(
    checkpoint: Path, cache_dir: Path, conversions
) -> None:
    _load(checkpoint, cache_dir)
    (old_entry,) = _entries(cache_dir)
    weights = checkpoint / "model.safetensors"
    stat = weights.stat()
    # An older mtime (a future one would be "racy" and not cached); ctime moves regardless.
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10_000_000_000))
    _load(checkpoint, cache_dir)
    assert len(conversions) == 2
    (new_entry,) = _entries(cache_dir)  # the stale entry was evicted
    assert new_entry != old_entry


def test_rewritten_tensor_is_never_served_stale(
    checkpoint: Path, cache_dir: Path, conversions
) -> None:
    before = _load(checkpoint, cache_dir)
    weights = checkpoint / "model.safetensors"
    size = weights.stat().st_size
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size  # same size: only the stat times and content differ
    after = _load(checkpoint, cache_dir)
    assert len(conversions) == 2
    np.testing.assert_array_equal(
        np.asarray(after["final_norm"]), np.asarray(before["final_norm"]) + 1.0
    )


def test_config_change_misses(checkpoint: Path, cache_dir: Path, conversions) -> None:
    _load(checkpoint, cache_dir)
    config = checkpoint / "config.json"
    config.write_text(
        config.read_text().replace('"rms_norm_eps"', '"unused_field": 1, "rms_norm_eps"')
    )
    _load(checkpoint, cache_dir)
    assert len(conversions) == 2


def _drop_meta(entry: Path) -> None:
    (entry / "meta.json").unlink()


def _truncate_arrays(entry: Path) -> None:
    files = [p for p in (entry / "params").rglob("*") if p.is_file() and p.stat().st_size > 0]
    for file in files:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _delete_array_data(entry: Path) -> None:
    for folder in (entry / "params").iterdir():
        if folder.is_dir():
            shutil.rmtree(folder)


# A restore that fails midway can leave orbax's internal asyncio reads to be collected after
# their event loop closed ("Event loop is closed", ignored by Python): orbax's, and harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_drop_meta, _truncate_arrays, _delete_array_data])
def test_damaged_entry_is_ignored_and_rebuilt(
    checkpoint: Path, cache_dir: Path, conversions, damage, caplog
) -> None:
    plain = _load(checkpoint, None)
    _load(checkpoint, cache_dir)
    (entry,) = _entries(cache_dir)
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="jaxinfer"):
        params = _load(checkpoint, cache_dir)
    assert "unusable" in caplog.text
    _assert_bitwise_equal(params, plain)
    assert len(conversions) == 3
    _assert_bitwise_equal(_load(checkpoint, cache_dir), plain)  # the rebuilt entry serves
    assert len(conversions) == 3


def test_leftover_temporary_folder_is_ignored(
    checkpoint: Path, cache_dir: Path, conversions
) -> None:
    """A crash mid-save leaves only a `.tmp-*` folder: never read, and the next save succeeds."""
    _load(checkpoint, cache_dir)
    (entry,) = _entries(cache_dir)
    partial = cache_dir / f".tmp-{entry.name}-crashed"
    shutil.copytree(entry, partial)
    shutil.rmtree(entry)
    _load(checkpoint, cache_dir)
    assert len(conversions) == 2 and _entries(cache_dir) == [entry]
    _load(checkpoint, cache_dir)
    assert len(conversions) == 2
    assert partial.exists()  # young: it might be another process's save in progress
    os.utime(partial, (0, 0))  # abandoned long ago: the next save clears it
    shutil.rmtree(entry)
    _load(checkpoint, cache_dir)
    assert not partial.exists()


def test_files_younger_than_the_racy_window_are_not_cached(
    checkpoint: Path, cache_dir: Path, conversions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file rewritten within the filesystem's timestamp granularity could keep its stat
    identity, so a freshly written checkpoint is converted but not yet cached."""
    monkeypatch.setattr(weight_cache, "RACY_SECONDS", 3600.0)
    _load(checkpoint, cache_dir)
    _load(checkpoint, cache_dir)
    assert len(conversions) == 2
    assert not cache_dir.exists() or not _entries(cache_dir)


def test_config_field_is_validated() -> None:
    from jaxinfer import EngineConfig

    assert EngineConfig(model="m").weight_cache_dir is None  # opt-in
    with pytest.raises(ValueError, match="weight_cache_dir"):
        EngineConfig(model="m", weight_cache_dir="")
