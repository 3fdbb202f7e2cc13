"""Scalar dequantisation, value by value as ggml's C reference (dequantize_row_* in ggml-quants.c) does it.

Slow and plain on purpose: an oracle for the vectorised code that shares nothing with it. All arithmetic is
in np.float32, in ggml's order, so results must match bit for bit.
"""

import numpy as np
from gguf import GGMLQuantizationType as T


def _f16(raw: bytes, at: int) -> np.float32:
    return np.frombuffer(raw, dtype="<f2", count=1, offset=at)[0].astype(np.float32)


def _q8_0(b: bytes) -> list:
    d, qs = _f16(b, 0), np.frombuffer(b, dtype=np.int8, count=32, offset=2)
    return [qs[j] * d for j in range(32)]


def _q4_0(b: bytes) -> list:
    d, qs = _f16(b, 0), b[2:18]
    return [((qs[j] & 0xF) - 8) * d for j in range(16)] + [((qs[j] >> 4) - 8) * d for j in range(16)]


def _q4_1(b: bytes) -> list:
    d, m, qs = _f16(b, 0), _f16(b, 2), b[4:20]
    return [(qs[j] & 0xF) * d + m for j in range(16)] + [(qs[j] >> 4) * d + m for j in range(16)]


def _q5_0(b: bytes) -> list:
    d, qh, qs = _f16(b, 0), int.from_bytes(b[2:6], "little"), b[6:22]
    low = [(((qs[j] & 0xF) | (((qh >> j) << 4) & 0x10)) - 16) * d for j in range(16)]
    high = [(((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16) * d for j in range(16)]
    return low + high


def _q5_1(b: bytes) -> list:
    d, m, qh, qs = _f16(b, 0), _f16(b, 2), int.from_bytes(b[4:8], "little"), b[8:24]
    low = [((qs[j] & 0xF) | (((qh >> j) << 4) & 0x10)) * d + m for j in range(16)]
    high = [((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) * d + m for j in range(16)]
    return low + high


def _scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _q4_k(b: bytes) -> list:
    d, dmin, scales, qs = _f16(b, 0), _f16(b, 2), b[4:16], b[16:144]
    out = []
    for chunk in range(4):
        q = qs[32 * chunk : 32 * chunk + 32]
        for sub, nibble in ((2 * chunk, lambda x: x & 0xF), (2 * chunk + 1, lambda x: x >> 4)):
            sc, m = _scale_min_k4(sub, scales)
            d1, m1 = d * sc, dmin * m
            out += [d1 * nibble(q[l]) - m1 for l in range(32)]
    return out


def _q5_k(b: bytes) -> list:
    d, dmin, scales, qh, qs = _f16(b, 0), _f16(b, 2), b[4:16], b[16:48], b[48:176]
    out = []
    u1, u2 = 1, 2
    for chunk in range(4):
        ql = qs[32 * chunk : 32 * chunk + 32]
        sc, m = _scale_min_k4(2 * chunk, scales)
        d1, m1 = d * sc, dmin * m
        sc, m = _scale_min_k4(2 * chunk + 1, scales)
        d2, m2 = d * sc, dmin * m
        out += [d1 * ((ql[l] & 0xF) + (16 if qh[l] & u1 else 0)) - m1 for l in range(32)]
        out += [d2 * ((ql[l] >> 4) + (16 if qh[l] & u2 else 0)) - m2 for l in range(32)]
        u1, u2 = u1 << 2, u2 << 2
    return out


def _q6_k(b: bytes) -> list:
    ql_all, qh_all = b[0:128], b[128:192]
    sc_all = np.frombuffer(b, dtype=np.int8, count=16, offset=192)
    d = _f16(b, 208)
    out = [None] * 256
    for half in range(2):
        ql, qh, sc = ql_all[64 * half :], qh_all[32 * half :], sc_all[8 * half :]
        y = 128 * half
        for l in range(32):
            i = l // 16
            q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32
            q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32
            q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32
            q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32
            out[y + l] = d * sc[i] * q1
            out[y + l + 32] = d * sc[i + 2] * q2
            out[y + l + 64] = d * sc[i + 4] * q3
            out[y + l + 96] = d * sc[i + 6] * q4
    return out


# type -> (bytes per block, byte offsets of its float16 fields, scalar decoder), from ggml's block structs
BLOCKS = {
    T.Q8_0: (34, [0], _q8_0),
    T.Q4_0: (18, [0], _q4_0),
    T.Q4_1: (20, [0, 2], _q4_1),
    T.Q5_0: (22, [0], _q5_0),
    T.Q5_1: (24, [0, 2], _q5_1),
    T.Q4_K: (144, [0, 2], _q4_k),
    T.Q5_K: (176, [0, 2], _q5_k),
    T.Q6_K: (210, [208], _q6_k),
}


def random_blocks(ggml_type: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for `n_blocks` blocks, with finite float16 scales (random bits could be NaN)."""
    block_bytes, half_offsets, _ = BLOCKS[ggml_type]
    blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for at in half_offsets:
        scales = rng.standard_normal(n_blocks).astype("<f2")
        blocks[:, at : at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def reference_dequantize(raw: bytes, ggml_type: T) -> np.ndarray:
    """Flat float32 values of the blocks in `raw`."""
    block_bytes, _, decode = BLOCKS[ggml_type]
    values = []
    for start in range(0, len(raw), block_bytes):
        values += decode(raw[start : start + block_bytes])
    return np.array(values, dtype=np.float32)
