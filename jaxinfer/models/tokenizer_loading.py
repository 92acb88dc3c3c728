"""What a checkpoint says about text: its tokenizer (the folder's, a GGUF's own, or a separate
`tokenizer=`), its eos ids and the sampling defaults its authors chose.

Why apart from loader.py: none of it touches weights or devices; loader.py re-exports these
names, so `loader.load_tokenizer` stays the one place callers (and cold_start.py's timers) use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from jaxinfer.models import gguf_reader, hub

if TYPE_CHECKING:
    from jaxinfer.models.loader import CheckpointSource


def load_tokenizer(
    source: CheckpointSource,
    tokenizer: str | None = None,
    revision: str | None = None,
    download_dir: str | None = None,
):
    """The model's own tokenizer, or `tokenizer`'s: a local folder or a hub id (at `revision`,
    EngineConfig.tokenizer_revision)."""
    if tokenizer is not None:
        path = Path(os.path.expanduser(tokenizer))
        if not path.exists() and hub.is_hub_id(tokenizer):
            path = hub.resolve_tokenizer(tokenizer, revision, download_dir)
        elif revision not in (None, "main"):
            raise ValueError(
                f"EngineConfig.tokenizer_revision={revision!r} applies to a hub id, but "
                f"tokenizer={tokenizer!r} is a local path"
            )
        return _hf_tokenizer(path)
    if revision not in (None, "main"):
        raise ValueError(
            "EngineConfig.tokenizer_revision applies to a separate tokenizer= hub id; the "
            "model's own tokenizer comes with the model's revision"
        )
    if source.gguf_file is not None:
        return gguf_reader.load_gguf_tokenizer(source.folder, source.gguf_file)
    return _hf_tokenizer(source.folder)


def _hf_tokenizer(folder: Path):
    """transformers' tokenizer for `folder`; a damaged file raises ValueError naming it and what
    is wrong, where transformers would fail with a bare UnicodeDecodeError or KeyError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:
        raise ValueError(_tokenizer_problem(folder, error)) from error


def _tokenizer_problem(folder: Path, error: Exception) -> str:
    """Why `folder`'s tokenizer did not load: the first damaged file, read by the library that
    reads it for transformers (tokenizers for tokenizer.json, json for the others)."""
    from tokenizers import Tokenizer

    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            Tokenizer.from_file(str(tokenizer_json))
        except Exception as parse_error:  # noqa: BLE001 (tokenizers raises a bare Exception)
            return f"{tokenizer_json} is not a valid tokenizer.json: {parse_error}"
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        file = folder / name
        if file.is_file():
            try:
                json.loads(file.read_bytes())
            except (UnicodeDecodeError, json.JSONDecodeError) as parse_error:
                return f"{file} is not valid JSON: {parse_error}"
    return f"cannot load the tokenizer in {folder}: {type(error).__name__}: {error}"


def load_eos_token_ids(source: CheckpointSource, hf_config, tokenizer) -> tuple[int, ...]:
    """eos ids from generation_config.json, else the model config, else the tokenizer."""
    eos = None
    generation_config = source.folder / "generation_config.json"
    if source.gguf_file is None and generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


def load_generation_defaults(source: CheckpointSource) -> dict:
    """Sampling defaults the checkpoint's authors chose (generation_config.json), in our field names.

    As in vLLM, they apply only when a call passes no SamplingParams.
    """
    path = source.folder / "generation_config.json"
    if source.gguf_file is not None or not path.is_file():
        return {}
    config = json.loads(path.read_text())
    defaults = {}
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    elif config.get("temperature") is not None:
        defaults["temperature"] = float(config["temperature"])
    if config.get("max_new_tokens") is not None:
        defaults["max_tokens"] = int(config["max_new_tokens"])
    return defaults
