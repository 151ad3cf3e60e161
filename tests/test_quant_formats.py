"""Block quantization formats: byte equality with the gguf package's reference quantizer, with llama.cpp's
own K-quant quantizers (recorded bytes), and of the compiled, threaded path with the same kernels run as
plain Python one block at a time; error bounds; decoding by gguf's dequantizer (the layout llama.cpp reads)."""

import hashlib
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as reference
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from small_inputs import awkward_weights

from llmpipe.gguf import formats
from llmpipe.gguf.formats import (
    FORMATS,
    fit_scale_and_min,
    fp16_bits,
    round_half_away_from_zero,
)


def weights(rows: int, columns: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, columns)).astype(np.float32) * 0.05
    values[0, :32] = 0.0                       # an all-zero block
    values[1, 5] = 0.9                         # an outlier
    values[2, :64] = np.linspace(-1, 1, 64)    # values exactly on rounding boundaries
    return values


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
def test_bytes_equal_the_reference_quantizer(name):
    data = weights(24, 512)
    ours = FORMATS[name].quantize(data)
    theirs = reference.quantize(data, GGMLQuantizationType[name])
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", list(FORMATS))
def test_reference_dequantizer_reads_our_bytes_as_we_do(name):
    data = weights(8, 512, seed=3)
    raw = FORMATS[name].quantize(data)
    ours = FORMATS[name].dequantize(raw, data.shape)
    theirs = reference.dequantize(raw, GGMLQuantizationType[name])
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", list(FORMATS))
def test_round_trip_error_stays_within_the_format_bound(name):
    fmt = FORMATS[name]
    data = weights(16, 512, seed=5)
    raw = fmt.quantize(data)
    restored = fmt.dequantize(raw, data.shape)
    blocks, restored_blocks = data.reshape(-1, fmt.block_size), restored.reshape(-1, fmt.block_size)
    error = np.abs(blocks - restored_blocks)
    assert np.all(error <= fmt.error_bound(blocks, raw.reshape(-1, fmt.block_bytes))), name


@contextmanager
def kernels_as_plain_python():
    """The formats module's compiled functions swapped for their Python source, which then runs on numpy
    float32 scalars: a straightforward per-block reference for the compiled (and threaded) path."""
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, value in vars(formats).items():
            if hasattr(value, "py_func"):
                patch.setattr(formats, name, value.py_func)
        yield formats


def plain_python_bytes(name: str, blocks: np.ndarray) -> np.ndarray:
    fmt = FORMATS[name]
    blocks = blocks.reshape(-1, fmt.block_size)
    out = np.zeros((len(blocks), fmt.block_bytes), dtype=np.uint8)
    with kernels_as_plain_python() as plain:
        kernel = getattr(plain, f"quantize_{name.lower()}_rows")
        for b in range(len(blocks)):
            kernel(blocks[b:b + 1], out[b:b + 1])
    return out


@pytest.mark.parametrize("name", list(FORMATS))
def test_compiled_bytes_equal_the_plain_python_kernel_on_awkward_weights(name):
    data = awkward_weights()
    assert np.array_equal(FORMATS[name].quantize(data).reshape(-1, FORMATS[name].block_bytes),
                          plain_python_bytes(name, data))


@st.composite
def awkward_blocks(draw) -> np.ndarray:
    """256 weights: halves from −8 to 8 (zeros, repeats, rounding ties) times a power of ten from float32's
    subnormals to near its largest, maybe all of one sign, maybe with one spike anywhere in float32."""
    halves = draw(arrays(np.int8, 256, elements=st.integers(-16, 16))).astype(np.float32) / 2
    values = halves * np.float32(draw(st.sampled_from([1e-42, 1e-30, 1e-7, 1e-3, 1.0, 7e4, 1e30, 1e37])))
    sign = draw(st.sampled_from([0, 1, -1]))
    if sign:
        values = sign * np.abs(values)
    if draw(st.booleans()):
        largest = float(np.finfo(np.float32).max)
        values[draw(st.integers(0, 255))] = draw(st.floats(-largest, largest, width=32))
    return values


@pytest.mark.parametrize("name", list(FORMATS))
@settings(max_examples=50, deadline=None)
@given(block=awkward_blocks())
def test_compiled_bytes_equal_the_plain_python_kernel_on_generated_blocks(name, block):
    data = np.tile(block, (3, 1))     # three rows: the threaded path splits them into blocks
    assert np.array_equal(FORMATS[name].quantize(data).reshape(-1, FORMATS[name].block_bytes),
                          plain_python_bytes(name, data))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
def test_awkward_bytes_equal_the_reference_quantizer(name):
    data = awkward_weights()
    with np.errstate(all="ignore"):
        assert np.array_equal(FORMATS[name].quantize(data), reference.quantize(data, GGMLQuantizationType[name]))


def test_fp16_rounding_is_numpys():
    edges = np.array([0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14, 65504, 65519.99, 65520, 1e9,
                      1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, np.inf, -np.inf, 6.1e-5, -0.0, -1.5e-7], dtype=np.float32)
    values = np.concatenate([edges, np.random.default_rng(0).standard_normal(200).astype(np.float32) * 1e3])
    with np.errstate(over="ignore"):
        assert [fp16_bits(v) for v in values] == values.astype(np.float16).view(np.uint16).tolist()


def k_quant_golden_input() -> np.ndarray:
    """Weights from integer arithmetic only (the same floats on every machine and numpy version)."""
    index = np.arange(32 * 256, dtype=np.float64)
    uniform = ((index * 2654435761) % 4294967296) / 4294967296 * 2 - 1
    values = (uniform ** 3 * 0.1).reshape(32, 256)
    values[1, :16] = 0.0                  # an all-zero sub-block
    values[2] = -np.abs(values[2])        # a block with no positive weight
    values[3, ::7] = 0.0                  # zeros the |x|-weighted fit ignores
    values[4, 9] = 2.0                    # an outlier
    return values.astype(np.float32)


@pytest.mark.parametrize("name, sha256", [
    ("Q2_K", "487a1cc046c7a0a666046c0fb22ed4793e43fe37c4fc4cf4f3bd830cbf052f5b"),
    ("Q4_K", "a3e043b9cde6d044e03572fee990eff340e77aee0f1ada46d28e434dcbae613c"),
])
def test_k_quant_bytes_equal_llama_cpp(name, sha256):
    # sha256 of what llama.cpp's quantize_row_q2_K_ref / quantize_row_q4_K_ref (libggml-base from
    # llama-cpp-python 0.3.36) wrote for these weights; tests/test_llama_cpp.py compares with the library.
    raw = FORMATS[name].quantize(k_quant_golden_input())
    assert hashlib.sha256(raw.tobytes()).hexdigest() == sha256


@pytest.mark.parametrize("name, sha256", [
    ("Q2_K", "05217121e5e61b033b8f09e083e4ef9018ddc527700bd79785a72493eec9a2df"),
    ("Q4_K", "b64dc807f40753e2b9fe28365b144e0a4c42f28345844eb5cffe95c01ae3a70e"),
])
def test_k_quant_bytes_equal_llama_cpp_on_awkward_weights(name, sha256):
    # sha256 of what llama.cpp's quantize_row_q2_K_ref / quantize_row_q4_K_ref (llama-cpp-python 0.3.36) wrote
    raw = FORMATS[name].quantize(awkward_weights())
    assert hashlib.sha256(raw.tobytes()).hexdigest() == sha256


def test_q2_k_scale_search_never_does_worse_than_min_max():
    sub_blocks = weights(16, 512, seed=7).reshape(-1, 16)
    fit = lambda steps: fit_scale_and_min(sub_blocks, np.abs(sub_blocks), levels=3, rmin=-0.5, rdelta=0.1,  # noqa: E731
                                          steps=steps, absolute_error=True)
    scale, minimum, q = fit(15)
    min_max_scale = (sub_blocks.max(axis=1) - np.minimum(sub_blocks.min(axis=1), 0)) / 3
    _, min_max_min, min_max_q = fit(-1)
    assert np.allclose(min_max_min, np.minimum(sub_blocks.min(axis=1), 0))
    assert q.min() >= 0 and q.max() <= 3
    weighted = lambda s, m, levels: (np.abs(sub_blocks) * np.abs(s[:, None] * levels + m[:, None] - sub_blocks)).sum(1)  # noqa: E731
    searched, plain = weighted(scale, minimum, q), weighted(min_max_scale, min_max_min, min_max_q)
    assert np.all(searched <= plain * (1 + 1e-5) + 1e-9)
    assert searched.sum() < 0.95 * plain.sum()


@pytest.mark.parametrize("name, bits", [("Q8_0", 8.5), ("Q4_0", 4.5), ("Q4_1", 5.0), ("Q4_K", 4.5),
                                        ("Q2_K", 2.625)])
def test_bytes_per_weight(name, bits):
    fmt = FORMATS[name]
    data = weights(4, 1024)
    assert fmt.bits_per_weight == bits
    assert fmt.quantize(data).nbytes * 8 / data.size == bits


def test_rows_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        FORMATS["Q2_K"].quantize(np.zeros((2, 384), dtype=np.float32))


def test_rounding_is_half_away_from_zero():
    values = np.array([0.5, 1.5, -0.5, -2.5, 0.49999997, 2.4999998], dtype=np.float32)
    assert [round_half_away_from_zero(value) for value in values] == [1, 2, -1, -3, 0, 2]


def test_q4_k_beats_q4_0_at_the_same_size():
    data = weights(16, 512, seed=9)
    squared_error = {name: float(((FORMATS[name].dequantize(FORMATS[name].quantize(data), data.shape) - data) ** 2).mean())
                     for name in ("Q4_0", "Q4_K")}
    assert FORMATS["Q4_K"].bits_per_weight == FORMATS["Q4_0"].bits_per_weight
    assert squared_error["Q4_K"] < 0.85 * squared_error["Q4_0"]
