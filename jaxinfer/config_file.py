"""YAML config files: EngineConfig fields at the top level, default SamplingParams under `sampling:`.

    # configs/smollm2-135m-cpu.yaml
    model: default            # the installed SmolLM2 GGUF; or a folder / .gguf path (`~` allowed)
    dtype: float32
    max_model_len: 2048
    seq_buckets: [1, 4, 16]   # YAML lists become the tuples EngineConfig wants
    sampling:
      temperature: 0.0
      max_tokens: 64

Every mistake names the file and the key: an unknown key (with the closest field name), a value of
the wrong type (checked here against EngineConfig's annotations, so `max_num_seqs: lots` never
reaches a `>=` comparison) and a value EngineConfig or SamplingParams rejects (their own message,
prefixed with the file). A config is read once and frozen; overrides are keyword arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from jaxinfer.config import EngineConfig
from jaxinfer.default_model import resolve_model_path
from jaxinfer.sampling_params import SamplingParams

SAMPLING_SECTION = "sampling"


@dataclass(frozen=True, kw_only=True)
class ConfigFile:
    """One YAML file, loaded: the engine config and the default sampling fields it names."""

    path: Path
    engine: EngineConfig
    # Only the fields the file sets (validated): the rest keep their defaults, so a request's own
    # fields can be laid on top before one SamplingParams is built (see `sampling_params`).
    sampling: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """The file's sampling defaults with `overrides` on top."""
        try:
            return SamplingParams(**{**self.sampling, **overrides})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{self.path}: sampling: {error}") from None


def load_config_file(path: str | os.PathLike, **overrides: Any) -> ConfigFile:
    """Reads, checks and freezes one YAML config; `overrides` (EngineConfig fields) win."""
    path = Path(path).expanduser()
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 (a bad file is a ValueError, whatever is wrong in it)
            f"{path}: the top level must be a mapping of EngineConfig fields"
        )
    sampling = data.pop(SAMPLING_SECTION, None)
    engine_fields = _checked_engine_fields(path, data, source="")
    engine_fields.update(_checked_engine_fields(path, overrides, source=" (override)"))
    if "model" not in engine_fields:
        raise ValueError(f"{path}: missing key 'model' (a checkpoint folder, a .gguf or 'default')")
    for name in _path_fields():
        if isinstance(engine_fields.get(name), str):
            engine_fields[name] = _expand_path(name, engine_fields[name])
    try:
        engine = EngineConfig(**engine_fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    sampling = MappingProxyType(_checked_sampling(path, {} if sampling is None else sampling))
    return ConfigFile(path=path, engine=engine, sampling=sampling)


def engine_config_from_yaml(path: str | os.PathLike, **overrides: Any) -> EngineConfig:
    """`EngineConfig.from_yaml`: the engine part of a config file (its `sampling:` is not read)."""
    return load_config_file(path, **overrides).engine


# ---- checks ------------------------------------------------------------------------------------


def _checked_engine_fields(path: Path, values: Mapping, source: str) -> dict[str, Any]:
    hints = _engine_hints()
    checked = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), [*hints, SAMPLING_SECTION], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{path}: unknown key {key!r}{source}{hint}; EngineConfig fields are "
                f"{', '.join(hints)}, and default SamplingParams go under '{SAMPLING_SECTION}:'"
            )
        checked[key] = _coerce(path, key, value, hints[key], source)
    return checked


def _checked_sampling(path: Path, sampling: object) -> dict[str, Any]:
    if not isinstance(sampling, dict):
        raise ValueError(  # noqa: TRY004 (a bad file is a ValueError, whatever is wrong in it)
            f"{path}: '{SAMPLING_SECTION}:' must be a mapping of SamplingParams fields"
        )
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    for key in sampling:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{path}: unknown key '{SAMPLING_SECTION}.{key}'{hint}; "
                f"SamplingParams fields are {', '.join(names)}"
            )
    try:
        SamplingParams(**sampling)  # validate once, now, naming the file
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {SAMPLING_SECTION}: {error}") from None
    return dict(sampling)


def _coerce(path: Path, key: str, value: object, hint: object, source: str) -> object:
    """`value` as the annotated type wants it, or a ValueError naming the file and key.

    YAML gives lists where EngineConfig wants tuples, and ints where it wants floats; an int
    field takes an integral float (`8.0e9`), since YAML 1.1 has no exponent syntax for ints.
    """
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        converted = _as_type(value, option)
        if converted is not _MISMATCH:
            return converted
    wanted = " or ".join(_type_name(o) for o in options)
    raise ValueError(f"{path}: {key}{source} must be {wanted}, got {value!r}")


_MISMATCH = object()


def _as_type(value: object, option: object) -> object:
    if option is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if option is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if option is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else _MISMATCH
    if option is str:
        return value if isinstance(value, str) else _MISMATCH
    if typing.get_origin(option) is tuple:
        (item, *_rest) = typing.get_args(option) or (object,)
        if not isinstance(value, list | tuple):
            return _MISMATCH
        items = [_as_type(v, item) if item is not object else v for v in value]
        return _MISMATCH if any(i is _MISMATCH for i in items) else tuple(items)
    return _MISMATCH if option is type(None) else value  # an annotation we do not check


def _type_name(option: object) -> str:
    if option is type(None):
        return "null"
    if typing.get_origin(option) is tuple:
        item = typing.get_args(option)[0]
        return f"a list of {({int: 'ints', float: 'numbers', str: 'strings'}).get(item, item)}"
    return {bool: "true/false", int: "an int", float: "a number", str: "a string"}.get(
        option, str(option)
    )


def _engine_hints() -> dict[str, object]:
    hints = typing.get_type_hints(EngineConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(EngineConfig) if f.init}


def _path_fields() -> list[str]:
    """Fields holding a file system path: `~` is expanded in each (and `default` in `model`)."""
    names = [f.name for f in dataclasses.fields(EngineConfig)]
    return [n for n in names if n in ("model", "tokenizer") or n.endswith("_dir")]


def _expand_path(name: str, value: str) -> str:
    if name == "model":
        return resolve_model_path(value)
    return str(Path(value).expanduser()) if value.startswith("~") else value


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
