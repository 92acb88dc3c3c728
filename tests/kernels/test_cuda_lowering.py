"""Lower the kernel for CUDA on this CPU-only machine, for every configuration the engine can pick.

Lowering runs Pallas' Triton lowering of the kernel body, which rejects what the GPU cannot build:
non-power-of-two blocks, primitives Triton has no lowering for, TPU-only features. So a shape the
engine may choose but the GPU cannot compile fails here, in CI, rather than on a user's machine.
It cannot catch failures inside Triton's own compiler or ptxas (shared memory, registers): those
need a GPU (benchmarks/paged_attention.py runs the kernel there).

The engine's choices: head dim (the model's: the engine only picks the kernel for the
`supported_head_dim` ones), block size (EngineConfig allows 8..128), GQA group (1..8), dtype,
decode or ragged prefill, sliding window / soft cap (model), and split-K (from the table width).
Every head dim x block size x mode is lowered, with dtypes, groups and masks cycling through; then
every group x dtype x mode.
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import jax
import jax.numpy as jnp
import pytest

from jaxinfer.config import EngineConfig
from pallas_kernels import paged_attention as kernel

HEAD_DIMS = [d for d in range(1, 257) if kernel.supported_head_dim(d)]
BLOCK_SIZES = [8, 16, 32, 64, 128]
GROUPS = range(1, 9)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MASKS = ((None, None), (4096, None), (None, 50.0), (512, 30.0))
TRITON_CALL = "xla.gpu.triton"


def lower_for_cuda(
    *,
    decode_only,
    head_dim=128,
    block_size=16,
    group=4,
    dtype=jnp.bfloat16,
    window=None,
    cap=None,
    table_positions=8192,
    kv_heads=2,
    cache_dtype=None,
) -> str:
    tokens, seqs = (32, 32) if decode_only else (256, 4)
    blocks = table_positions // block_size
    shape = jax.ShapeDtypeStruct
    cache = shape((kv_heads, 64, block_size, head_dim), cache_dtype or dtype)
    args = (
        shape((tokens, kv_heads * group, head_dim), dtype),
        shape((tokens, kv_heads, head_dim), dtype),
        shape((tokens, kv_heads, head_dim), dtype),
        cache,
        cache,
        shape((seqs, blocks), jnp.int32),
        shape((seqs,), jnp.int32),
        shape((seqs + 1,), jnp.int32),
    )
    fn = functools.partial(
        kernel.paged_attention,
        scale=head_dim**-0.5,
        decode_only=decode_only,
        sliding_window=window,
        soft_cap=cap,
    )
    with cuda_target():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def cuda_target():
    """Where no GPU is present, name one for the lowering: since jax 0.11 Pallas' Triton lowering
    asks the device for its compute capability ("No supported GPU devices found, please specify an
    abstract GPU device") and takes it from an abstract mesh's device instead. An H100 (sm_90):
    the GPUs this project is lent. jax 0.10 needs nothing (and has no AbstractDevice)."""
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu or not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def test_engine_block_sizes_are_the_ones_lowered_here():
    for block_size in BLOCK_SIZES:
        EngineConfig(model="m", block_size=block_size)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(model="m", block_size=256)


@pytest.mark.parametrize("decode_only", [True, False])
def test_every_head_dim_and_block_size_lowers(decode_only):
    cycle = itertools.cycle(itertools.product(DTYPES, GROUPS, MASKS))
    for head_dim, block_size in itertools.product(HEAD_DIMS, BLOCK_SIZES):
        dtype, group, (window, cap) = next(cycle)
        text = lower_for_cuda(
            head_dim=head_dim,
            block_size=block_size,
            group=group,
            dtype=dtype,
            decode_only=decode_only,
            window=window,
            cap=cap,
            table_positions=32768 if block_size % 16 == 0 else 1024,  # split-K on and off
        )
        assert TRITON_CALL in text, (head_dim, block_size)


@pytest.mark.parametrize("decode_only", [True, False])
def test_every_group_and_dtype_lowers(decode_only):
    for (group, dtype), (window, cap) in zip(
        itertools.product(GROUPS, DTYPES), itertools.cycle(MASKS), strict=False
    ):
        text = lower_for_cuda(
            head_dim=128,
            block_size=16,
            group=group,
            dtype=dtype,
            decode_only=decode_only,
            window=window,
            cap=cap,
            table_positions=8192,
        )
        assert TRITON_CALL in text, (group, dtype)


@pytest.mark.parametrize("cache_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("decode_only", [True, False])
def test_an_fp8_cache_lowers(cache_dtype, decode_only):
    """kv_cache_dtype "fp8" / "fp8_e5m2": the kernel widens the pages it loads to the queries'
    type (the engine hands it the cache's bytes bitcast to the fp8 type)."""
    assert TRITON_CALL in lower_for_cuda(decode_only=decode_only, cache_dtype=cache_dtype)


def test_unsupported_head_dim_is_rejected_by_the_lowering():
    """The check is real: a 96-wide head (not a power of two) does not lower."""
    with pytest.raises(ValueError, match="power of 2"):
        lower_for_cuda(head_dim=96, group=1, decode_only=True, table_positions=1024)
