"""Block quantization formats: byte equality with the gguf package's reference quantizer, error bounds,
and decoding by gguf's own dequantizer (the layout llama.cpp reads)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as reference

from llmpipe.quant.formats import FORMATS, round_half_away_from_zero


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
    restored = fmt.dequantize(fmt.quantize(data), data.shape)
    blocks, restored_blocks = data.reshape(-1, fmt.block_size), restored.reshape(-1, fmt.block_size)
    error = np.abs(blocks - restored_blocks).max(axis=1)
    assert np.all(error <= fmt.error_bound(blocks)), name


@pytest.mark.parametrize("name, bits", [("Q8_0", 8.5), ("Q4_0", 4.5), ("Q4_1", 5.0), ("Q2_K", 2.625)])
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
    assert round_half_away_from_zero(values).tolist() == [1, 2, -1, -3, 0, 2]
