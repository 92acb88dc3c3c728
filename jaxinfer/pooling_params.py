"""PoolingParams: per-call options of `Engine.encode()`, named as in vLLM."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class PoolingParams:
    """`normalize=None` keeps the checkpoint's choice (a sentence-transformers Normalize module,
    else none); True or False overrides it. L2 normalization runs on the host after pooling, so
    either choice uses the same compiled executables."""

    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(
                f"PoolingParams.normalize must be a bool or None, got {self.normalize!r}"
            )
