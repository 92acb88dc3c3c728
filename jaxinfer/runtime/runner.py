"""ModelRunner: the only place that holds device arrays and calls compiled code.

Each bucket is compiled ahead of time (`jit(...).lower(...).compile()`) and kept in a table, so a
shape that was never compiled cannot slip through as a silent retrace: it shows up as a compile
counted by `num_compilations`, which tests watch. Each step is two executables: the forward pass
(reads the cache) and the cache writer (donates it), see `runtime/step.py`.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.engine.batching import Bucket, StepInputs
from jaxinfer.models.loader import LoadedModel
from jaxinfer.runtime import kv_cache as kv
from jaxinfer.runtime.step import all_token_logits, jit_step, jit_write_cache

logger = logging.getLogger("jaxinfer")


def _abstract_inputs(bucket: Bucket) -> dict[str, jax.ShapeDtypeStruct]:
    T, S, B = bucket.num_tokens, bucket.num_seqs, bucket.num_blocks
    i32, f32, u32 = jnp.int32, jnp.float32, jnp.uint32
    shapes = {
        "token_ids": ((T,), i32),
        "positions": ((T,), i32),
        "slot_mapping": ((T,), i32),
        "block_tables": ((S, B), i32),
        "context_lens": ((S,), i32),
        "query_start_loc": ((S + 1,), i32),
        "logits_indices": ((S,), i32),
        "temperatures": ((S,), f32),
        "seeds": ((S,), u32),
        "sample_positions": ((S,), i32),
    }
    return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in shapes.items()}


def enable_compilation_cache(path: str) -> None:
    """Persist compiled executables across processes (JAX's own cache; CPU and GPU alike)."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class ModelRunner:
    def __init__(self, model: LoadedModel, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_cache = kv.allocate(model.model_config, num_blocks, block_size, model.dtype)
        self._all_logits = jax.jit(
            functools.partial(
                all_token_logits, family=model.family, model_config=model.model_config
            )
        )
        self._jitted = {
            decode_only: jit_step(model.family, model.model_config, decode_only)
            for decode_only in (False, True)
        }
        self._executables: dict[Bucket, jax.stages.Compiled] = {}
        self._writers: dict[int, jax.stages.Compiled] = {}  # keyed by token count
        self.num_compilations = 0
        self.compile_seconds = 0.0

    def _count(self, started: float, what: object) -> None:
        elapsed = time.perf_counter() - started
        self.compile_seconds += elapsed
        self.num_compilations += 1
        logger.debug("compiled %s in %.2fs", what, elapsed)

    def _new_kv_shapes(self, num_tokens: int) -> tuple:
        cfg = self.model.model_config
        new = jax.ShapeDtypeStruct((num_tokens, cfg.num_kv_heads, cfg.head_dim), self.model.dtype)
        return tuple((new, new) for _ in range(cfg.num_layers))

    def compile(self, bucket: Bucket) -> tuple[jax.stages.Compiled, jax.stages.Compiled]:
        """The bucket's step and its cache writer, compiling whichever is new."""
        executable = self._executables.get(bucket)
        if executable is None:
            started = time.perf_counter()
            jitted = self._jitted[not bucket.is_prefill]
            executable = jitted.lower(
                self.model.params, self.kv_cache, _abstract_inputs(bucket)
            ).compile()
            self._executables[bucket] = executable
            self._count(started, bucket)
        writer = self._writers.get(bucket.num_tokens)
        if writer is None:
            started = time.perf_counter()
            slots = jax.ShapeDtypeStruct((bucket.num_tokens,), jnp.int32)
            writer = jit_write_cache.lower(
                self.kv_cache, self._new_kv_shapes(bucket.num_tokens), slots
            ).compile()
            self._writers[bucket.num_tokens] = writer
            self._count(started, f"cache writer for {bucket.num_tokens} tokens")
        return executable, writer

    def execute(self, bucket: Bucket, inputs: StepInputs) -> tuple[np.ndarray, np.ndarray]:
        """Run one step; -> (tokens [S], logprobs [S]) on the host. The cache stays on device."""
        executable, writer = self.compile(bucket)
        arrays = inputs.as_dict()
        tokens, logprobs, new_kv = executable(self.model.params, self.kv_cache, arrays)
        self.kv_cache = writer(self.kv_cache, new_kv, arrays["slot_mapping"])
        return np.asarray(tokens), np.asarray(logprobs)

    def all_logits(self, bucket: Bucket, inputs: StepInputs) -> np.ndarray:
        """Logits of every token of a prefill step [T, V], writing its K/V like `execute`.

        Outside the bucket contract (jitted on demand): for parity checks and diagnostics.
        """
        _, writer = self.compile(bucket)
        arrays = inputs.as_dict()
        logits = self._all_logits(self.model.params, self.kv_cache, arrays)
        _, _, new_kv = self._executables[bucket](self.model.params, self.kv_cache, arrays)
        self.kv_cache = writer(self.kv_cache, new_kv, arrays["slot_mapping"])
        return np.asarray(logits)

    def shutdown(self) -> None:
        self._executables.clear()
        self.kv_cache = None
