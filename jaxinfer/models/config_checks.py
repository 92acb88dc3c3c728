"""A checkpoint's config checked before anything is built from it: its own values, against each
other, and against the tensors the checkpoint holds.

transformers takes config.json as it comes: `num_attention_heads=0` ends in a ZeroDivisionError
inside its config class, a negative `max_position_embeddings` surfaces later as an engine field the
user never set, and a `num_hidden_layers` that disagrees with the weights builds (and, at 10**6,
spends minutes and gigabytes on) layers the checkpoint does not have. Each check here names the
file and the field instead, and runs before any weight or cache is allocated.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

# Fields that are sizes or counts wherever a supported family's config has them (Llama-style
# names, then GPT-2's and OPT's). Absent or null is fine (a family default or "same as heads").
POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "n_embd",
    "n_inner",
    "n_layer",
    "n_head",
    "n_positions",
    "ffn_dim",
)
# Where a config states the length the model was trained for (vLLM's list, in part); without
# one, the config class's default applies, and we say which.
LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")

# The layer index in a tensor name: model.layers.3., transformer.h.3., encoder.layer.3., blk.3.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|blk)\.(\d+)\.")


def read_config_json(folder: Path) -> dict:
    """`folder`/config.json as a dict, its values checked (`check_values`), before transformers
    builds a config class from it."""
    file = folder / "config.json"
    try:
        values = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        # The file is wrong, not an argument's type: ValueError like every other check here.
        raise ValueError(f"{file} must hold a JSON object, got {type(values).__name__}")  # noqa: TRY004
    check_values(values, str(file))
    return values


def check_values(values: dict, where: str) -> None:
    """Sizes and counts are positive integers, and the key/value heads divide the heads."""
    for name in POSITIVE_FIELDS:
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {name}={value!r} must be a positive integer")
    heads, kv_heads = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ValueError(
            f"{where}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads} (each key/value head serves a whole group of heads)"
        )


def note_default_length(values: dict, max_position_embeddings: int, where: str) -> None:
    """Log the length a config without one gets (its class's default), as vLLM does."""
    if not any(values.get(name) is not None for name in LENGTH_FIELDS):
        logger.warning(
            "%s states no max_position_embeddings; using the config class's default %d "
            "(pass max_model_len to choose another length)",
            where,
            max_position_embeddings,
        )


def layer_count(tensor_names: Iterable[str]) -> int | None:
    """How many layers the tensors hold (highest layer index + 1); None when no name has one."""
    indices = [int(m.group(1)) for name in tensor_names if (m := _LAYER_INDEX.search(name))]
    return max(indices) + 1 if indices else None


def check_layer_count(num_layers: int, tensor_names: Iterable[str], where: str) -> None:
    """The config's layer count against the layers the checkpoint's tensors hold, before a single
    layer is declared."""
    present = layer_count(tensor_names)
    if present is not None and present != num_layers:
        raise ValueError(
            f"{where}: num_hidden_layers={num_layers}, but the checkpoint's tensors hold "
            f"{present} layers (indices 0..{present - 1})"
        )
