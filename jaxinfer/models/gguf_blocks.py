"""A GGUF matrix stored as Q8_0, Q4_0 or Q4_1 blocks, split into arrays on the host (numpy only).

ggml stores a 2-D tensor [rows, cols] row by row (cols = `in` of a linear weight, the embedding
width of a token table), each row a run of 32-element blocks along cols:
  Q8_0: float16 d, 32 int8 q                           value = d * q
  Q4_0: float16 d, 16 bytes of nibbles                  value = d * (q - 8)
  Q4_1: float16 d, float16 m, 16 bytes of nibbles       value = d * q + m
(byte j of the nibbles: element j in the low nibble, element j + 16 in the high one). `split`
turns the stored bytes into `quants` [rows, blocks * (32 | 16)], `scales` and `mins` [rows,
blocks] float16: the same bytes, no byte added, in the arrays the CPU kernel
(kernels/cpu/gguf_matmul.cc) streams. Because blocks run along a row, permuting rows (llama.cpp's
q/k head order, gguf_reader._reverse_permute) permutes whole rows of each array.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

BLOCK = 32
# Types kept in blocks by quantization="gguf"; the K-quants (Q4_K, Q6_K, ...) are dequantized at
# load for now.
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1")
_HEADER_BYTES = {"Q8_0": 2, "Q4_0": 2, "Q4_1": 4}  # d (and m) before a block's quants


@dataclass(frozen=True, kw_only=True)
class GGUFBlocks:
    """One GGUF matrix [rows, cols] in its blocks (host memory), in Hugging Face's layout."""

    qtype: str  # one of BLOCK_TYPES
    quants: np.ndarray  # int8 [rows, cols] (Q8_0) or uint8 [rows, cols / 2]
    scales: np.ndarray  # float16 [rows, cols / 32]
    mins: np.ndarray | None  # float16 [rows, cols / 32] for Q4_1, else None

    @property
    def shape(self) -> tuple[int, int]:
        rows, blocks = self.scales.shape
        return rows, blocks * BLOCK

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.quants, self.scales, self.mins) if a is not None)

    @classmethod
    def split(cls, stored: np.ndarray, qtype: str) -> GGUFBlocks:
        """`stored`: uint8 [rows, blocks * bytes per block], one tensor's data in the file."""
        if qtype not in BLOCK_TYPES:
            raise ValueError(f"GGUF type {qtype} is not one of the block types {BLOCK_TYPES}")
        _, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        rows = stored.shape[0]
        blocks = np.asarray(stored, dtype=np.uint8).reshape(rows, -1, type_size)
        header = _HEADER_BYTES[qtype]
        quants = np.ascontiguousarray(blocks[..., header:]).reshape(rows, -1)
        return cls(
            qtype=qtype,
            quants=quants.view(np.int8) if qtype == "Q8_0" else quants,
            scales=np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0],
            mins=(
                np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
                if qtype == "Q4_1"
                else None
            ),
        )

    def map_rows(self, permute: Callable[[np.ndarray], np.ndarray]) -> GGUFBlocks:
        """The same blocks with `permute` (a function reordering axis 0) applied to every array."""
        return dataclasses.replace(
            self,
            quants=np.ascontiguousarray(permute(self.quants)),
            scales=np.ascontiguousarray(permute(self.scales)),
            mins=None if self.mins is None else np.ascontiguousarray(permute(self.mins)),
        )

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], bitwise what gguf.quants.dequantize gives for the stored bytes."""
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
