"""A cache of converted weights: the parameter pytree, as our model code wants it, saved with orbax.

Loading a checkpoint converts every tensor (transpose to [in, out], cast to the target dtype,
dequantize GGUF blocks). The first load with `EngineConfig.weight_cache_dir` set saves the result
with orbax-checkpoint; later loads restore it straight into device arrays with the shardings asked
for (`jax.ShapeDtypeStruct(..., sharding=...)` targets, so a mesh only changes the shardings).

Never stale. An entry's name is a hash of everything the converted weights depend on:
  * each weight file's stat identity: path, size, mtime_ns, ctime_ns, device and inode. Any write
    moves ctime (which, unlike mtime, no tool can set back) and replacing a file changes its
    inode. A content hash would also be exact, but sha256 runs at ~1.2 GB/s on one core here:
    hashing every byte of a checkpoint costs about what restoring instead of converting saves;
  * small files that shape the conversion (config.json, the shard index), hashed in full;
  * the target dtype, the weight declarations (paths, HF names, shapes, transposes), the source
    of the modules that convert (loader, GGUF reader, weight placement, the family module) and
    CONVERSION_VERSION, to bump when conversion changes in a way none of those capture.
Stat identity has one blind spot, which git calls "racy": a file rewritten within the
filesystem's timestamp granularity of the moment it was read, with the same size. So an entry is
only saved when every file is older than RACY_SECONDS and unchanged across the conversion.

Atomic: an entry is written under a temporary name and renamed into place only when complete, so
a crash leaves no entry, only a temporary folder that later saves ignore (and delete once it is an
hour old). An entry that fails to restore or whose leaves disagree with the declarations is
removed and the checkpoint converted again. Saving an entry evicts the entries it supersedes
(same file paths, dtype and layout), so a checkpoint edited in place does not fill the disk.

Each entry holds the parameters as orbax saved them (OCDBT, uncompressed) and meta.json (the
full key, for inspection and as the completeness mark). It costs the parameters' size in bytes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxinfer.models import gguf_reader, loader
from jaxinfer.models import placement as placement_module
from jaxinfer.models.placement import ONE_DEVICE, WeightPlacement

logger = logging.getLogger("jaxinfer")

CONVERSION_VERSION = 1
RACY_SECONDS = 2.0
_ABANDONED_SECONDS = 3600.0  # a temporary folder this old belongs to no running save
_META = "meta.json"
_PARAMS = "params"


def _weight_files(source: loader.CheckpointSource) -> list[Path]:
    if source.gguf_file is not None:
        return [Path(source.gguf_file)]
    return loader._safetensors_files(source.folder)


def _small_files(source: loader.CheckpointSource) -> list[Path]:
    if source.gguf_file is not None:
        return []
    names = ("config.json", "model.safetensors.index.json")
    return [source.folder / name for name in names if (source.folder / name).is_file()]


def _stat_identity(path: Path) -> dict:
    stat = path.stat()
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "device": stat.st_dev,
        "inode": stat.st_ino,
    }


def _code_digest(family) -> str:
    digest = hashlib.sha256()
    for module in (loader, gguf_reader, family, placement_module):  # placement: kv-head layout
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()


def cache_key(source: loader.CheckpointSource, specs: dict, dtype: str, family) -> dict:
    """Everything the converted parameters depend on (JSON-able); its hash names the entry."""
    return {
        "version": CONVERSION_VERSION,
        "dtype": dtype,
        "files": [_stat_identity(f) for f in _weight_files(source)],
        "small_files": {
            f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in _small_files(source)
        },
        "specs": [
            [path, spec.hf_name, list(spec.shape), spec.transpose]
            for path, spec in sorted(specs.items())
        ],
        "code": _code_digest(family),
    }


def _entry_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]


def abstract_params(specs: dict, dtype: str, placement: WeightPlacement = ONE_DEVICE) -> dict:
    """The parameter pytree `build_params` makes, as ShapeDtypeStructs carrying the shardings
    `placement` would give them (orbax stores each array whole, so an entry restores onto any
    mesh)."""
    tree: dict = {}
    for path, spec in specs.items():
        sharding = placement.sharding(path, spec)
        leaf = jax.ShapeDtypeStruct(spec.shape, jnp.dtype(dtype), sharding=sharding)
        loader._set_path(tree, path, leaf)
    tree["layers"] = tuple(tree.get("layers", ()))
    return tree


def _remove(entry: Path) -> None:
    """Rename away first, so no reader ever sees a half-deleted entry."""
    trash = entry.with_name(f".trash-{entry.name}-{uuid.uuid4().hex}")
    try:
        entry.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _checkpointer():
    """orbax's synchronous PyTree checkpointer, OCDBT format, without zstd: weights barely
    compress (~8%) and decompressing took ~1.7x the restore time on a 2-core CPU."""
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def _restore(entry: Path, key: dict, target: dict) -> dict | None:
    import orbax.checkpoint as ocp

    try:
        # Entries appear by an atomic rename with meta.json inside: one without it is damaged.
        if json.loads((entry / _META).read_text())["key"] != key:
            raise ValueError("the entry's recorded key differs from its name")
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        with _checkpointer() as checkpointer:
            params = checkpointer.restore(
                entry / _PARAMS,
                args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args),
            )
        if jax.tree.structure(params) != jax.tree.structure(target):
            raise ValueError("restored tree structure differs from the declarations")
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(target), strict=True):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(f"restored leaf {got.shape} {got.dtype}, want {want.shape}")
        return params
    except Exception as error:  # noqa: BLE001 (any failure means: convert again)
        logger.warning("weight cache entry %s is unusable (%s); converting again", entry, error)
        _remove(entry)
        return None


def _racy(files: list[dict]) -> bool:
    newest = max((max(f["mtime_ns"], f["ctime_ns"]) for f in files), default=0)
    return time.time_ns() - newest < RACY_SECONDS * 1e9


def _save(cache_dir: Path, entry: Path, key: dict, params: dict) -> None:
    import orbax.checkpoint as ocp

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{entry.name}-{uuid.uuid4().hex}"
    try:
        with _checkpointer() as checkpointer:
            checkpointer.save(tmp / _PARAMS, args=ocp.args.PyTreeSave(params))
        (tmp / _META).write_text(json.dumps({"key": key}, indent=1))
        try:
            tmp.rename(entry)  # atomic; fails if another process saved the same entry first
        except OSError:
            logger.info("weight cache entry %s appeared meanwhile; keeping it", entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _evict_older(cache_dir, entry, key)


def _evict_older(cache_dir: Path, entry: Path, key: dict) -> None:
    """Drop what can never be served again: entries for the same file paths, dtype and layout
    (weight declarations) under older file identities or code, and temporary or trash folders
    a crashed process left over an hour ago."""
    same = ("dtype", "specs")
    paths = [f["path"] for f in key["files"]]
    for other in cache_dir.iterdir():
        if other == entry:
            continue
        if other.name.startswith((".tmp-", ".trash-")):
            if time.time() - other.stat().st_mtime > _ABANDONED_SECONDS:
                shutil.rmtree(other, ignore_errors=True)
            continue
        try:
            old = json.loads((other / _META).read_text())["key"]
            stale = [f["path"] for f in old["files"]] == paths and all(
                old[name] == key[name] for name in same
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if stale:
            _remove(other)


def load_or_convert(
    cache_dir: Path,
    source: loader.CheckpointSource,
    specs: dict,
    dtype: str,
    family,
    convert: Callable[[], dict],
    placement: WeightPlacement = ONE_DEVICE,
) -> dict:
    """The cached parameters of `source` when an entry matches, else `convert()` (and save it)."""
    cache_dir = Path(cache_dir)
    key = cache_key(source, specs, dtype, family)
    entry = cache_dir / _entry_name(key)
    if entry.is_dir():
        started = time.perf_counter()
        params = _restore(entry, key, abstract_params(specs, dtype, placement))
        if params is not None:
            logger.info("weights restored from %s in %.2fs", entry, time.perf_counter() - started)
            return params
    params = convert()
    if cache_key(source, specs, dtype, family) != key:
        logger.warning("checkpoint files changed while loading; not caching them")
    elif _racy(key["files"]):
        logger.info(
            "checkpoint files changed in the last %.0fs; not caching them yet", RACY_SECONDS
        )
    else:
        try:
            _save(cache_dir, entry, key, params)
        except Exception as error:  # noqa: BLE001 (a cache that cannot be written is no cache)
            logger.warning("could not save the weight cache entry %s: %s", entry, error)
    return params
