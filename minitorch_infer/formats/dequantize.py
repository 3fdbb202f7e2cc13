"""Turn a GGUF tensor's raw bytes into float32, with whole-array NumPy operations (no loop over blocks).

Quantised types store each row as blocks of 32 or 256 values. Every value comes back as
`code * scale (+ offset)`, where the codes are small integers and the scale and offset are per block or
per sub-block of 16 or 32 values. The arithmetic follows ggml's reference dequantisation operation by
operation, so the float32 results are bit-identical to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ..errors import ModelFormatError, UnsupportedModelError, shown

# One record per block, fields in file order ("d" scale, "m"/"dmin" offset, "qs" low bits, "qh" high bits).
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
_Q5_0 = np.dtype([("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])
_Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])
_Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
_Q5_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)])
_Q6_K = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])


def dequantize(raw: np.ndarray, ggml_type: T, shape: tuple[int, ...], tensor_name: str) -> np.ndarray:
    """A new C-contiguous float32 array of `shape` (NumPy order) from the tensor's bytes as stored."""
    if ggml_type not in _DECODERS:
        supported = ", ".join(t.name for t in _DECODERS)
        raise UnsupportedModelError(
            f"tensor {shown(tensor_name)} has GGUF type {T(ggml_type).name}, which cannot be dequantised "
            f"(supported: {supported})"
        )
    block, decode = _DECODERS[ggml_type]
    values_per_block = GGML_QUANT_SIZES[ggml_type][0]
    if raw.nbytes % block.itemsize or raw.nbytes // block.itemsize * values_per_block != math.prod(shape):
        raise ModelFormatError(
            f"tensor {shown(tensor_name)}: {raw.nbytes} bytes of {T(ggml_type).name} do not hold shape {shape}"
        )
    values = decode(np.ascontiguousarray(raw).view(block))
    return values.reshape(shape)


def _f32(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)


def _bf16(halves: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32
    return (halves.astype(np.uint32) << 16).view(np.float32)


# The 32-value types have one group per block: codes are shaped (blocks, 1, 32), scales (blocks, 1).


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    return _scaled(blocks["qs"][:, None, :], blocks["d"][:, None])


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    codes = _signed(_nibbles(blocks["qs"]), zero=8)
    return _scaled(codes[:, None, :], blocks["d"][:, None])


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    codes = _nibbles(blocks["qs"])
    return _scaled(codes[:, None, :], blocks["d"][:, None], blocks["m"][:, None])


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    codes = _signed(_nibbles(blocks["qs"]) | _bits(blocks["qh"]) << 4, zero=16)
    return _scaled(codes[:, None, :], blocks["d"][:, None])


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    codes = _nibbles(blocks["qs"]) | _bits(blocks["qh"]) << 4
    return _scaled(codes[:, None, :], blocks["d"][:, None], blocks["m"][:, None])


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    # 8 sub-blocks of 32; each 32 bytes of qs hold two sub-blocks, low nibbles first
    n = len(blocks)
    codes = _nibbles(blocks["qs"].reshape(n, 4, 32)).reshape(n, 8, 32)
    return _k_scaled(codes, blocks)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    low = _nibbles(blocks["qs"].reshape(n, 4, 32)).reshape(n, 8, 32)
    # bit s of qh[l] is the fifth bit of value l in sub-block s
    high = _bits(blocks["qh"]).reshape(n, 32, 8).transpose(0, 2, 1)
    return _k_scaled(low | high << 4, blocks)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    # Two halves of 128 values. In a half, value q*32 + l (quarter q, 0 <= l < 32) takes its low four bits
    # from ql[(q % 2) * 32 + l] (low nibble for q < 2, high after) and its top two from qh[l] >> 2q.
    n = len(blocks)
    low = _nibbles(blocks["ql"].reshape(n, 2, 64)).reshape(n, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    high = (blocks["qh"].reshape(n, 2, 1, 32) >> shifts) & 3
    codes = _signed((low | high << 4).reshape(n, 16, 16), zero=32)
    # 16 scales, one per run of 16 values; ggml multiplies (d * scale) * code, in that order
    scales = blocks["d"].astype(np.float32)[:, None] * blocks["scales"]
    return _scaled(codes, scales)


def _k_scaled(codes: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: value = (d * scale) * code - dmin * min, with 6-bit scale and min per sub-block."""
    scales, mins = _k_scales_and_mins(blocks["scales"])
    sub_scales = blocks["d"].astype(np.float32)[:, None] * scales
    sub_offsets = -(blocks["dmin"].astype(np.float32)[:, None] * mins)
    return _scaled(codes, sub_scales, sub_offsets)


def _k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack 12 bytes into 8 six-bit scales and 8 six-bit mins.

    Bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low six bits; sub-blocks 4-7 take their low
    four bits from the nibbles of bytes 8-11 (scale low, min high) and their top two from the spare top
    bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    first_scales, first_mins, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([first_scales & 63, (rest & 15) | (first_scales >> 6) << 4], axis=1)
    mins = np.concatenate([first_mins & 63, (rest >> 4) | (first_mins >> 6) << 4], axis=1)
    return scales, mins


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(..., k) bytes -> (..., 2 * k) 4-bit codes: all low nibbles, then all high ones, as ggml packs them."""
    codes = np.empty(packed.shape[:-1] + (2, packed.shape[-1]), dtype=np.uint8)
    np.bitwise_and(packed, 15, out=codes[..., 0, :])
    np.right_shift(packed, 4, out=codes[..., 1, :])
    return codes.reshape(packed.shape[:-1] + (2 * packed.shape[-1],))


def _bits(packed: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 8 * k) single bits, bit 0 of byte 0 first (a little-endian bit field)."""
    return np.unpackbits(packed, axis=-1, bitorder="little")


def _signed(codes: np.ndarray, zero: int) -> np.ndarray:
    """Unsigned codes minus their zero point, as int8 (codes are below 64, so the view keeps them)."""
    signed = codes.view(np.int8)
    signed -= zero
    return signed


def _scaled(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """codes (blocks, groups, group size) times a per-group scale, plus a per-group offset if given."""
    values = np.multiply(codes, scale.astype(np.float32)[..., None], dtype=np.float32)
    if offset is not None:
        values += offset.astype(np.float32)[..., None]
    return values


_DECODERS: dict[T, tuple[np.dtype, Callable[[np.ndarray], np.ndarray]]] = {
    T.F32: (np.dtype("<f4"), _f32),
    T.F16: (np.dtype("<f2"), _f32),
    T.BF16: (np.dtype("<u2"), _bf16),
    T.Q8_0: (_Q8_0, _q8_0),
    T.Q4_0: (_Q4_0, _q4_0),
    T.Q4_1: (_Q4_1, _q4_1),
    T.Q5_0: (_Q5_0, _q5_0),
    T.Q5_1: (_Q5_1, _q5_1),
    T.Q4_K: (_Q4_K, _q4_k),
    T.Q5_K: (_Q5_K, _q5_k),
    T.Q6_K: (_Q6_K, _q6_k),
}

SUPPORTED_TYPES = frozenset(_DECODERS)
