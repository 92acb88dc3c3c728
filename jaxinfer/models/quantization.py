"""Weight-only int8 quantization (`EngineConfig.quantization="int8"`): symmetric, one scale per
output channel, quantized once on the host at load and kept int8 on the device.

W[in, out] ~= values * scale: `scale[o] = max_i |W[i, o]| / 127`, `values = round(W / scale)`
in [-127, 127]. The scale of an output channel factors out of the dot exactly, so the product is
`(x @ values.astype(dtype)) * scale`: the only error is the rounding of each weight (at most
scale / 2), and the reference for correctness is the float model run on `values * scale`.

Layout: `values` is stored with output channels as rows ([out, in], Hugging Face's own layout),
so that a block of output channels is a contiguous slice and a token-embedding table [V, E] is the
same object as its tied lm_head (`.T`).

Why the product has two paths (measured, benchmarks/RESULTS.md, "Weight-only int8"): XLA:CPU
does not fuse the int8 -> float convert into the dot. `x @ values.astype` compiles to a
`wrapped_convert` fusion that writes a float32 copy of the whole matrix, then the dot reads that
copy, and that convert runs at ~2 ns per element: an int8 SmolLM2 decoded ~3x slower than float32
while holding a quarter of the bytes. So on CPU `quantized_matmul` calls a kernel behind `jax.ffi`
(jaxinfer/kernels/int8_matmul.py) that reads the int8 rows and converts them in registers. Where
that kernel does not apply (another backend, no compiler, `JAXINFER_CPU_KERNELS=0`) it walks blocks
of `BLOCK_ROWS` output channels, converting and multiplying one block at a time (`lax.map`, so XLA
keeps one block's float copy at a time): on CPU that brings an isolated product back to about the
float32 weight's time (the GPU path too; whether XLA:GPU fuses the convert is not measured here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernels.int8_matmul import cpu_kernel_enabled, int8_matmul
from jaxinfer.models.family import WeightSpec

QUANTIZATIONS = (None, "int8")

# Output channels converted per step of the product (see the module docstring).
BLOCK_ROWS = 128

# Top-level 2-D parameters read through `matmul` (or gathered, for the embedding): the rest of
# the top level holds norms and learned position tables, which stay float.
_TOP_LEVEL_LINEAR = ("embed", "lm_head", "project_in", "project_out")


class StoredMatrix:
    """What the quantized weight pytrees share (QuantizedWeight here, GGUFBlockWeight in
    models/gguf_weight.py): the float dtype they stand for, and `.T`, numpy's name, so that a
    tied lm_head is `embed.T` whatever the storage."""

    transposed: bool
    dtype_name: str

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def T(self):
        return dataclasses.replace(self, transposed=not self.transposed)


@jax.tree_util.register_dataclass
@dataclass(frozen=True, kw_only=True)
class QuantizedWeight(StoredMatrix):
    """An int8 matrix with one float32 scale per row of `values`, standing for a float matrix.

    `transposed`: the logical matrix is `(values * scale[:, None]).T`, a linear weight [in, out]
    whose output channels are the rows of `values`; otherwise it is `values * scale[:, None]`
    itself (a token-embedding table [V, E], gathered by row). `dtype`: the float dtype the model
    computes in (the dtype the weight would have had unquantized).
    """

    values: jax.Array  # int8 [rows, cols]
    scale: jax.Array  # float32 [rows]
    transposed: bool = dataclasses.field(metadata={"static": True})
    dtype_name: str = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.values.shape
        return (cols, rows) if self.transposed else (rows, cols)

    def __getitem__(self, rows: jax.Array) -> jax.Array:
        """Rows of an embedding table [..., cols], dequantized (only the gathered rows)."""
        if self.transposed:
            raise TypeError("a transposed QuantizedWeight is a linear weight; it has no rows")
        picked = self.values[rows].astype(self.dtype)
        return picked * self.scale[rows][..., None].astype(self.dtype)

    def dequantize(self) -> jax.Array:
        """The float matrix this weight stands for (tests and references; never in the step)."""
        matrix = self.values.astype(jnp.float32) * self.scale[:, None]
        return (matrix.T if self.transposed else matrix).astype(self.dtype)


def quantize_int8(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [rows, cols] -> (int8 values [rows, cols], float32 scale [rows]), one scale per row.

    A row of zeros gets scale 1 (values 0) rather than a division by zero.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    amax = np.abs(matrix).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    values = np.clip(np.rint(matrix / scale[:, None]), -127, 127).astype(np.int8)
    return values, scale


def is_quantized_path(path: str, spec: WeightSpec) -> bool:
    """Which parameters int8 quantization covers: every 2-D weight of a layer (q/k/v/o, fused qkv,
    MLP), the embedding (also the tied lm_head), lm_head and OPT's projections."""
    if len(spec.shape) != 2:
        return False
    return path.startswith("layers.") or path in _TOP_LEVEL_LINEAR


def quantize_for_device(
    path: str, spec: WeightSpec, array: np.ndarray, placement
) -> QuantizedWeight:
    """`array` in our layout (`spec.shape`, already cast to the model dtype) -> a QuantizedWeight
    on its device(s). An embedding [V, E] keeps its rows; a linear weight [in, out] is stored
    [out, in], its sharding following the logical axes reversed (and the scale the output axis)."""
    transposed = path != "embed"
    rows_first = array.T if transposed else array
    values, scale = quantize_int8(rows_first)
    axes = spec.logical_axes[::-1] if transposed else spec.logical_axes
    values_spec = dataclasses.replace(spec, shape=values.shape, logical_axes=axes)
    scale_spec = dataclasses.replace(spec, shape=scale.shape, logical_axes=axes[:1])
    return QuantizedWeight(
        values=placement.put(path, values_spec, values),
        scale=placement.put(path, scale_spec, scale),
        transposed=transposed,
        dtype_name=str(array.dtype),
    )


def quantized_matmul(
    x: jax.Array,  # [T, in]
    w: QuantizedWeight,  # logical [in, out]
    preferred_element_type=None,
) -> jax.Array:
    """x @ w -> [T, out]. On CPU the int8 kernel (decided when traced; a row's result is the same
    whatever T is, so batch-invariant mode calls it as it is); elsewhere blocks of BLOCK_ROWS
    output channels, each converted and multiplied in turn, then the per-channel scale."""
    if not w.transposed:
        raise TypeError("matmul takes a linear weight [in, out]; pass embed.T for a tied lm_head")
    out_features, in_features = w.values.shape
    out_dtype = preferred_element_type or x.dtype
    if cpu_kernel_enabled():
        return int8_matmul(x, w.values, w.scale).astype(out_dtype)

    def block_product(block: jax.Array) -> jax.Array:  # block int8 [rows, in] -> [T, rows]
        return jax.lax.dot_general(
            x,
            block.astype(x.dtype),
            (((1,), (1,)), ((), ())),
            preferred_element_type=preferred_element_type,
        )

    whole = out_features - out_features % BLOCK_ROWS
    parts = []
    if whole:
        blocks = w.values[:whole].reshape(whole // BLOCK_ROWS, BLOCK_ROWS, in_features)
        products = jax.lax.map(block_product, blocks)  # [n, T, BLOCK_ROWS]
        parts.append(jnp.moveaxis(products, 0, 1).reshape(x.shape[0], whole))
    if whole < out_features:  # a vocabulary or width that is not a multiple of the block
        parts.append(block_product(w.values[whole:]))
    product = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    return (product.astype(jnp.float32) * w.scale).astype(out_dtype)
