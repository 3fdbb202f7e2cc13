"""Dequantisation: bit-exact against a scalar port of ggml's C loops, against gguf-py, and on hand-made blocks."""

import gguf.quants
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf_helpers.reference_dequant import BLOCKS, random_blocks, reference_dequantize

from minitorch_infer.formats.dequantize import SUPPORTED_TYPES, dequantize
from minitorch_infer.errors import ModelFormatError, UnsupportedModelError

QUANTISED = sorted(BLOCKS, key=lambda t: t.value)


@pytest.mark.parametrize("ggml_type", QUANTISED, ids=lambda t: t.name)
def test_matches_ggml_reference_bit_for_bit(ggml_type):
    rng = np.random.default_rng(ggml_type.value)
    rows, cols = 3, 512
    raw = random_blocks(ggml_type, rows * cols // GGML_QUANT_SIZES[ggml_type][0], rng)

    values = dequantize(raw, ggml_type, (rows, cols), "blk.0.attn_q.weight")

    assert values.dtype == np.float32 and values.shape == (rows, cols) and values.flags.c_contiguous
    np.testing.assert_array_equal(values.ravel(), reference_dequantize(raw.tobytes(), ggml_type))


@pytest.mark.parametrize("ggml_type", QUANTISED, ids=lambda t: t.name)
def test_matches_gguf_py(ggml_type):
    rng = np.random.default_rng(100 + ggml_type.value)
    rows, cols = 16, 1024
    raw = random_blocks(ggml_type, rows * cols // GGML_QUANT_SIZES[ggml_type][0], rng)

    values = dequantize(raw, ggml_type, (rows, cols), "t")

    np.testing.assert_array_equal(values, gguf.quants.dequantize(raw.reshape(rows, -1), ggml_type))


@pytest.mark.parametrize("ggml_type, numpy_dtype", [(T.F32, np.float32), (T.F16, np.float16)], ids=["F32", "F16"])
def test_float_types(ggml_type, numpy_dtype):
    original = np.random.default_rng(0).standard_normal((4, 6)).astype(numpy_dtype)

    values = dequantize(original.view(np.uint8).ravel(), ggml_type, (4, 6), "t")

    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, original.astype(np.float32))


def test_bf16_is_the_top_half_of_float32():
    original = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, np.inf], dtype=np.float32)  # all exact in bfloat16
    top_halves = (original.view(np.uint32) >> 16).astype("<u2")

    values = dequantize(top_halves.view(np.uint8), T.BF16, (6,), "t")

    np.testing.assert_array_equal(values, original)


def test_q8_0_hand_made_block():
    block = np.float16(0.5).tobytes() + np.arange(-16, 16, dtype=np.int8).tobytes()

    values = dequantize(np.frombuffer(block, np.uint8), T.Q8_0, (32,), "t")

    np.testing.assert_array_equal(values, np.arange(-16, 16) * 0.5)


def test_q4_1_hand_made_block():
    # byte j holds code j in its low nibble (value j) and code 15 - j in its high nibble (value 16 + j)
    codes = np.arange(16, dtype=np.uint8)
    block = np.float16(2.0).tobytes() + np.float16(-1.0).tobytes() + (codes | (15 - codes) << 4).tobytes()

    values = dequantize(np.frombuffer(block, np.uint8), T.Q4_1, (32,), "t")

    expected = np.concatenate([codes, 15 - codes]) * 2.0 - 1.0
    np.testing.assert_array_equal(values, expected)


def test_q4_k_hand_made_block():
    # sub-block s has scale s + 1 and min 2 * s + 40 (the mins need all six bits); codes are 0..15 repeated
    scales, mins = np.arange(1, 9), np.arange(40, 56, 2)
    packed = np.zeros(12, dtype=np.uint8)  # ggml's packing, from quantize_row_q4_K
    for j in range(4):
        packed[j] = scales[j] | (scales[j + 4] >> 4) << 6
        packed[j + 4] = mins[j] | (mins[j + 4] >> 4) << 6
        packed[j + 8] = (scales[j + 4] & 15) | (mins[j + 4] & 15) << 4
    codes = np.tile(np.arange(16, dtype=np.uint8), 16)  # 256 codes, sub-block by sub-block
    by_chunk = codes.reshape(4, 2, 32)  # each 32 bytes hold two sub-blocks: low nibbles, then high
    qs = (by_chunk[:, 0] | by_chunk[:, 1] << 4).ravel()
    block = np.float16(0.25).tobytes() + np.float16(0.125).tobytes() + packed.tobytes() + qs.tobytes()

    values = dequantize(np.frombuffer(block, np.uint8), T.Q4_K, (256,), "t")

    sub_block = np.arange(256) // 32
    expected = 0.25 * scales[sub_block] * codes - 0.125 * mins[sub_block]
    np.testing.assert_array_equal(values, expected.astype(np.float32))


def test_every_listed_type_is_supported():
    listed = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K}
    assert SUPPORTED_TYPES == listed


@pytest.mark.parametrize("ggml_type", [T.Q2_K, T.IQ4_NL], ids=lambda t: t.name)
def test_unsupported_type_is_refused_naming_tensor_and_type(ggml_type):
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    raw = np.zeros(block_bytes, dtype=np.uint8)

    with pytest.raises(UnsupportedModelError, match=rf"blk\.3\.ffn_up\.weight.*{ggml_type.name}"):
        dequantize(raw, ggml_type, (block_size,), "blk.3.ffn_up.weight")


def test_byte_count_not_matching_the_shape_is_a_format_error():
    raw = np.zeros(20 * 3, dtype=np.uint8)  # three Q4_1 blocks: 96 values

    with pytest.raises(ModelFormatError, match=r"output\.weight.*\(4, 32\)"):
        dequantize(raw, T.Q4_1, (4, 32), "output.weight")
