"""EncoderRunner: holds an encoder's weights and one compiled call per (batch, length) bucket.

The encoder counterpart of `ModelRunner`, without KV cache, slots or sampling: a call maps padded
token ids to pooled float32 embeddings. Buckets are compiled ahead of time
(`jit(...).lower(...).compile()`) and counted, so a shape that was never warmed up shows up in
`num_compilations` rather than as a silent retrace.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.models.loader import LoadedModel
from jaxinfer.seam import EncoderBucket

logger = logging.getLogger("jaxinfer")


def pool(
    hidden: jax.Array,  # [S, L, E]
    lengths: jax.Array,  # [S] real tokens per row
    mode: str,
) -> jax.Array:
    """One float32 vector per row [S, E] from its real tokens (sentence-transformers' pooling)."""
    hidden = hidden.astype(jnp.float32)
    mask = (jnp.arange(hidden.shape[1])[None, :] < lengths[:, None])[..., None]  # [S, L, 1]
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        # Clamped like sentence-transformers, so a padding row (length 0) gives zeros, not NaN.
        count = jnp.maximum(lengths[:, None].astype(jnp.float32), 1e-9)
        return jnp.sum(jnp.where(mask, hidden, 0.0), axis=1) / count
    if mode == "max":
        return jnp.max(jnp.where(mask, hidden, jnp.finfo(jnp.float32).min), axis=1)
    raise ValueError(f"unknown pooling mode {mode!r}")


def encode_step(params: dict, token_ids: jax.Array, lengths: jax.Array, *, family, cfg, mode: str):
    """Padded token ids [S, L] and lengths [S] -> pooled embeddings [S, E] float32."""
    return pool(family.hidden_states(params, cfg, token_ids, lengths), lengths, mode)


class EncoderRunner:
    def __init__(self, model: LoadedModel, pooling_mode: str) -> None:
        self.model = model
        self._jitted = jax.jit(
            functools.partial(
                encode_step, family=model.family, cfg=model.model_config, mode=pooling_mode
            )
        )
        self._executables: dict[EncoderBucket, jax.stages.Compiled] = {}
        self.num_compilations = 0
        self.compile_seconds = 0.0

    def compile(self, bucket: EncoderBucket) -> jax.stages.Compiled:
        executable = self._executables.get(bucket)
        if executable is None:
            started = time.perf_counter()
            shape = (bucket.num_seqs, bucket.seq_len)
            executable = self._jitted.lower(
                self.model.params,
                jax.ShapeDtypeStruct(shape, jnp.int32),
                jax.ShapeDtypeStruct(shape[:1], jnp.int32),
            ).compile()
            self._executables[bucket] = executable
            elapsed = time.perf_counter() - started
            self.compile_seconds += elapsed
            self.num_compilations += 1
            logger.debug("compiled encoder %s in %.2fs", bucket, elapsed)
        return executable

    def execute(
        self, bucket: EncoderBucket, token_ids: np.ndarray, lengths: np.ndarray
    ) -> np.ndarray:
        """Pooled embeddings of one padded batch [num_seqs, E] float32, on the host."""
        return np.asarray(self.compile(bucket)(self.model.params, token_ids, lengths))

    def shutdown(self) -> None:
        self._executables.clear()
