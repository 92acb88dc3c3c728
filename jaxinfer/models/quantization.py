"""Weight-only int8 quantization (`EngineConfig.quantization="int8"`): symmetric, one scale per
output channel, quantized once on the host at load and kept int8 on the device.

W[in, out] ~= values * scale: `scale[o] = max_i |W[i, o]| / 127`, `values = round(W / scale)`
in [-127, 127]. The scale of an output channel factors out of the dot exactly, so the product is
`(x @ values.astype(dtype)) * scale`: the only error is the rounding of each weight (at most
scale / 2), and the reference for correctness is the float model run on `values * scale`.

Layout: `values` holds the rows of the stored matrix (output channels of a linear weight, the
vocabulary of a token-embedding table) in panels of 64, `[ceil(rows / 64), cols, 64]`
(kernels/int8_matmul.pack_panels, packed once at load): the layout the CPU kernel streams at a
core's read bandwidth. A block of output channels is still a contiguous slice (a panel), and a
token-embedding table [V, E] is the same object as its tied lm_head (`.T`): a gathered row `v`
is `values[v // 64, :, v % 64]`.

Why the product has two paths (measured, benchmarks/RESULTS.md, "Weight-only int8"): XLA:CPU
does not fuse the int8 -> float convert into the dot. `x @ values.astype` compiles to a
`wrapped_convert` fusion that writes a float32 copy of the whole matrix, then the dot reads that
copy, and that convert runs at ~2 ns per element: an int8 SmolLM2 decoded ~3x slower than float32
while holding a quarter of the bytes. So on CPU `quantized_matmul` calls a kernel behind `jax.ffi`
(jaxinfer/kernels/int8_matmul.py) that reads the int8 rows and converts them in registers. Where
that kernel does not apply (another backend, no compiler, `JAXINFER_CPU_KERNELS=0`) it walks the
panels, converting and multiplying one panel of 64 output channels at a time (`lax.map`, so XLA
keeps one panel's float copy at a time): on CPU that brings an isolated product back to about the
float32 weight's time (the GPU path too; whether XLA:GPU fuses the convert is not measured here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kernels.int8_matmul import (
    PANEL,
    cpu_kernel_enabled,
    int8_matmul,
    pack_panels,
    unpack_panels,
)
from jaxinfer.models.family import WeightSpec

QUANTIZATIONS = (None, "int8")

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
    """An int8 matrix [rows, cols] with one float32 scale per row, standing for a float matrix.

    `values`: the int8 rows in panels, `pack_panels(rows)` ([ceil(rows / 64), cols, 64]);
    `scale`: float32 [rows]. `transposed`: the logical matrix is `(rows * scale[:, None]).T`, a
    linear weight [in, out] whose output channels are the rows; otherwise it is
    `rows * scale[:, None]` itself (a token-embedding table [V, E], gathered by row). `dtype`: the
    float dtype the model computes in (the dtype the weight would have had unquantized).
    """

    values: jax.Array  # int8 [panels, cols, PANEL]
    scale: jax.Array  # float32 [rows]
    transposed: bool = dataclasses.field(metadata={"static": True})
    dtype_name: str = dataclasses.field(metadata={"static": True})

    @classmethod
    def from_rows(
        cls, values: np.ndarray, scale: np.ndarray, *, transposed: bool, dtype_name: str
    ) -> QuantizedWeight:
        """From int8 rows [rows, cols] and their scales (host arrays; tests and benchmarks)."""
        return cls(
            values=jnp.asarray(pack_panels(np.asarray(values, dtype=np.int8))),
            scale=jnp.asarray(scale, dtype=jnp.float32),
            transposed=transposed,
            dtype_name=dtype_name,
        )

    @property
    def stored_shape(self) -> tuple[int, int]:
        """(rows, cols) of the stored matrix: output channels (or vocabulary) x inputs."""
        return self.scale.shape[0], self.values.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.stored_shape
        return (cols, rows) if self.transposed else (rows, cols)

    def __getitem__(self, rows: jax.Array) -> jax.Array:
        """Rows of an embedding table [..., cols], dequantized (only the gathered rows)."""
        if self.transposed:
            raise TypeError("a transposed QuantizedWeight is a linear weight; it has no rows")
        picked = self.values[rows // PANEL, :, rows % PANEL].astype(self.dtype)
        return picked * self.scale[rows][..., None].astype(self.dtype)

    def dequantize(self) -> jax.Array:
        """The float matrix this weight stands for (tests and references; never in the step)."""
        rows = unpack_panels(self.values, self.scale.shape[0])
        matrix = rows.astype(jnp.float32) * self.scale[:, None]
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
    on its device. An embedding [V, E] keeps its rows; a linear weight [in, out] is stored with
    its output channels as rows; either is packed into panels. (One device only: the engine
    refuses int8 with a mesh, so the panels carry no sharding.)"""
    transposed = path != "embed"
    rows_first = array.T if transposed else array
    values, scale = quantize_int8(rows_first)
    panels = pack_panels(values)
    values_spec = dataclasses.replace(spec, shape=panels.shape, logical_axes=(None,) * 3)
    scale_spec = dataclasses.replace(spec, shape=scale.shape, logical_axes=(None,))
    return QuantizedWeight(
        values=placement.put(path, values_spec, panels),
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
    whatever T is, so batch-invariant mode calls it as it is); elsewhere the panels of 64 output
    channels, each converted and multiplied in turn, then the per-channel scale."""
    if not w.transposed:
        raise TypeError("matmul takes a linear weight [in, out]; pass embed.T for a tied lm_head")
    out_features = w.scale.shape[0]
    out_dtype = preferred_element_type or x.dtype
    if cpu_kernel_enabled():
        return int8_matmul(x, w.values, w.scale).astype(out_dtype)

    def panel_product(panel: jax.Array) -> jax.Array:  # panel int8 [in, PANEL] -> [T, PANEL]
        return jnp.dot(x, panel.astype(x.dtype), preferred_element_type=preferred_element_type)

    products = jax.lax.map(panel_product, w.values)  # [panels, T, PANEL]
    product = jnp.moveaxis(products, 0, 1).reshape(x.shape[0], -1)[:, :out_features]
    return (product.astype(jnp.float32) * w.scale).astype(out_dtype)
