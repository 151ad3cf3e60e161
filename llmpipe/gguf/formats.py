"""llama.cpp block quantization formats, written for clarity, vectorized with numpy.

A tensor's rows are cut into blocks; each block stores a few small integers per weight plus the fp16
scale(s) that map them back to floats. Bytes are laid out exactly as llama.cpp's `block_*` structs, so
GGUF files written with them load in llama.cpp.

| format | block | bytes | bits/weight | a weight is                                   |
|--------|------:|------:|------------:|-----------------------------------------------|
| Q8_0   |    32 |    34 |         8.5 | d · q,  q int8,  d = max|x| / 127             |
| Q4_0   |    32 |    18 |         4.5 | d · (q − 8),  q in 0..15,  d = x_maxabs / −8  |
| Q4_1   |    32 |    20 |         5.0 | d · q + m,  q in 0..15,  d = (max−min)/15, m = min |
| Q4_K   |   256 |   144 |         4.5 | d·sc · q − dmin·mn,  q in 0..15, per 32 weights 6-bit sc and mn |
| Q2_K   |   256 |    84 |       2.625 | d·sc · q − dmin·mn,  q in 0..3, per 16 weights 4-bit sc and mn |

All five follow llama.cpp's reference quantizers (`quantize_row_*_ref`) bit for bit: the tests compare
Q8_0, Q4_0 and Q4_1 with the `gguf` package's port, and the K-quants with bytes recorded from
llama.cpp's own library (and with the library itself when llama-cpp-python is installed). The
K-quants fit each sub-block's scale and minimum with llama.cpp's weighted search
(`fit_scale_and_min`), not just min/max; on Gaussian weights Q4_K's squared error is about 30% below
Q4_0's at the same 4.5 bits, and Q2_K's a fifth below a plain min/max fit.
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


# -- K-quants: shared pieces ------------------------------------------------------------------------
# A K-quant block holds 256 weights in sub-blocks (16 of 16 weights in Q2_K, 8 of 32 in Q4_K). Each
# sub-block has its own grid, lowest value −dmin·mn and step d·sc, where sc and mn are small integers
# (4 bits in Q2_K, 6 in Q4_K) and d, dmin are the block's fp16 units.
def _running_sum(values: np.ndarray) -> np.ndarray:
    """Sum over the last axis one term at a time in float32, as llama.cpp's C loops do (numpy would
    sum pairwise and round differently)."""
    total = values[..., 0].copy()
    for i in range(1, values.shape[-1]):
        total += values[..., i]
    return total


def fit_scale_and_min(x: np.ndarray, weights: np.ndarray, levels: int, rmin: float, rdelta: float, steps: int,
                      absolute_error: bool):
    """llama.cpp's `make_qkx2_quants` for every group on the last axis of `x` at once.

    Finds `scale` and `minimum` (≤ 0) so that x ≈ scale · q + minimum with q in 0..levels, minimizing
    the weighted absolute (or squared) error: start from the min/max fit, then try `steps + 1` slightly
    different grids, fit scale and minimum to each by weighted least squares, and keep a fit only if it
    lowers the error. As in llama.cpp, each try builds its grid from the best minimum found so far.
    Returns (scale, minimum, q) in float32.
    """
    f32 = np.float32
    high = x.max(axis=-1)
    minimum = np.minimum(x.min(axis=-1), 0)
    flat = high == minimum                       # nothing to fit: scale 0, q 0
    sum_w, sum_x = _running_sum(weights), _running_sum(weights * x)

    def grid_levels(inverse_scale, minimum):
        return np.clip(np.rint(inverse_scale[..., None] * (x - minimum[..., None])), 0, levels).astype(f32)

    def weighted_error(scale, minimum, q):
        difference = scale[..., None] * q + minimum[..., None] - x
        return _running_sum(weights * (np.abs(difference) if absolute_error else difference * difference))

    inverse = f32(levels) / np.where(flat, f32(1), high - minimum)
    scale = f32(1) / inverse
    q = grid_levels(inverse, minimum)
    best_error = weighted_error(scale, minimum, q)
    for step in range(steps + 1):
        inverse = (f32(rmin) + f32(rdelta) * f32(step) + f32(levels)) / np.where(flat, f32(1), high - minimum)
        candidate = grid_levels(inverse, minimum)
        sum_l = _running_sum(weights * candidate)
        sum_l2 = _running_sum(weights * candidate * candidate)
        sum_xl = _running_sum(weights * candidate * x)
        determinant = sum_w * sum_l2 - sum_l * sum_l
        solvable = determinant > 0
        determinant = np.where(solvable, determinant, f32(1))
        fit_scale = (sum_w * sum_xl - sum_x * sum_l) / determinant
        fit_min = (sum_l2 * sum_x - sum_l * sum_xl) / determinant
        above_zero = fit_min > 0                 # the formats store −minimum ≥ 0: refit the scale alone
        fit_scale = np.where(above_zero, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), fit_scale)
        fit_min = np.where(above_zero, f32(0), fit_min)
        error = weighted_error(fit_scale, fit_min, candidate)
        better = solvable & (error < best_error)
        best_error = np.where(better, error, best_error)
        scale, minimum = np.where(better, fit_scale, scale), np.where(better, fit_min, minimum)
        q = np.where(better[..., None], candidate, q)
    scale = np.where(flat, f32(0), scale)
    q = np.where(flat[..., None], f32(0), q)
    return scale.astype(f32), minimum.astype(f32), q


def _to_unit_multiples(values: np.ndarray, largest_multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block: non-negative values (n, sub-blocks) → integers 0..largest_multiple and their fp32
    unit (largest value / largest_multiple)."""
    largest = np.maximum(values.max(axis=1), 0)
    present = largest > 0
    inverse = np.float32(largest_multiple) / np.where(present, largest, np.float32(1))
    q = np.where(present[:, None], np.minimum(np.rint(inverse[:, None] * values), largest_multiple), 0)
    return q.astype(np.uint8), np.where(present, largest / np.float32(largest_multiple), np.float32(0)).astype(np.float32)


def _quantize_sub_blocks(sub: np.ndarray, fitted: tuple[np.ndarray, np.ndarray, np.ndarray], levels: int,
                         largest_multiple: int):
    """The second half of every K-quant quantizer: store each sub-block's fitted scale and −minimum as
    multiples (0..largest_multiple) of the block's units d and dmin, then round each weight to the
    nearest level of its sub-block's stored grid (units rounded to fp16, as the file holds them). A
    sub-block whose step rounds to 0 keeps the fit's levels, as llama.cpp does.
    Returns (scale multiples, min multiples, d, dmin, q as (n, 256) uint8)."""
    scale, minimum, fitted_q = fitted
    scale_q, d = _to_unit_multiples(scale, largest_multiple)
    min_q, dmin = _to_unit_multiples(-minimum, largest_multiple)
    step = (d.astype(np.float16).astype(np.float32)[:, None] * scale_q)[:, :, None]
    offset = (dmin.astype(np.float16).astype(np.float32)[:, None] * min_q)[:, :, None]
    q = np.clip(np.rint((sub + offset) / np.where(step == 0, np.float32(1), step)), 0, levels)
    q = np.where(step == 0, fitted_q, q).astype(np.uint8).reshape(-1, SUPER_BLOCK)
    return scale_q, min_q, d, dmin, q


def _grid_bound(sub_size: int, levels: int, decode_grids: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]):
    """A weight inside its sub-block's stored grid is within half a step of a level; one outside it
    (the fit may give up on a weight of small weight in its error) is as far as the grid's nearer end."""
    def bound(blocks, raw):
        step, lowest = (a[:, :, None] for a in decode_grids(raw))
        sub = blocks.reshape(len(raw), -1, sub_size)
        outside = np.maximum(lowest - sub, 0) + np.maximum(sub - (lowest + levels * step), 0)
        return (step / 2 + outside + np.abs(sub) * 1e-6 + 1e-7).reshape(blocks.shape)
    return bound


# -- Q2_K -------------------------------------------------------------------------------------------
# block_q2_K: scales[16] (low nibble: sc, high nibble: mn, of each 16-weight sub-block),
# qs[64] (2-bit values), d, dmin (fp16).
# Weight i of a 128-weight half sits in byte (i mod 32) of that half's 32 bytes, at bit 2·(i div 32).
def _q2_k_order(q: np.ndarray) -> np.ndarray:
    """(n, 256) values 0..3 → (n, 64) bytes in llama.cpp's order."""
    halves = q.reshape(-1, 2, 4, 32)  # half, bit position, byte
    packed = halves[:, :, 0] | (halves[:, :, 1] << 2) | (halves[:, :, 2] << 4) | (halves[:, :, 3] << 6)
    return packed.reshape(-1, 64).astype(np.uint8)


def quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """llama.cpp's quantize_row_q2_K_ref: fit each 16-weight sub-block (errors weighted by |x|), store
    sc and mn as 4-bit multiples of d and dmin, then round every weight to its sub-block's grid."""
    sub = blocks.reshape(-1, 16, 16)
    fitted = fit_scale_and_min(sub, np.abs(sub), levels=3, rmin=-0.5, rdelta=0.1, steps=15, absolute_error=True)
    scale_q, min_q, d, dmin, q = _quantize_sub_blocks(sub, fitted, levels=3, largest_multiple=15)
    scales = (scale_q | (min_q << 4)).astype(np.uint8)
    return np.concatenate([scales, _q2_k_order(q), _fp16_bytes(d[:, None]), _fp16_bytes(dmin[:, None])], axis=1)


def _q2_k_grids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(step, lowest value) of each 16-weight sub-block, (n, 16) each."""
    scales = raw[:, :16]
    d, dmin = _fp16_from(raw[:, 80:82]), _fp16_from(raw[:, 82:84])
    return d * (scales & 0x0F).astype(np.float32), -(dmin * (scales >> 4).astype(np.float32))


def dequantize_q2_k(raw: np.ndarray) -> np.ndarray:
    step, lowest = _q2_k_grids(raw)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    q = (raw[:, 16:80].reshape(-1, 2, 1, 32) >> shifts) & np.uint8(3)   # half, bit position, byte
    q = q.reshape(-1, 16, 16).astype(np.float32)
    return (q * step[:, :, None] + lowest[:, :, None]).reshape(-1, SUPER_BLOCK)


# -- Q4_K -------------------------------------------------------------------------------------------
# block_q4_K: d, dmin (fp16), scales[12] (6-bit sc and mn of 8 sub-blocks of 32, packed: bytes 0-3
# hold sc 0-3, bytes 4-7 mn 0-3, bytes 8-11 the low 4 bits of sc and mn 4-7, whose top 2 bits sit in
# the top bits of bytes 0-7), qs[128]: each 64 weights take 32 bytes, low nibbles then high nibbles.
def _pack_6_bit_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    return np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
                           mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                           (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=1).astype(np.uint8)


def _unpack_6_bit_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low_sc, low_mn, rest = packed[:, :4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([low_sc & 63, (rest & 0x0F) | ((low_sc >> 6) << 4)], axis=1)
    mn = np.concatenate([low_mn & 63, (rest >> 4) | ((low_mn >> 6) << 4)], axis=1)
    return sc, mn


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """llama.cpp's quantize_row_q4_K_ref: fit each 32-weight sub-block (squared errors weighted by
    rms + |x|), store sc and mn as 6-bit multiples of d and dmin, then round every weight to its grid."""
    sub = blocks.reshape(-1, 8, 32)
    rms = np.sqrt(_running_sum(sub * sub) / np.float32(32))
    fitted = fit_scale_and_min(sub, rms[..., None] + np.abs(sub), levels=15, rmin=-1.0, rdelta=0.1, steps=20,
                               absolute_error=False)
    scale_q, min_q, d, dmin, q = _quantize_sub_blocks(sub, fitted, levels=15, largest_multiple=63)
    q = q.reshape(-1, 4, 2, 32)
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d[:, None]), _fp16_bytes(dmin[:, None]),
                           _pack_6_bit_scales(scale_q, min_q), packed], axis=1)


def _q4_k_grids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(step, lowest value) of each 32-weight sub-block, (n, 8) each."""
    d, dmin = _fp16_from(raw[:, 0:2]), _fp16_from(raw[:, 2:4])
    sc, mn = _unpack_6_bit_scales(raw[:, 4:16])
    return d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))


def dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    step, lowest = _q4_k_grids(raw)
    packed = raw[:, 16:].reshape(-1, 4, 1, 32)
    q = np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=2).reshape(-1, 8, 32)
    return (q.astype(np.float32) * step[:, :, None] + lowest[:, :, None]).reshape(-1, SUPER_BLOCK)


@dataclass(frozen=True)
class BlockFormat:
    name: str
    ggml_type: int                                    # gguf.GGMLQuantizationType value
    block_size: int                                   # weights per block
    block_bytes: int                                  # bytes per block
    quantize_blocks: Callable[[np.ndarray], np.ndarray]
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]
    # (blocks, their bytes) → per weight: the largest |x − dequantize(quantize(x))| the format allows
    error_bound: Callable[[np.ndarray, np.ndarray], np.ndarray]

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
    """Half a quantization step plus fp16 rounding of the scale(s), for every weight of a block."""
    def bound(blocks, raw):
        step = spread(blocks) / levels
        return np.broadcast_to((step / 2 + np.abs(blocks).max(axis=1) * 2e-3 + 1e-7)[:, None], blocks.shape)
    return bound


FORMATS: dict[str, BlockFormat] = {
    "Q8_0": BlockFormat("Q8_0", 8, 32, 34, quantize_q8_0, dequantize_q8_0,
                        _half_step_bound(127, lambda b: np.abs(b).max(axis=1))),
    "Q4_0": BlockFormat("Q4_0", 2, 32, 18, quantize_q4_0, dequantize_q4_0,
                        _half_step_bound(8, lambda b: 2 * np.abs(b).max(axis=1))),
    "Q4_1": BlockFormat("Q4_1", 3, 32, 20, quantize_q4_1, dequantize_q4_1,
                        _half_step_bound(15, lambda b: b.max(axis=1) - b.min(axis=1))),
    "Q4_K": BlockFormat("Q4_K", 12, 256, 144, quantize_q4_k, dequantize_q4_k, _grid_bound(32, 15, _q4_k_grids)),
    "Q2_K": BlockFormat("Q2_K", 10, 256, 84, quantize_q2_k, dequantize_q2_k, _grid_bound(16, 3, _q2_k_grids)),
}
