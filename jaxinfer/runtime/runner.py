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
from jax.sharding import Mesh

from jaxinfer.engine.batching import MAX_BANNED_PER_STEP, SCALAR_DTYPES, Bucket, StepInputs
from jaxinfer.models.loader import LoadedModel
from jaxinfer.runtime import kv_cache as kv
from jaxinfer.runtime import slot_state as slots
from jaxinfer.runtime.attention_backend import attention_fn, resolve_backend
from jaxinfer.runtime.mesh import replicated
from jaxinfer.runtime.step import all_token_logits, jit_copy_blocks, jit_step, jit_write_cache

logger = logging.getLogger("jaxinfer")


def _abstract_inputs(bucket: Bucket, max_banned: int, mesh: Mesh | None = None) -> dict:
    """Shapes and dtypes of one bucket's StepInputs (`StepInputs.as_dict()` must match);
    replicated over the mesh, if any."""
    sharding = None if mesh is None else replicated(mesh)
    T, S, B = bucket.num_tokens, bucket.num_seqs, bucket.num_blocks
    i32 = jnp.int32
    shapes = {
        "token_ids": ((T,), i32),
        "positions": ((T,), i32),
        "slot_mapping": ((T,), i32),
        "block_tables": ((S, B), i32),
        "context_lens": ((S,), i32),
        "query_start_loc": ((S + 1,), i32),
        "logits_indices": ((S,), i32),
        "slots": ((S,), i32),
        "sampled": ((S,), jnp.bool_),
        "want_logprobs": ((S,), jnp.bool_),
        "banned": ((S, max_banned), i32),
        "prompt_next_ids": ((T,), i32),
    }
    abstract = {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        for name, (shape, dtype) in shapes.items()
    }
    abstract["sampling"] = {
        name: jax.ShapeDtypeStruct((S,), dtype, sharding=sharding)
        for name, dtype in SCALAR_DTYPES.items()
    }
    return abstract


def enable_compilation_cache(path: str) -> None:
    """Persist compiled executables across processes (JAX's own cache; CPU and GPU alike)."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class ModelRunner:
    def __init__(
        self,
        model: LoadedModel,
        num_blocks: int,
        block_size: int,
        *,
        num_slots: int,
        num_logprobs: int,
        max_top_k: int = 256,
        attention_backend: str = "auto",
        mesh: Mesh | None = None,
    ) -> None:
        self.model = model
        self.mesh = mesh
        self.attention_backend = resolve_backend(attention_backend, model.model_config.head_dim)
        paged_attention = attention_fn(self.attention_backend, mesh)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_logprobs = num_logprobs
        self.max_block_copies = num_slots  # at most one copy-on-write per decoding sequence
        self._block_copier: jax.stages.Compiled | None = None
        self.kv_cache = kv.allocate(model.model_config, num_blocks, block_size, model.dtype, mesh)
        self.slot_state = slots.allocate(num_slots, model.model_config.vocab_size)
        if mesh is not None:  # small [slots, V] arrays: every device keeps all of them
            self.slot_state = jax.device_put(self.slot_state, replicated(mesh))
        self._write_slot = jax.jit(slots.write_slot, donate_argnums=(0,))
        self._all_logits = jax.jit(
            functools.partial(
                all_token_logits,
                family=model.family,
                model_config=model.model_config,
                paged_attention=paged_attention,
            )
        )
        self._jitted = {
            decode_only: jit_step(
                model.family,
                model.model_config,
                decode_only,
                max_top_k,
                num_logprobs,
                paged_attention,
                mesh,
            )
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
                self.model.params,
                self.kv_cache,
                self.slot_state,
                _abstract_inputs(bucket, MAX_BANNED_PER_STEP, self.mesh),
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

    def compile_block_copier(self) -> jax.stages.Compiled:
        if self._block_copier is None:
            started = time.perf_counter()
            pairs = jax.ShapeDtypeStruct((self.max_block_copies,), jnp.int32)
            self._block_copier = jit_copy_blocks.lower(self.kv_cache, pairs, pairs).compile()
            self._count(started, "block copier")
        return self._block_copier

    def copy_blocks(self, copies: tuple[tuple[int, int], ...]) -> None:
        """Copy KV blocks (src, dst) in order; copy-on-write of shared blocks before a step."""
        if not copies:
            return
        if len(copies) > self.max_block_copies:
            raise ValueError(f"{len(copies)} block copies exceed {self.max_block_copies}")
        pairs = np.zeros((2, self.max_block_copies), np.int32)
        pairs[:, : len(copies)] = np.asarray(copies, np.int32).T
        self.kv_cache = self.compile_block_copier()(self.kv_cache, pairs[0], pairs[1])

    def write_slot(self, slot: int, row: slots.SlotState) -> None:
        """Install one request's sampling row (host arrays [V]) in its slot."""
        self.slot_state = self._write_slot(self.slot_state, np.int32(slot), row)

    def execute(self, bucket: Bucket, inputs: StepInputs) -> dict[str, np.ndarray]:
        """Run one step; -> its outputs (see `step`) on the host. Cache and slots stay on device."""
        executable, writer = self.compile(bucket)
        arrays = inputs.as_dict()
        outputs, new_kv, self.slot_state = executable(
            self.model.params, self.kv_cache, self.slot_state, arrays
        )
        self.kv_cache = writer(self.kv_cache, new_kv, arrays["slot_mapping"])
        return {name: np.asarray(value) for name, value in outputs.items()}

    def all_logits(self, bucket: Bucket, inputs: StepInputs) -> np.ndarray:
        """Logits of every token of a prefill step [T, V], writing its K/V like `execute`.

        Outside the bucket contract (jitted on demand): for parity checks and diagnostics.
        """
        _, writer = self.compile(bucket)
        arrays = inputs.as_dict()
        arrays["sampled"] = np.zeros_like(arrays["sampled"])  # leave the sampling state alone
        logits = self._all_logits(self.model.params, self.kv_cache, arrays)
        _, new_kv, self.slot_state = self._executables[bucket](
            self.model.params, self.kv_cache, self.slot_state, arrays
        )
        self.kv_cache = writer(self.kv_cache, new_kv, arrays["slot_mapping"])
        return np.asarray(logits)

    def shutdown(self) -> None:
        self._executables.clear()
        self._writers.clear()
        self.kv_cache = None
        self.slot_state = None
