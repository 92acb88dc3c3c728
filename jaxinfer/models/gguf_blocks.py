"""A GGUF matrix stored as Q8_0, Q4_0, Q4_1, Q4_K or Q6_K blocks, split into arrays on the host
(numpy only).

ggml stores a 2-D tensor [rows, cols] row by row (cols = `in` of a linear weight, the embedding
width of a token table), each row a run of 32-element blocks along cols:
  Q8_0: float16 d, 32 int8 q                           value = d * q
  Q4_0: float16 d, 16 bytes of nibbles                  value = d * (q - 8)
  Q4_1: float16 d, float16 m, 16 bytes of nibbles       value = d * q + m
(byte j of the nibbles: element j in the low nibble, element j + 16 in the high one). `split`
turns the stored bytes into `quants` [rows, blocks * (32 | 16)], `scales` and `mins` [rows,
blocks] float16: the same bytes, no byte added, in the arrays the CPU kernel
(kernels/cpu/gguf_matmul.cc) streams. The K-quants' 256-element super-blocks split the same way
plus `sub_scales`, their raw sub-block scale bytes (models/gguf_kquants.py has the layouts).
Because blocks run along a row, permuting rows (llama.cpp's q/k head order,
gguf_reader._reverse_permute) permutes whole rows of each array.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from jaxinfer.models import gguf_kquants


@dataclass(frozen=True, kw_only=True)
class BlockLayout:
    """Where `split` finds each array's bytes within one stored block (byte offsets)."""

    elements: int  # weights per block
    quants: tuple[int, int]  # [start, stop) of the quants
    scale: int  # the float16 d
    min: int | None = None  # the float16 m (Q4_1) or dmin (Q4_K)
    sub_scales: tuple[int, int] | None = None  # the K-quants' sub-block scales
    quant_dtype: str = "uint8"
    sub_scale_dtype: str = "uint8"


# Types kept in blocks by quantization="gguf" (Q5_0, Q5_1, the other K-quants Q2_K / Q3_K / Q5_K
# and the float types are dequantized at load).
LAYOUTS = {
    "Q8_0": BlockLayout(elements=32, quants=(2, 34), scale=0, quant_dtype="int8"),
    "Q4_0": BlockLayout(elements=32, quants=(2, 18), scale=0),
    "Q4_1": BlockLayout(elements=32, quants=(4, 20), scale=0, min=2),
    "Q4_K": BlockLayout(elements=256, quants=(16, 144), scale=0, min=2, sub_scales=(4, 16)),
    "Q6_K": BlockLayout(
        elements=256, quants=(0, 192), scale=208, sub_scales=(192, 208), sub_scale_dtype="int8"
    ),
}
BLOCK_TYPES = tuple(LAYOUTS)
BLOCK = 32  # elements per block of Q8_0 / Q4_0 / Q4_1


@dataclass(frozen=True, kw_only=True)
class GGUFBlocks:
    """One GGUF matrix [rows, cols] in its blocks (host memory), in Hugging Face's layout."""

    qtype: str  # one of BLOCK_TYPES
    quants: np.ndarray  # int8 [rows, cols] (Q8_0) or uint8 [rows, blocks * quant bytes]
    scales: np.ndarray  # float16 [rows, blocks]
    mins: np.ndarray | None  # float16 [rows, blocks] for Q4_1 and Q4_K, else None
    sub_scales: np.ndarray | None = None  # [rows, blocks * 12 | 16] for Q4_K / Q6_K, else None

    @property
    def arrays(self) -> tuple[np.ndarray | None, ...]:
        """(quants, scales, mins, sub_scales): the order the kernel and `dequantize` take."""
        return (self.quants, self.scales, self.mins, self.sub_scales)

    @property
    def shape(self) -> tuple[int, int]:
        rows, blocks = self.scales.shape
        return rows, blocks * LAYOUTS[self.qtype].elements

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays if a is not None)

    @classmethod
    def split(cls, stored: np.ndarray, qtype: str) -> GGUFBlocks:
        """`stored`: uint8 [rows, blocks * bytes per block], one tensor's data in the file."""
        if qtype not in BLOCK_TYPES:
            raise ValueError(f"GGUF type {qtype} is not one of the block types {BLOCK_TYPES}")
        layout = LAYOUTS[qtype]
        _, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        rows = stored.shape[0]
        if stored.size % (rows * type_size):
            raise ValueError(f"{qtype} rows of {stored.size // rows} bytes are not whole blocks")
        blocks = np.asarray(stored, dtype=np.uint8).reshape(rows, -1, type_size)

        def run(start: int, stop: int, dtype: str) -> np.ndarray:  # [rows, blocks * bytes]
            return np.ascontiguousarray(blocks[..., start:stop]).reshape(rows, -1).view(dtype)

        def half(offset: int | None) -> np.ndarray | None:  # [rows, blocks] float16
            return None if offset is None else run(offset, offset + 2, "float16")

        subs = layout.sub_scales
        return cls(
            qtype=qtype,
            quants=run(*layout.quants, layout.quant_dtype),
            scales=half(layout.scale),
            mins=half(layout.min),
            sub_scales=None if subs is None else run(*subs, layout.sub_scale_dtype),
        )

    def map_rows(self, permute: Callable[[np.ndarray], np.ndarray]) -> GGUFBlocks:
        """The same blocks with `permute` (a function reordering axis 0) applied to every array."""

        def apply(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else np.ascontiguousarray(permute(array))

        quants, scales, mins, sub_scales = map(apply, self.arrays)
        return dataclasses.replace(
            self, quants=quants, scales=scales, mins=mins, sub_scales=sub_scales
        )

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], bitwise what gguf.quants.dequantize gives for the stored bytes."""
        if self.qtype in gguf_kquants.K_QUANTS:
            return gguf_kquants.dequantize(np, self.qtype, *self.arrays)
        rows, cols = self.shape
        d = self.scales.astype(np.float32)[..., None]
        if self.qtype == "Q8_0":
            q = self.quants.reshape(rows, -1, BLOCK).astype(np.float32)
            return (q * d).reshape(rows, cols)
        nibbles = (
            self.quants.reshape(rows, -1, 1, BLOCK // 2) >> np.array([0, 4], np.uint8)[:, None]
        )
        q = (nibbles & np.uint8(0x0F)).reshape(rows, -1, BLOCK).astype(np.float32)
        if self.qtype == "Q4_0":
            return ((q - 8) * d).reshape(rows, cols)
        return (d * q + self.mins.astype(np.float32)[..., None]).reshape(rows, cols)

    def check_finite(self, name: str) -> None:
        """Raise naming `name` when a scale or min is NaN or inf (the quants are integers)."""
        for label, array in (("scales", self.scales), ("mins", self.mins)):
            if array is not None and not np.isfinite(array).all():
                bad = array.size - int(np.count_nonzero(np.isfinite(array)))
                raise ValueError(
                    f"checkpoint tensor {name!r} ({self.qtype}) holds {bad} non-finite block "
                    f"{label}: the file is damaged. EngineConfig(check_weights_finite=False) "
                    "skips this check"
                )
