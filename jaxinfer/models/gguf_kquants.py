"""The K-quants Q4_K and Q6_K: how a 256-element super-block's bytes are split, and their values.

ggml stores a K-quant row as super-blocks of QK_K = 256 elements (ggml-common.h):
  Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes scales, 128 bytes qs
      eight sub-blocks of 32; sc[j], m[j] 6-bit (ggml's get_scale_min_k4 packing);
      element 64 k + i (i < 32) is the low nibble of qs[32 k + i], 64 k + 32 + i the high one;
      value = (d * sc[j]) * q - dmin * m[j]                    (j = element // 32)
  Q6_K (210 bytes): 128 bytes ql, 64 bytes qh, 16 int8 scales, f16 d
      element 128 h + r: low 4 bits from ql[64 h + r % 64] (high nibble for r >= 64), high 2 bits
      from qh[32 h + r % 32] at bit 2 (r // 32);
      value = (d * scale[j]) * (q - 32)                        (j = element // 16)
`split` (models/gguf_blocks.py) keeps every byte where the kernel streams it, none added:
quants [rows, n * 128] (Q4_K's qs) or [rows, n * 192] (Q6_K's ql then qh, as in the file),
scales [rows, n] float16 (d), mins [rows, n] float16 (Q4_K's dmin), and sub_scales: the raw
sub-block scale bytes, [rows, n * 12] uint8 (Q4_K, still packed: the kernel unpacks the 6-bit
fields once per super-block and channel) or [rows, n * 16] int8 (Q6_K), n super-blocks per row.

`dequantize` is written once for numpy (host: tests, the dequantize-first fallback) and jax.numpy
(the embedding gather, the jnp product path): the same operations give gguf-py's float32 values
bitwise in both, because every product is exact in float32 (d has 11 significant bits, sc and m 6,
q 4: d * sc * q has at most 21; Q6_K's d * scale * (q - 32) at most 11 + 7 + 5 = 23), so the
order XLA evaluates them in cannot matter, and Q4_K's one subtraction rounds once whether or
not it is fused into a multiply-add.
"""

from __future__ import annotations

from types import ModuleType

K_QUANTS = ("Q4_K", "Q6_K")
QK_K = 256


def dequantize(xp: ModuleType, qtype: str, quants, scales, mins, sub_scales):
    """[..., n * 256] float32 from the split arrays of n super-blocks per row, any leading axes;
    `xp` is numpy or jax.numpy."""
    *lead, n = scales.shape
    d = scales.astype(xp.float32)
    if qtype == "Q4_K":
        packed = sub_scales.reshape(*lead, n, 3, 4)
        low, high, rest = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
        sc = xp.concatenate([low & 0x3F, (rest & 0x0F) | ((low >> 2) & 0x30)], axis=-1)
        mn = xp.concatenate([high & 0x3F, (rest >> 4) | ((high >> 2) & 0x30)], axis=-1)
        scale = d[..., None] * sc.astype(xp.float32)  # [..., n, 8]
        offset = mins.astype(xp.float32)[..., None] * mn.astype(xp.float32)
        qs = quants.reshape(*lead, n, 4, 32)
        q = xp.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*lead, n, 8, 32).astype(xp.float32)
        values = scale[..., None] * q - offset[..., None]
    elif qtype == "Q6_K":
        blocks = quants.reshape(*lead, n, 192)
        ql = blocks[..., :128].reshape(*lead, n, 2, 64)
        qh = blocks[..., 128:].reshape(*lead, n, 2, 32)
        low = xp.stack([ql & 0x0F, ql >> 4], axis=-2).reshape(*lead, n, 2, 128)
        high = xp.stack([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], axis=-2)
        q = (low | (high.reshape(*lead, n, 2, 128) << 4)).astype(xp.float32) - 32.0
        scale = d[..., None] * sub_scales.reshape(*lead, n, 16).astype(xp.float32)
        values = scale[..., None] * q.reshape(*lead, n, 16, 16)
    else:
        raise ValueError(f"{qtype} is not one of the K-quants {K_QUANTS}")
    return values.reshape(*lead, n * QK_K)
