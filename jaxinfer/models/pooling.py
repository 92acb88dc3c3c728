"""How token embeddings become one sentence embedding, read from a checkpoint folder.

sentence-transformers folders describe their pipeline in `modules.json`: a Transformer, then a
Pooling module (its `config.json` names the mode) and optionally a Normalize module (L2 norm).
`sentence_bert_config.json` gives the length the model was trained at. Plain Hugging Face
folders have none of these: mean pooling over real tokens, not normalized (what
sentence-transformers itself does for a bare transformers model). `PoolingParams.normalize`
overrides the normalization per call.

Plain Python, no JAX: the engine reads this before any device work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

POOLING_MODES = ("mean", "cls", "max")

# sentence-transformers' Pooling config keys -> our mode names.
_ST_MODE_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}
_ST_UNSUPPORTED_KEYS = (
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True, kw_only=True)
class PoolingConfig:
    mode: str = "mean"  # one of POOLING_MODES
    normalize: bool = False  # L2-normalize the pooled vector
    max_seq_length: int | None = None  # sentence_bert_config.json: the trained length

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {self.mode!r}")


def load_pooling_config(folder: Path) -> PoolingConfig:
    """The folder's sentence-transformers pooling, or mean pooling without normalization."""
    folder = Path(folder)
    max_seq_length = None
    bert_config = folder / "sentence_bert_config.json"
    if bert_config.is_file():
        max_seq_length = json.loads(bert_config.read_text()).get("max_seq_length")
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return PoolingConfig(max_seq_length=max_seq_length)
    modules = json.loads(modules_file.read_text())
    types = [module.get("type") for module in modules]
    mode = "mean"
    for module in modules:
        if module.get("type") == _ST_POOLING:
            mode = _pooling_mode(folder / module.get("path", "") / "config.json")
    return PoolingConfig(mode=mode, normalize=_ST_NORMALIZE in types, max_seq_length=max_seq_length)


def _pooling_mode(path: Path) -> str:
    """The one pooling mode a sentence-transformers Pooling config switches on."""
    if not path.is_file():
        raise ValueError(f"modules.json names a Pooling module but {path} is missing")
    config = json.loads(path.read_text())
    enabled = [mode for key, mode in _ST_MODE_KEYS.items() if config.get(key)]
    unsupported = [key for key in _ST_UNSUPPORTED_KEYS if config.get(key)]
    if unsupported or len(enabled) != 1:
        raise ValueError(
            f"{path}: pooling {unsupported + enabled or 'none'} is not supported; "
            f"exactly one of {sorted(_ST_MODE_KEYS)} must be true"
        )
    return enabled[0]
