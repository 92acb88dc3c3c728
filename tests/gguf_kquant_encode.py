"""Q4_K and Q6_K encoders for test checkpoints: gguf-py (0.19) dequantizes the K-quants but has no
`quantize` for them.

Plain round-to-nearest with each sub-block's scale from its range, not llama.cpp's search for the
best scales: the tests compare two ways of reading the same file, so the file only has to be a
valid K-quant of roughly the checkpoint's weights. The byte layout is the one gguf-py's
dequantize reads (the tests check the round trip through it), written independently of
jaxinfer/models/gguf_kquants.py.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _f16_scale(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to float16 and back (what the block stores and the reader sees)."""
    return values.astype(np.float16).astype(np.float32)


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0)


def quantize_q4_k(matrix: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] (cols % 256 == 0) -> uint8 [rows, cols / 256 * 144]."""
    rows = matrix.shape[0]
    blocks = np.asarray(matrix, np.float32).reshape(-1, 8, 32)  # [n, sub-blocks, 32]
    low = np.minimum(blocks.min(-1), 0.0)
    step = (blocks.max(-1) - low) / 15  # [n, 8]
    d = _f16_scale(step.max(-1) / 63)  # [n]
    dmin = _f16_scale(-low.min(-1) / 63)
    sc = np.clip(np.rint(_divide(step, d[:, None])), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_divide(-low, dmin[:, None])), 0, 63).astype(np.uint8)
    scale, offset = d[:, None] * sc, dmin[:, None] * mn
    q = np.clip(np.rint(_divide(blocks + offset[..., None], scale[..., None])), 0, 15)
    q = q.astype(np.uint8).reshape(-1, 4, 2, 32)  # [n, pair k, low/high, i]
    packed = np.concatenate(
        [
            (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
            (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        axis=-1,
    )
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate(
        [
            d.astype(np.float16)[:, None].view(np.uint8),
            dmin.astype(np.float16)[:, None].view(np.uint8),
            packed,
            qs,
        ],
        axis=-1,
    )
    return out.reshape(rows, -1)


def quantize_q6_k(matrix: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] (cols % 256 == 0) -> uint8 [rows, cols / 256 * 210]."""
    rows = matrix.shape[0]
    blocks = np.asarray(matrix, np.float32).reshape(-1, 16, 16)  # [n, groups of 16, 16]
    step = np.abs(blocks).max(-1) / 31  # [n, 16]
    d = _f16_scale(step.max(-1) / 127)
    scales = np.clip(np.rint(_divide(step, d[:, None])), -128, 127).astype(np.int8)
    q = np.clip(np.rint(_divide(blocks, (d[:, None] * scales)[..., None])), -32, 31) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 128)  # [n, half h, r]
    nibbles = q.reshape(-1, 2, 2, 64) & 0x0F  # [n, h, r // 64, r % 64]
    ql = nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)
    top = (q.reshape(-1, 2, 4, 32) >> 4).astype(np.uint8)  # [n, h, r // 32, r % 32]
    qh = top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)
    out = np.concatenate(
        [
            ql.reshape(-1, 128),
            qh.reshape(-1, 64),
            scales.view(np.uint8),
            d.astype(np.float16)[:, None].view(np.uint8),
        ],
        axis=-1,
    )
    return out.reshape(rows, -1)


ENCODERS = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}
