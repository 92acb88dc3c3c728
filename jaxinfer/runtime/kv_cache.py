"""The paged KV cache: sizing from a memory budget, and one preallocation.

Layout: per layer a (K, V) pair, each `[kv_heads, num_blocks, block_size, head_dim]` (kv-head major:
see `pallas_kernels/reference.py` for why). Separate
per-layer arrays rather than one stacked array: XLA:CPU decodes about 2x faster without the slicing
that a stacked cache under `lax.scan` costs. Block 0 is reserved as the padding sink.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxinfer.config import EngineConfig
from jaxinfer.runtime.mesh import KV_CACHE_AXES, named_sharding
from jaxinfer.runtime.pipeline import layer_partition
from pallas_kernels import reference

logger = logging.getLogger("jaxinfer")

# Room left on an accelerator for activations and compiled executables, beyond weights and cache.
_ACTIVATION_HEADROOM_BYTES = 1 << 30


# EngineConfig.kv_cache_dtype -> the cache's element type ("auto": the model's dtype). "fp8" is
# e4m3 as in vLLM: 3 mantissa bits (relative rounding up to 2^-4), largest 448; e5m2 trades a
# mantissa bit for range (up to 57344).
FP8_CACHE_DTYPES = {
    "fp8": jnp.float8_e4m3fn,
    "fp8_e4m3": jnp.float8_e4m3fn,
    "fp8_e5m2": jnp.float8_e5m2,
}


def cache_dtype(kv_cache_dtype: str, model_dtype) -> jnp.dtype:
    """The KV cache's element type for EngineConfig.kv_cache_dtype and the model's dtype."""
    if kv_cache_dtype == "auto":
        return jnp.dtype(model_dtype)
    return jnp.dtype(FP8_CACHE_DTYPES[kv_cache_dtype])


_FP8 = frozenset(jnp.dtype(t) for t in FP8_CACHE_DTYPES.values())


def is_fp8(dtype) -> bool:
    return dtype is not None and jnp.dtype(dtype) in _FP8


def storage_dtype(dtype) -> jnp.dtype:
    """What the cache arrays hold: an 8-bit float cache is kept as its bytes (uint8). Why:
    XLA:CPU has no 8-bit float arithmetic and widens an fp8 array to float16 around every op
    that is not a pure bitcast, so a scatter of a few slots into an fp8 cache converted the whole
    cache twice (26 ms for a 12.6 MB layer, against 0.01 ms as bytes). Readers widen the bytes
    they read (the CPU kernel by integer arithmetic; the jnp and Pallas paths by bitcast)."""
    return jnp.dtype(jnp.uint8) if is_fp8(dtype) else jnp.dtype(dtype)


def encode(new: jax.Array, dtype) -> jax.Array:
    """New K/V in the cache's storage form: rounded to the fp8 type and taken as bytes for an
    8-bit float cache, unchanged otherwise."""
    if not is_fp8(dtype):
        return new
    return jax.lax.bitcast_convert_type(new.astype(dtype), jnp.uint8)


def write_layer(
    k_cache: jax.Array,
    v_cache: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    dtype=None,
) -> tuple[jax.Array, jax.Array]:
    """`reference.write_kv` of one layer's new K/V, encoded for a cache of element type `dtype`
    first (the single-step writer and the multi-step loop both write through here)."""
    return reference.write_kv(
        k_cache, v_cache, encode(k_new, dtype), encode(v_new, dtype), slot_mapping
    )


def typed_view(cache: jax.Array, dtype) -> jax.Array:
    """An 8-bit float cache's bytes seen as that type (a bitcast); any other cache unchanged."""
    if not is_fp8(dtype) or cache.dtype != jnp.uint8:
        return cache
    return jax.lax.bitcast_convert_type(cache, dtype)


def bytes_per_block(
    model_config, block_size: int, dtype: str, shards: int = 1, num_layers: int | None = None
) -> int:
    """Bytes one block takes on each device when the kv heads are split `shards` ways, over
    `num_layers` layers (default: all of the model's; one pipeline stage holds fewer)."""
    itemsize = jnp.dtype(dtype).itemsize
    per_layer = 2 * block_size * model_config.num_kv_heads * model_config.head_dim * itemsize
    layers = model_config.num_layers if num_layers is None else num_layers
    return per_layer * layers // shards


def _available_host_bytes() -> int:
    """Host memory free right now (MemAvailable): used only to shrink a budget that will not fit."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _machine_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _host_memory_bytes() -> int:
    """Physical memory this process may use: the machine's, or its cgroup's limit when lower.

    Unlike the free memory of the moment, this is the same run after run, so a cache sized from it
    keeps its shape and the persistent compilation cache finds the programs compiled last time.
    """
    total = _machine_memory_bytes()
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as limit_file:
                limit = limit_file.read().strip()
        except OSError:
            continue
        if limit.isdigit():  # cgroup v2 writes "max" for no limit
            total = min(total, int(limit))
    return total


def _round_down_coarsely(n: int) -> int:
    """``n`` with all but its 3 leading bits cleared: 4, 5, 6 or 7 times a power of two.

    Coarse enough that a few MiB more or less of reported memory (a kernel update, another
    container) rarely changes the result, fine enough to lose under 20% of the budget.
    """
    shift = max(n.bit_length() - 3, 0)
    return (n >> shift) << shift


def host_kv_budget_bytes(fraction: float) -> int:
    """The CPU cache budget: ``fraction`` of physical memory, rounded down coarsely.

    Stable, so the same command compiles the same shapes every run. Only when the machine is so
    busy that the budget would take over half of the memory free now is it halved until it fits
    (so even then the shape takes one of a few values).
    """
    budget = _round_down_coarsely(int(_host_memory_bytes() * fraction))
    available = _available_host_bytes()
    if budget > available // 2:
        stable = budget
        while budget > available // 2 and budget > 1:
            budget //= 2
        logger.warning(
            "KV cache: %.0f MiB free; using %.0f MiB instead of the usual %.0f MiB, so programs "
            "compiled for the usual size will not be reused in this run",
            available / 2**20,
            budget / 2**20,
            stable / 2**20,
        )
    return budget


def kv_budget_bytes(config: EngineConfig, weight_bytes: int) -> int:
    """How many bytes the cache may take: explicit, else accelerator memory share, else host RAM share."""
    if config.kv_cache_memory_bytes is not None:
        return config.kv_cache_memory_bytes
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit:
            in_use = stats.get("bytes_in_use", weight_bytes)
            budget = (
                int(limit * config.gpu_memory_utilization) - in_use - _ACTIVATION_HEADROOM_BYTES
            )
            if budget <= 0:
                raise ValueError(
                    f"no memory left for the KV cache: {limit} bytes on {device.device_kind}, "
                    f"{in_use} in use; raise gpu_memory_utilization (now {config.gpu_memory_utilization})"
                )
            return budget
    return host_kv_budget_bytes(config.cpu_kv_cache_fraction)


def num_blocks_for(config: EngineConfig, model_config, dtype: str, weight_bytes: int) -> int:
    """Blocks the budget allows, capped at what every micro-batch's max_num_seqs full-length
    sequences could use."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    # Each device holds its kv-head shard (TP) of its stage's layers (PP); the budget is one
    # device's, so the stage with the most layers sets the size (stages may be uneven).
    stage_layers = layer_partition(
        model_config.num_layers, config.pipeline_parallel_size, config.pipeline_layer_partition
    )
    per_block = bytes_per_block(
        model_config, config.block_size, dtype, config.tensor_parallel_size, max(stage_layers)
    )
    from_budget = kv_budget_bytes(config, weight_bytes) // per_block
    useful = config.max_num_seqs * config.resolved_micro_batches * config.max_blocks_per_seq + 1
    num_blocks = min(from_budget, useful)
    if num_blocks < 2:
        raise ValueError(
            f"the KV cache budget fits {from_budget} blocks of {per_block} bytes; at least 2 are needed"
        )
    logger.info(
        "KV cache: %d blocks x %d tokens (%.1f MiB)",
        num_blocks,
        config.block_size,
        num_blocks * per_block / 2**20,
    )
    return num_blocks


def allocate(
    model_config, num_blocks: int, block_size: int, dtype: str, mesh: Mesh | None = None
) -> tuple:
    """Per layer a zeroed (K, V) pair; on a mesh split over kv heads, each shard created on its
    own device (never the whole cache on one device first)."""
    shape = (model_config.num_kv_heads, num_blocks, block_size, model_config.head_dim)
    sharding = None if mesh is None else named_sharding(mesh, KV_CACHE_AXES)
    dtype = storage_dtype(dtype)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return tuple((zeros(), zeros()) for _ in range(model_config.num_layers))


def tokens_capacity(num_blocks: int, block_size: int) -> int:
    return (num_blocks - 1) * block_size
