"""`EngineConfig.quantization="gguf"`: a GGUF's Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K matrices stay in
their blocks on the device, and the products read the blocks (vLLM's name for GGUF-quantized
weights).

A `GGUFBlockWeight` holds the arrays of models/gguf_blocks.py (quants, float16 scales, Q4_1's
float16 mins, the K-quants' dmin and raw sub-block scale bytes), exactly the file's bytes. On CPU `gguf_block_matmul` calls the kernel behind
`jax.ffi` (kernels/gguf_matmul.py), which decodes each block in registers into the float32 values
gguf-py's dequantize gives: the product multiplies the very weights the dequantize-first path
multiplies, in another summation order. Elsewhere (another backend, no compiler,
`JAXINFER_CPU_KERNELS=0`) the blocks of `BLOCK_ROWS` output channels are dequantized with jnp one
at a time and multiplied (correct; not faster than float32). The embedding gathers rows of blocks
and dequantizes only those; a tied lm_head is `embed.T`, the same blocks read as a linear weight.

Other GGUF types (F32/F16 tensors, the K-quants Q2_K / Q3_K / Q5_K) are dequantized at load as
without quantization; norms stay float32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxinfer.kernels.gguf_matmul import gguf_kernel_enabled, gguf_matmul
from jaxinfer.models import gguf_kquants
from jaxinfer.models.family import WeightSpec
from jaxinfer.models.gguf_blocks import BLOCK, LAYOUTS, GGUFBlocks
from jaxinfer.models.quantization import StoredMatrix

BLOCK_ROWS = 128  # output channels dequantized per step of the jnp path


@jax.tree_util.register_dataclass
@dataclass(frozen=True, kw_only=True)
class GGUFBlockWeight(StoredMatrix):
    """A GGUF matrix in blocks on the device, standing for a float matrix.

    The stored matrix is [rows, cols] with blocks along cols (ggml's and Hugging Face's [out, in]
    for a linear weight, [V, E] for a token table). `transposed`: the logical matrix is its
    transpose, a linear weight [in, out]. `dtype_name`: the dtype the model computes in.
    """

    quants: jax.Array  # int8 [rows, cols] (Q8_0) or uint8 [rows, blocks * quant bytes]
    scales: jax.Array  # float16 [rows, blocks]
    mins: jax.Array | None  # float16 [rows, blocks] (Q4_1, Q4_K), else None
    qtype: str = dataclasses.field(metadata={"static": True})
    transposed: bool = dataclasses.field(metadata={"static": True})
    dtype_name: str = dataclasses.field(metadata={"static": True})
    sub_scales: jax.Array | None = None  # [rows, blocks * 12 | 16] (Q4_K, Q6_K), else None

    @property
    def arrays(self) -> tuple[jax.Array | None, ...]:
        return (self.quants, self.scales, self.mins, self.sub_scales)

    @property
    def shape(self) -> tuple[int, int]:
        rows, blocks = self.scales.shape
        cols = blocks * LAYOUTS[self.qtype].elements
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays if a is not None)

    def __getitem__(self, rows: jax.Array) -> jax.Array:
        """Rows of a token table [..., cols], dequantized (only the gathered rows)."""
        if self.transposed:
            raise TypeError("a transposed GGUFBlockWeight is a linear weight; it has no rows")
        picked = [None if a is None else a[rows] for a in self.arrays]
        return dequantize_blocks(self.qtype, *picked).astype(self.dtype)

    def dequantize(self) -> jax.Array:
        """The float matrix this weight stands for (tests, references, the invariant fallback)."""
        matrix = dequantize_blocks(self.qtype, *self.arrays)
        return (matrix.T if self.transposed else matrix).astype(self.dtype)


def dequantize_blocks(
    qtype: str,
    quants: jax.Array,
    scales: jax.Array,
    mins: jax.Array | None,
    sub_scales: jax.Array | None = None,
) -> jax.Array:
    """[..., cols] float32 from blocks with any leading axes: gguf-py's values (d * q is exact in
    float32, so Q4_1's d * q + m rounds once whether or not XLA fuses it; the K-quants:
    models/gguf_kquants.py)."""
    if qtype in gguf_kquants.K_QUANTS:
        return gguf_kquants.dequantize(jnp, qtype, quants, scales, mins, sub_scales)
    *lead, blocks = scales.shape
    d = scales.astype(jnp.float32)[..., None]
    if qtype == "Q8_0":
        q = quants.reshape(*lead, blocks, BLOCK).astype(jnp.float32)
        return (q * d).reshape(*lead, blocks * BLOCK)
    packed = quants.reshape(*lead, blocks, BLOCK // 2)
    q = jnp.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(jnp.float32)
    if qtype == "Q4_0":
        values = (q - 8.0) * d
    else:
        values = d * q + mins.astype(jnp.float32)[..., None]
    return values.reshape(*lead, blocks * BLOCK)


def blocks_for_device(path: str, spec: WeightSpec, blocks: GGUFBlocks, dtype: str, placement):
    """Host blocks (Hugging Face's [rows, cols]) -> a GGUFBlockWeight on the device. A linear
    weight (`spec.transpose`, our [in, out]) is the transposed view of the stored [out, in]."""
    expected = spec.shape[::-1] if spec.transpose else spec.shape
    if blocks.shape != tuple(expected):
        raise ValueError(
            f"checkpoint tensor {spec.hf_name!r} has shape {blocks.shape} ({blocks.qtype} "
            f"blocks), expected {tuple(expected)}"
        )

    def put(array):
        if array is None:
            return None
        rows_spec = dataclasses.replace(spec, shape=array.shape, logical_axes=(None, None))
        return placement.put(path, rows_spec, array)

    return GGUFBlockWeight(
        quants=put(blocks.quants),
        scales=put(blocks.scales),
        mins=put(blocks.mins),
        sub_scales=put(blocks.sub_scales),
        qtype=blocks.qtype,
        transposed=spec.transpose,
        dtype_name=dtype,
    )


def gguf_block_matmul(
    x: jax.Array,  # [T, in]
    w: GGUFBlockWeight,  # logical [in, out]
    preferred_element_type=None,
) -> jax.Array:
    """x @ w -> [T, out]: the kernel on CPU (decided when traced; batch invariant as it is),
    else BLOCK_ROWS output channels at a time dequantized with jnp and multiplied."""
    if not w.transposed:
        raise TypeError("matmul takes a linear weight [in, out]; pass embed.T for a tied lm_head")
    out_dtype = preferred_element_type or x.dtype
    if gguf_kernel_enabled():
        return gguf_matmul(w.qtype, x, *w.arrays).astype(out_dtype)

    def block_product(arrays) -> jax.Array:  # the blocks of some output channels -> [T, rows]
        matrix = dequantize_blocks(w.qtype, *arrays).astype(x.dtype)
        return jax.lax.dot_general(
            x, matrix, (((1,), (1,)), ((), ())), preferred_element_type=preferred_element_type
        )

    out_features = w.scales.shape[0]
    whole = out_features - out_features % BLOCK_ROWS
    arrays = w.arrays
    parts = []
    if whole:
        stacked = jax.tree.map(
            lambda a: a[:whole].reshape(whole // BLOCK_ROWS, BLOCK_ROWS, *a.shape[1:]), arrays
        )
        products = jax.lax.map(block_product, stacked)  # [n, T, BLOCK_ROWS]
        parts.append(jnp.moveaxis(products, 0, 1).reshape(x.shape[0], whole))
    if whole < out_features:
        parts.append(block_product(jax.tree.map(lambda a: a[whole:], arrays)))
    product = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    return product.astype(out_dtype)
