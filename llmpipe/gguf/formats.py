"""llama.cpp block quantization formats, byte for byte, compiled with numba and run on every core.

Rows are cut into blocks of small integers plus fp16 scale(s), laid out as llama.cpp's `block_*` structs.
Quantizers follow llama.cpp's `quantize_row_*_ref` in float32, operation by operation; dequantizers are gguf's.

| format | block | bytes | bits/weight | a weight is                                                   |
|--------|------:|------:|------------:|---------------------------------------------------------------|
| Q8_0   |    32 |    34 |         8.5 | d · q,  q int8,  d = max|x| / 127                             |
| Q4_0   |    32 |    18 |         4.5 | d · (q − 8),  q in 0..15,  d = x_maxabs / −8                  |
| Q4_1   |    32 |    20 |         5.0 | d · q + m,  q in 0..15,  d = (max−min)/15, m = min            |
| Q4_K   |   256 |   144 |         4.5 | d·sc · q − dmin·mn,  q in 0..15, per 32 weights 6-bit sc, mn  |
| Q2_K   |   256 |    84 |       2.625 | d·sc · q − dmin·mn,  q in 0..3, per 16 weights 4-bit sc, mn   |
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import llvmlite.ir
import numba
import numba.extending
import numpy as np
from gguf import GGMLQuantizationType, quants

SUPER_BLOCK = 256  # K-quants
f32 = np.float32
FLT_MAX = f32(3.4028235e38)
# A compiled function (C's speed), cached on disk after the first call, that releases the GIL so that
# threads can run it on several chunks of a tensor at once.
compiled = numba.njit(cache=True, nogil=True, error_model="numpy")
inlined = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")


# -- ggml's scalar helpers ------------------------------------------------------------------------------
def float32_bits(value: np.float32) -> int:
    """The IEEE bits of a float32, as a signed int32 (C's memcpy from float to int)."""
    return int(np.float32(value).view(np.int32))


@numba.extending.intrinsic
def _bitcast_float32(typing_context, value):
    return numba.types.int32(numba.types.float32), lambda context, builder, signature, args: builder.bitcast(
        args[0], llvmlite.ir.IntType(32))


@numba.extending.overload(float32_bits, jit_options={"cache": True})
def _compiled_float32_bits(value):
    return lambda value: _bitcast_float32(value)


@inlined
def nearest_int(value: np.float32) -> int:
    """ggml's nearest_int: add 1.5 · 2^23 in float32 (rounding half to even) and read the sum's low 23
    bits (beyond ±2^22, as in C, they no longer hold the rounded value)."""
    return (float32_bits(value + f32(12582912.0)) & 0x007FFFFF) - 0x00400000


@compiled
def round_half_away_from_zero(value: np.float32) -> np.float32:
    """C's roundf, in float64 (where |x| + 0.5 is not rounded up to the next integer as in float32)."""
    return f32(math.copysign(np.floor(abs(float(value)) + 0.5), value))


@compiled
def to_int8(value: np.float32) -> int:
    """C's (int8_t) of a float on x86: truncate to int32 (NaN and values beyond ±2^31 give −2^31), keep
    the low byte."""
    if not -2147483648.0 <= value < 2147483648.0:
        return 0
    low_byte = int(value) & 0xFF
    return low_byte - 256 if low_byte > 127 else low_byte


@compiled
def fp16_bits(value: np.float32) -> int:
    """float32 → IEEE half, rounded to nearest even (what F16C's vcvtps2ph and numpy do)."""
    sign = 0x8000 if math.copysign(1.0, value) < 0 else 0
    magnitude = abs(float(value))
    if magnitude != magnitude:
        return sign | 0x7E00
    if magnitude >= 65520.0:
        return sign | 0x7C00
    if magnitude < 2.0 ** -14:                                   # subnormal: multiples of 2^-24
        return sign | int(np.rint(magnitude * 2.0 ** 24))
    fraction, exponent = math.frexp(magnitude)                   # fraction in [0.5, 1)
    return sign | (((exponent + 14) << 10) + int(np.rint(fraction * 2048.0)) - 1024)


@compiled
def fp16_value(bits: int) -> np.float32:
    exponent, fraction = (bits >> 10) & 0x1F, bits & 0x3FF
    if exponent == 0x1F:
        magnitude = math.inf if fraction == 0 else math.nan
    elif exponent == 0:
        magnitude = math.ldexp(float(fraction), -24)
    else:
        magnitude = math.ldexp(float(1024 + fraction), exponent - 25)
    return f32(-magnitude if bits & 0x8000 else magnitude)


@compiled
def store_fp16(out: np.ndarray, at: int, value: np.float32) -> np.float32:
    """Write `value` as little-endian fp16 at out[at:at+2]; returns the float32 the file now holds."""
    bits = fp16_bits(value)
    out[at], out[at + 1] = bits & 0xFF, bits >> 8
    return fp16_value(bits)


# -- Q8_0, Q4_0, Q4_1 (quantize_row_q8_0_ref, _q4_0_ref, _q4_1_ref) ---------------------------------------
@compiled
def quantize_q8_0_rows(blocks: np.ndarray, out: np.ndarray) -> None:
    for b in range(len(blocks)):
        x, y = blocks[b], out[b]
        largest = f32(0)
        for v in x:
            largest = max(largest, abs(v))
        d = largest / f32(127)
        inverse = f32(1) / d if d != 0 else f32(0)
        store_fp16(y, 0, d)
        for j in range(32):
            y[2 + j] = to_int8(round_half_away_from_zero(x[j] * inverse)) & 0xFF


@compiled
def pack_nibbles(x: np.ndarray, lowest: np.float32, inverse: np.float32, offset: np.float32,
                 out: np.ndarray) -> None:
    """q = min(15, (int8_t)((x − lowest) · inverse + offset)); byte j holds q_j (low nibble), q_{j+16}
    (high), OR-ed as C does (a negative q would set all 8 bits)."""
    for j in range(16):
        low = min(15, to_int8((x[j] - lowest) * inverse + offset))
        high = min(15, to_int8((x[j + 16] - lowest) * inverse + offset))
        out[j] = ((low & 0xFF) | ((high & 0xFF) << 4)) & 0xFF


@compiled
def quantize_q4_0_rows(blocks: np.ndarray, out: np.ndarray) -> None:
    # The scale is signed: the weight of largest magnitude maps exactly to q = 0 (value −8 · d).
    for b in range(len(blocks)):
        x, y = blocks[b], out[b]
        largest, extreme = f32(0), f32(0)
        for v in x:
            if largest < abs(v):
                largest, extreme = abs(v), v
        d = extreme / f32(-8)
        inverse = f32(1) / d if d != 0 else f32(0)
        store_fp16(y, 0, d)
        pack_nibbles(x, f32(0), inverse, f32(8.5), y[2:])


@compiled
def quantize_q4_1_rows(blocks: np.ndarray, out: np.ndarray) -> None:
    for b in range(len(blocks)):
        x, y = blocks[b], out[b]
        low, high = FLT_MAX, -FLT_MAX
        for v in x:
            if v < low:
                low = v
            if v > high:
                high = v
        d = (high - low) / f32(15)
        inverse = f32(1) / d if d != 0 else f32(0)
        store_fp16(y, 0, d)
        store_fp16(y, 2, low)
        pack_nibbles(x, low, inverse, f32(0.5), y[4:])


# -- K-quants: shared pieces ------------------------------------------------------------------------------
# A K-quant block holds 256 weights in sub-blocks (16 of 16 weights in Q2_K, 8 of 32 in Q4_K). Each
# sub-block has its own grid, lowest value −dmin·mn and step d·sc, where sc and mn are small integers
# (4 bits in Q2_K, 6 in Q4_K) and d, dmin are the block's fp16 units.
@inlined
def weighted_error(x, weights, scale, minimum, q, absolute_error):
    """Σ w · |scale·q + minimum − x| (or its square), summed in order in float32 as C does."""
    total = f32(0)
    for i in range(len(x)):
        difference = scale * f32(q[i]) + minimum - x[i]
        total += weights[i] * (abs(difference) if absolute_error else difference * difference)
    return total


@inlined
def fit_group(x, weights, levels, rmin, rdelta, steps, absolute_error, q, candidate):
    """llama.cpp's make_qkx2_quants for one group: finds `scale` and `minimum` (≤ 0) with x ≈ scale · q +
    minimum, q in 0..levels, minimizing the weighted absolute (or squared) error: start from the min/max fit,
    then try `steps + 1` slightly different grids, fit scale and minimum to each by weighted least squares,
    and keep a fit only if it lowers the error. Each try builds its grid from the best minimum so far.
    Writes q (uint8); `candidate` is scratch of the same size. Returns (scale, minimum)."""
    low, high, sum_w, sum_x = x[0], x[0], weights[0], weights[0] * x[0]
    for i in range(1, len(x)):
        low, high = min(low, x[i]), max(high, x[i])
        sum_w += weights[i]
        sum_x += weights[i] * x[i]
    if low > 0:
        low = f32(0)
    if high == low:                                  # nothing to fit: scale 0, q 0
        q[:] = 0
        return f32(0), low
    inverse = f32(levels) / (high - low)
    scale = f32(1) / inverse
    for i in range(len(x)):
        q[i] = max(0, min(levels, nearest_int(inverse * (x[i] - low))))
    best_error = weighted_error(x, weights, scale, low, q, absolute_error)
    for step in range(steps + 1):
        inverse = (f32(rmin) + f32(rdelta) * f32(step) + f32(levels)) / (high - low)
        sum_l, sum_l2, sum_xl = f32(0), f32(0), f32(0)
        for i in range(len(x)):
            level = max(0, min(levels, nearest_int(inverse * (x[i] - low))))
            candidate[i] = level
            weighted_level = weights[i] * f32(level)
            sum_l += weighted_level
            sum_l2 += weighted_level * f32(level)
            sum_xl += weighted_level * x[i]
        determinant = sum_w * sum_l2 - sum_l * sum_l
        if determinant > 0:
            fit_scale = (sum_w * sum_xl - sum_x * sum_l) / determinant
            fit_min = (sum_l2 * sum_x - sum_l * sum_xl) / determinant
            if fit_min > 0:                          # the formats store −minimum ≥ 0: refit the scale alone
                fit_min, fit_scale = f32(0), sum_xl / sum_l2
            error = weighted_error(x, weights, fit_scale, fit_min, candidate, absolute_error)
            if error < best_error:
                for i in range(len(x)):
                    q[i] = candidate[i]
                best_error, scale, low = error, fit_scale, fit_min
    return scale, low


@compiled
def fit_groups(x, weights, levels, rmin, rdelta, steps, absolute_error):
    scale, minimum = np.empty(len(x), np.float32), np.empty(len(x), np.float32)
    q, candidate = np.empty(x.shape, np.uint8), np.empty(x.shape[1], np.uint8)
    for g in range(len(x)):
        scale[g], minimum[g] = fit_group(x[g], weights[g], levels, rmin, rdelta, steps, absolute_error, q[g],
                                         candidate)
    return scale, minimum, q


def fit_scale_and_min(x: np.ndarray, weights: np.ndarray, levels: int, rmin: float, rdelta: float, steps: int,
                      absolute_error: bool):
    """`fit_group` for every group on the last axis of `x`: returns (scale, minimum, q) in float32."""
    groups = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    scale, minimum, q = fit_groups(groups, np.ascontiguousarray(weights, np.float32).reshape(groups.shape),
                                   levels, rmin, rdelta, steps, absolute_error)
    return scale.reshape(x.shape[:-1]), minimum.reshape(x.shape[:-1]), q.astype(np.float32).reshape(x.shape)


@compiled
def fit_sub_blocks(x, size, q, candidate, weights, scales, mins, q4_k):
    """Fit every sub-block of a 256-weight block: Q4_K weighs squared errors by rms + |x|, Q2_K absolute
    errors by |x|. Writes scales and mins (−minimum); returns their largest values (at least 0)."""
    largest_scale, largest_min = f32(0), f32(0)
    for j in range(len(scales)):
        sub = x[j * size:(j + 1) * size]
        if q4_k:
            sum_x2 = f32(0)
            for v in sub:
                sum_x2 += v * v
            rms = np.sqrt(sum_x2 / f32(size))
            for i in range(size):
                weights[i] = rms + abs(sub[i])
            scales[j], minimum = fit_group(sub, weights, 15, -1.0, 0.1, 20, False, q[j * size:(j + 1) * size],
                                           candidate)
        else:
            for i in range(size):
                weights[i] = abs(sub[i])
            scales[j], minimum = fit_group(sub, weights, 3, -0.5, 0.1, 15, True, q[j * size:(j + 1) * size],
                                           candidate)
        mins[j] = -minimum
        if scales[j] > largest_scale:
            largest_scale = scales[j]
        if mins[j] > largest_min:
            largest_min = mins[j]
    return largest_scale, largest_min


@inlined
def round_to_grid(sub, step, offset, levels, q):
    """Each weight to the nearest level of its sub-block's stored grid (step d·sc, lowest −dmin·mn). A
    sub-block whose step is 0 keeps the fit's levels, as llama.cpp does."""
    if step == 0:
        return
    for i in range(len(sub)):
        q[i] = max(0, min(levels, nearest_int((sub[i] + offset) / step)))


# -- Q4_K -------------------------------------------------------------------------------------------------
# block_q4_K: d, dmin (fp16), scales[12] (6-bit sc and mn of 8 sub-blocks of 32, packed: bytes 0-3
# hold sc 0-3, bytes 4-7 mn 0-3, bytes 8-11 the low 4 bits of sc and mn 4-7, whose top 2 bits sit in
# the top bits of bytes 0-7), qs[128]: each 64 weights take 32 bytes, low nibbles then high nibbles.
@compiled
def store_q4_k_scales(scales, mins, inverse_scale, inverse_min, packed):
    for j in range(8):
        sc = min(63, nearest_int(inverse_scale * scales[j]) & 0xFF)    # C stores an int in a uint8_t
        mn = min(63, nearest_int(inverse_min * mins[j]) & 0xFF)
        if j < 4:
            packed[j], packed[j + 4] = sc, mn
        else:
            packed[j + 4] = (sc & 0x0F) | ((mn & 0x0F) << 4)
            packed[j - 4] |= (sc >> 4) << 6
            packed[j] |= (mn >> 4) << 6


@compiled
def q4_k_scale_and_min(packed, j):
    """ggml's get_scale_min_k4: sub-block j's 6-bit sc and mn."""
    if j < 4:
        return packed[j] & 63, packed[j + 4] & 63
    return (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4)


@compiled
def quantize_q4_k_rows(blocks: np.ndarray, out: np.ndarray) -> None:
    """llama.cpp's quantize_row_q4_K_ref: fit each 32-weight sub-block, store sc and mn as 6-bit multiples
    of d and dmin, then round every weight to its stored grid."""
    q, candidate, weights = np.empty(SUPER_BLOCK, np.uint8), np.empty(32, np.uint8), np.empty(32, np.float32)
    scales, mins = np.empty(8, np.float32), np.empty(8, np.float32)
    for b in range(len(blocks)):
        x, y = blocks[b], out[b]
        largest_scale, largest_min = fit_sub_blocks(x, 32, q, candidate, weights, scales, mins, True)
        store_q4_k_scales(scales, mins, f32(63) / largest_scale if largest_scale > 0 else f32(0),
                          f32(63) / largest_min if largest_min > 0 else f32(0), y[4:16])
        d, dmin = store_fp16(y, 0, largest_scale / f32(63)), store_fp16(y, 2, largest_min / f32(63))
        for j in range(8):
            sc, mn = q4_k_scale_and_min(y[4:16], j)
            round_to_grid(x[32 * j:32 * j + 32], d * f32(sc), dmin * f32(mn), 15, q[32 * j:32 * j + 32])
        for j in range(128):
            y[16 + j] = q[j % 32 + 64 * (j // 32)] | (q[j % 32 + 64 * (j // 32) + 32] << 4)


# -- Q2_K -------------------------------------------------------------------------------------------------
# block_q2_K: scales[16] (low nibble: sc, high nibble: mn, of each 16-weight sub-block),
# qs[64] (2-bit values), d, dmin (fp16).
# Weight i of a 128-weight half sits in byte (i mod 32) of that half's 32 bytes, at bit 2·(i div 32).
@compiled
def quantize_q2_k_rows(blocks: np.ndarray, out: np.ndarray) -> None:
    """llama.cpp's quantize_row_q2_K_ref: fit each 16-weight sub-block, store sc and mn as 4-bit multiples
    of d and dmin (no clamp to 15, as in C), then round every weight to its stored grid."""
    q, candidate, weights = np.empty(SUPER_BLOCK, np.uint8), np.empty(16, np.uint8), np.empty(16, np.float32)
    scales, mins = np.empty(16, np.float32), np.empty(16, np.float32)
    for b in range(len(blocks)):
        x, y = blocks[b], out[b]
        largest_scale, largest_min = fit_sub_blocks(x, 16, q, candidate, weights, scales, mins, False)
        inverse_scale = f32(15) / largest_scale if largest_scale > 0 else f32(0)
        inverse_min = f32(15) / largest_min if largest_min > 0 else f32(0)
        for j in range(16):
            y[j] = (nearest_int(inverse_scale * scales[j]) | (nearest_int(inverse_min * mins[j]) << 4)) & 0xFF
        d, dmin = store_fp16(y, 80, largest_scale / f32(15)), store_fp16(y, 82, largest_min / f32(15))
        for j in range(16):
            round_to_grid(x[16 * j:16 * j + 16], d * f32(y[j] & 0x0F), dmin * f32(y[j] >> 4), 3,
                          q[16 * j:16 * j + 16])
        for j in range(64):
            half = 128 * (j // 32) + j % 32
            y[16 + j] = q[half] | (q[half + 32] << 2) | (q[half + 64] << 4) | (q[half + 96] << 6)


# -- whole tensors ----------------------------------------------------------------------------------------
CHUNK_WEIGHTS = 1 << 18   # weights per task: enough tasks to keep every core busy, each long enough to cost nothing


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def in_parallel(rows_kernel: Callable[[np.ndarray, np.ndarray], None], block_bytes: int):
    """(n, block_size) float32 blocks → (n, block_bytes) uint8, chunks of blocks spread over every core.
    The kernel reads each chunk where it lies and writes its bytes into the output: nothing is copied."""
    def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
        blocks = np.ascontiguousarray(blocks, dtype=np.float32).view()
        blocks.flags.writeable = False       # as a memory-mapped file's: one compiled kernel serves both
        out = np.empty((len(blocks), block_bytes), dtype=np.uint8)
        chunk = max(1, CHUNK_WEIGHTS // blocks.shape[1])
        starts = range(0, len(blocks), chunk)
        run = lambda start: rows_kernel(blocks[start:start + chunk], out[start:start + chunk])  # noqa: E731
        workers = min(usable_cores(), len(starts))
        if workers <= 1:
            for start in starts:
                run(start)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, starts))
        return out
    return quantize_blocks


def gguf_dequantizer(name: str) -> Callable[[np.ndarray], np.ndarray]:
    return lambda raw: quants.dequantize(raw, GGMLQuantizationType[name])


def _q2_k_grids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(step, lowest value) of each 16-weight sub-block of Q2_K blocks, (n, 16) each."""
    scales = raw[:, :16]
    d, dmin = (np.ascontiguousarray(raw[:, at:at + 2]).view(np.float16).astype(np.float32) for at in (80, 82))
    return d * (scales & 0x0F).astype(np.float32), -(dmin * (scales >> 4).astype(np.float32))


def _q4_k_grids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(step, lowest value) of each 32-weight sub-block of Q4_K blocks, (n, 8) each."""
    d, dmin = (np.ascontiguousarray(raw[:, at:at + 2]).view(np.float16).astype(np.float32) for at in (0, 2))
    sc, mn = quants.Q4_K.get_scale_min(np.ascontiguousarray(raw[:, 4:16]))
    return d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))


def _grid_bound(sub_size: int, levels: int, decode_grids: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]):
    """A weight inside its sub-block's stored grid is within half a step of a level; one outside it
    (the fit may give up on a weight of small weight in its error) is as far as the grid's nearer end."""
    def bound(blocks, raw):
        step, lowest = (a[:, :, None] for a in decode_grids(raw))
        sub = blocks.reshape(len(raw), -1, sub_size)
        outside = np.maximum(lowest - sub, 0) + np.maximum(sub - (lowest + levels * step), 0)
        return (step / 2 + outside + np.abs(sub) * 1e-6 + 1e-7).reshape(blocks.shape)
    return bound


def _half_step_bound(levels: int, spread: Callable[[np.ndarray], np.ndarray]):
    """Half a quantization step plus fp16 rounding of the scale(s), for every weight of a block."""
    def bound(blocks, raw):
        step = spread(blocks) / levels
        return np.broadcast_to((step / 2 + np.abs(blocks).max(axis=1) * 2e-3 + 1e-7)[:, None], blocks.shape)
    return bound


@dataclass(frozen=True)
class BlockFormat:
    name: str
    ggml_type: int                                    # gguf.GGMLQuantizationType value
    block_size: int                                   # weights per block
    block_bytes: int                                  # bytes per block
    quantize_blocks: Callable[[np.ndarray], np.ndarray]     # (n, block_size) floats → (n, block_bytes) bytes
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]   # (rows, k · block_bytes) → (rows, k · block_size)
    # (blocks, their bytes) → per weight: the largest |x − dequantize(quantize(x))| the format allows
    error_bound: Callable[[np.ndarray, np.ndarray], np.ndarray]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_size

    def fits(self, row_length: int) -> bool:
        return row_length % self.block_size == 0

    def quantize(self, weights: np.ndarray) -> np.ndarray:
        """(rows, columns) floats → (rows, columns / block_size · block_bytes) bytes, as stored in GGUF."""
        rows, columns = weights.shape
        if not self.fits(columns):
            raise ValueError(f"{self.name} needs rows that are a multiple of {self.block_size}; got {columns}")
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        return self.quantize_blocks(weights.reshape(-1, self.block_size)).reshape(rows, -1)

    def dequantize(self, raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        # whole rows: gguf's dequantizers work 16 rows at a time, so a row of one block would be slow
        return self.dequantize_blocks(raw.reshape(shape[0], -1)).reshape(shape)


def block_format(name: str, block_size: int, block_bytes: int, rows_kernel, error_bound) -> BlockFormat:
    return BlockFormat(name, int(GGMLQuantizationType[name]), block_size, block_bytes,
                       in_parallel(rows_kernel, block_bytes), gguf_dequantizer(name), error_bound)


FORMATS: dict[str, BlockFormat] = {
    "Q8_0": block_format("Q8_0", 32, 34, quantize_q8_0_rows, _half_step_bound(127, lambda b: np.abs(b).max(axis=1))),
    "Q4_0": block_format("Q4_0", 32, 18, quantize_q4_0_rows,
                         _half_step_bound(8, lambda b: 2 * np.abs(b).max(axis=1))),
    "Q4_1": block_format("Q4_1", 32, 20, quantize_q4_1_rows,
                         _half_step_bound(15, lambda b: b.max(axis=1) - b.min(axis=1))),
    "Q4_K": block_format("Q4_K", 256, 144, quantize_q4_k_rows, _grid_bound(32, 15, _q4_k_grids)),
    "Q2_K": block_format("Q2_K", 256, 84, quantize_q2_k_rows, _grid_bound(16, 3, _q2_k_grids)),
}
