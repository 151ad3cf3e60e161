"""llama.cpp block quantization formats, written for clarity, vectorized with numpy.

A tensor's rows are cut into blocks; each block stores a few small integers per weight plus the fp16
scale(s) that map them back to floats. Bytes are laid out exactly as llama.cpp's `block_*` structs, so
GGUF files written with them load in llama.cpp.

| format | block | bytes | bits/weight | a weight is                                   |
|--------|------:|------:|------------:|-----------------------------------------------|
| Q8_0   |    32 |    34 |         8.5 | d · q,  q int8,  d = max|x| / 127             |
| Q4_0   |    32 |    18 |         4.5 | d · (q − 8),  q in 0..15,  d = x_maxabs / −8  |
| Q4_1   |    32 |    20 |         5.0 | d · q + m,  q in 0..15,  d = (max−min)/15, m = min |
| Q2_K   |   256 |    84 |       2.625 | d·sc · q − dmin·mn,  q in 0..3, per 16 weights 4-bit sc and mn |

Q8_0, Q4_0 and Q4_1 follow llama.cpp's reference quantizer bit for bit (the tests compare with the
`gguf` package's). Q2_K uses a simple per-sub-block min/max fit (llama.cpp searches a little harder for
the scales); its bytes decode with llama.cpp's dequantizer all the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

SUPER_BLOCK = 256  # K-quants


def round_half_away_from_zero(values: np.ndarray) -> np.ndarray:
    """C's roundf, computed without the float error of floor(|x| + 0.5) near .5."""
    magnitude = np.abs(values)
    whole = np.floor(magnitude)
    return np.sign(values) * (whole + np.floor(2 * (magnitude - whole)))


def _safe_inverse(scale: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(scale == 0, 0, 1 / scale).astype(np.float32)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8)


def _fp16_from(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """32 values 0..15 per block → 16 bytes: byte j holds value j (low nibble) and value j+16 (high)."""
    half = q.shape[1] // 2
    return (q[:, :half] | (q[:, half:] << np.uint8(4))).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    return np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=1)


# -- Q8_0 -------------------------------------------------------------------------------------------
def quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    scale = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    q = round_half_away_from_zero(blocks * _safe_inverse(scale)).astype(np.int8)
    return np.concatenate([_fp16_bytes(scale), q.view(np.uint8)], axis=1)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    scale = _fp16_from(raw[:, :2])
    return raw[:, 2:].view(np.int8).astype(np.float32) * scale


# -- Q4_0 -------------------------------------------------------------------------------------------
def quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    # The scale is signed: the weight of largest magnitude maps exactly to q = 0 (value −8 · d).
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
    scale = extreme / np.float32(-8)
    q = np.trunc(blocks * _safe_inverse(scale) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([_fp16_bytes(scale), _pack_nibbles(q)], axis=1)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    scale = _fp16_from(raw[:, :2])
    return (_unpack_nibbles(raw[:, 2:]).astype(np.float32) - 8) * scale


# -- Q4_1 -------------------------------------------------------------------------------------------
def quantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    low, high = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    scale = (high - low) / np.float32(15)
    q = np.trunc((blocks - low) * _safe_inverse(scale) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([_fp16_bytes(scale), _fp16_bytes(low), _pack_nibbles(q)], axis=1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    scale, low = _fp16_from(raw[:, :2]), _fp16_from(raw[:, 2:4])
    return _unpack_nibbles(raw[:, 4:]).astype(np.float32) * scale + low


# -- Q2_K -------------------------------------------------------------------------------------------
# block_q2_K: scales[16] (low nibble: scale, high nibble: min, of each 16-weight sub-block),
# qs[64] (2-bit values), d (fp16, unit of the scales), dmin (fp16, unit of the mins).
# Weight i of a 128-weight half sits in byte (i mod 32) of that half's 32 bytes, at bit 2·(i div 32).
def _q2_k_order(q: np.ndarray) -> np.ndarray:
    """(n, 256) values 0..3 → (n, 64) bytes in llama.cpp's order."""
    halves = q.reshape(-1, 2, 4, 32)  # half, bit position, byte
    packed = halves[:, :, 0] | (halves[:, :, 1] << 2) | (halves[:, :, 2] << 4) | (halves[:, :, 3] << 6)
    return packed.reshape(-1, 64).astype(np.uint8)


def quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    sub = blocks.reshape(-1, 16, 16)                       # 16 sub-blocks of 16 weights
    low = np.minimum(sub.min(axis=2), 0)                    # the format stores −min ≥ 0
    step = (sub.max(axis=2) - low) / 3                      # 2 bits: 4 levels
    # Sub-block scales and mins are themselves quantized to 4 bits against per-block units.
    d = step.max(axis=1, keepdims=True) / 15
    dmin = (-low).max(axis=1, keepdims=True) / 15
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    scale_q = np.clip(round_half_away_from_zero(step * _safe_inverse(d16)), 0, 15).astype(np.uint8)
    min_q = np.clip(round_half_away_from_zero(-low * _safe_inverse(dmin16)), 0, 15).astype(np.uint8)
    effective_step = (d16 * scale_q)[:, :, None]
    effective_min = (dmin16 * min_q)[:, :, None]
    q = round_half_away_from_zero((sub + effective_min) * _safe_inverse(effective_step))
    q = np.clip(q, 0, 3).astype(np.uint8).reshape(-1, SUPER_BLOCK)
    scales = (scale_q | (min_q << 4)).astype(np.uint8)
    return np.concatenate([scales, _q2_k_order(q), _fp16_bytes(d), _fp16_bytes(dmin)], axis=1)


def dequantize_q2_k(raw: np.ndarray) -> np.ndarray:
    scales, packed = raw[:, :16], raw[:, 16:80]
    d, dmin = _fp16_from(raw[:, 80:82]), _fp16_from(raw[:, 82:84])
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    q = (packed.reshape(-1, 2, 1, 32) >> shifts) & np.uint8(3)          # half, bit position, byte
    q = q.reshape(-1, 16, 16).astype(np.float32)
    step = (d * (scales & 0x0F).astype(np.float32))[:, :, None]
    minimum = (dmin * (scales >> 4).astype(np.float32))[:, :, None]
    return (q * step - minimum).reshape(-1, SUPER_BLOCK)


@dataclass(frozen=True)
class BlockFormat:
    name: str
    ggml_type: int                                    # gguf.GGMLQuantizationType value
    block_size: int                                   # weights per block
    block_bytes: int                                  # bytes per block
    quantize_blocks: Callable[[np.ndarray], np.ndarray]
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]
    error_bound: Callable[[np.ndarray], np.ndarray]   # per block: max |x − dequantize(quantize(x))| allowed

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_size

    def fits(self, row_length: int) -> bool:
        return row_length % self.block_size == 0

    def quantize(self, weights: np.ndarray) -> np.ndarray:
        """(rows, columns) floats → (rows, columns / block_size · block_bytes) bytes, as stored in GGUF."""
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        rows, columns = weights.shape
        if not self.fits(columns):
            raise ValueError(f"{self.name} needs rows that are a multiple of {self.block_size}; got {columns}")
        return self.quantize_blocks(weights.reshape(-1, self.block_size)).reshape(rows, -1)

    def dequantize(self, raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        return self.dequantize_blocks(raw.reshape(-1, self.block_bytes)).reshape(shape)


def _half_step_bound(levels: int, spread: Callable[[np.ndarray], np.ndarray]):
    """Half a quantization step plus fp16 rounding of the scale(s)."""
    def bound(blocks):
        step = spread(blocks) / levels
        return step / 2 + np.abs(blocks).max(axis=1) * 2e-3 + 1e-7
    return bound


def _q2_k_bound(blocks):
    """Half the largest sub-block step, plus what 4-bit sub-block scales (up to 1.75 units d) and
    mins (half a unit dmin) can add, plus fp16 rounding."""
    sub = blocks.reshape(-1, 16, 16)
    low = np.minimum(sub.min(axis=2), 0)
    largest_step = ((sub.max(axis=2) - low) / 3).max(axis=1)
    dmin = (-low).max(axis=1) / 15
    return largest_step / 2 + 1.75 * largest_step / 15 + dmin / 2 + np.abs(blocks).max(axis=1) * 2e-3 + 1e-7


FORMATS: dict[str, BlockFormat] = {
    "Q8_0": BlockFormat("Q8_0", 8, 32, 34, quantize_q8_0, dequantize_q8_0,
                        _half_step_bound(127, lambda b: np.abs(b).max(axis=1))),
    "Q4_0": BlockFormat("Q4_0", 2, 32, 18, quantize_q4_0, dequantize_q4_0,
                        _half_step_bound(8, lambda b: 2 * np.abs(b).max(axis=1))),
    "Q4_1": BlockFormat("Q4_1", 3, 32, 20, quantize_q4_1, dequantize_q4_1,
                        _half_step_bound(15, lambda b: b.max(axis=1) - b.min(axis=1))),
    "Q2_K": BlockFormat("Q2_K", 10, 256, 84, quantize_q2_k, dequantize_q2_k, _q2_k_bound),
}
