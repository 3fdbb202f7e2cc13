"""Compiled kernels for the row-wise ops between the products, in steps that already run Numba (a batched
engine's, a quantised model's): one call per op where NumPy makes one to six, each of which costs a few
microseconds however small its rows, and whose tanh costs ~3.5 ns a value.

One thread each: they run between products whose threads (OpenBLAS's or Numba's) spin for the cores after
every call, and a parallel loop beside them was starved (see quantized_kernels). A model that never batches
and has float32 weights never loads these (nor Numba): its ops stay in NumPy (backends/numpy.py).
tests/test_row_kernels.py checks these against the ops written plainly in float64.
"""

# Compiled with the helpers of fingerprint 39d855ea8b68 (vector_lanes.py; tests/test_kernel_caches.py).

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from .vector_lanes import LANES, rotate_pairs


# error_model="numpy" (here and in swiglu): a float division by zero gives inf rather than raising, so the
# loop carries no test for it, which kept LLVM from vectorising it.
@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def rms_norm(x, weight, eps, y):
    """y[i] = x[i] / sqrt(mean(x[i]²) + eps) · weight for each row i of x [rows, width]; y may be x."""
    width = x.shape[1]
    for i in range(x.shape[0]):
        squares = np.float32(0)
        for j in range(width):
            squares += x[i, j] * x[i, j]
        scale = np.float32(1) / np.sqrt(squares / np.float32(width) + eps)
        for j in range(width):
            y[i, j] = x[i, j] * scale * weight[j]


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def swiglu(gate_up, y):
    """y = silu(gate) · up, gate and up the halves of each row of gate_up [rows, 2 · width]. silu(g) = g ·
    sigmoid(g), the sigmoid from e = exp(-|g|), which never overflows: 1 / (1 + e) for g >= 0, e / (1 + e)
    below (never 1 - 1 / (1 + e), which cancels to nothing for large negative g). The numerator is chosen by
    arithmetic, not a branch, so LLVM vectorises the loop, exp included: NumPy's tanh form spends ~3.5 ns a
    value (16 rows of SmolLM2's gate|up: 69 against 30 us; one row: 15 against 3)."""
    width = y.shape[1]
    one = np.float32(1)
    for i in range(y.shape[0]):
        gates, ups, out = gate_up[i, :width], gate_up[i, width:], y[i]
        for j in range(width):
            gate = gates[j]
            e = _exp(-abs(gate))
            numerator = e + (one - e) * np.float32(gate >= 0)
            out[j] = gate * (numerator / (one + e)) * ups[j]


@njit(fastmath=True, cache=True, nogil=True)
def rope(x, table, y):
    """y[i, h] = x[i, h] with each adjacent pair (2j, 2j + 1) rotated by the angle whose (cos, sin) are
    table[i, 2j], table[i, 2j + 1], as NumPy's complex product of the pairs computes it; y may be x. One call
    where that product, on a batched step's strided rows of q or k, took ~8 µs however few the rows. Heads of
    a multiple of 16 values take 16 at a time (vector_lanes.rotate_pairs): 16 rows of the story model's q
    1.66 -> 0.49 µs, of SmolLM2's 6.3 -> 1.0 µs; others, or rows whose values are not contiguous, a pair at a
    time."""
    if (x.shape[2] % LANES == 0 and x.strides[2] == x.itemsize and y.strides[2] == y.itemsize
            and table.strides[1] == table.itemsize):
        for i in range(x.shape[0]):
            for h in range(x.shape[1]):
                for c in range(0, x.shape[2], LANES):
                    rotate_pairs(x, i, h, c, table, y)
        return
    for i in range(x.shape[0]):
        for h in range(x.shape[1]):
            for j in range(0, x.shape[2], 2):
                cos, sin = table[i, j], table[i, j + 1]
                a, b = x[i, h, j], x[i, h, j + 1]
                y[i, h, j] = a * cos - b * sin
                y[i, h, j + 1] = a * sin + b * cos


@njit(cache=True, nogil=True)
def write_rows(x, pool, slots):
    """pool[h, slots[i]] = x[i, h] for each row i of x [rows, kv_heads, head_dim]: a step's keys or values
    stored in the slots of their sequences, scattered over the pool [kv_heads, slots, head_dim]."""
    for i in range(x.shape[0]):
        slot = slots[i]
        for h in range(x.shape[1]):
            for d in range(x.shape[2]):
                pool[h, slot, d] = x[i, h, d]


LOG2_E = np.float32(1.4426950408889634)
LN2_HIGH, LN2_LOW = np.float32(0.693359375), np.float32(-2.12194440e-4)      # ln 2 = high + low, high exact


@njit(fastmath=True, inline="always")
def _exp(x):
    """e**x for x <= 0 (swiglu's sigmoid of -|gate|) to within 3e-7 relative; e**-87 below -87 (where float32's
    normal numbers end). e**x = 2**n · e**f with
    |f| <= ln2 / 2; e**f by Cephes' expf polynomial; 2**n built from its exponent bits."""
    x = max(x, np.float32(-87.0))
    n = np.float32(np.floor(x * LOG2_E + np.float32(0.5)))
    f = x - n * LN2_HIGH - n * LN2_LOW
    p = np.float32(1.9875691500e-4)
    p = p * f + np.float32(1.3981999507e-3)
    p = p * f + np.float32(8.3334519073e-3)
    p = p * f + np.float32(4.1665795894e-2)
    p = p * f + np.float32(1.6666665459e-1)
    p = p * f + np.float32(5.0000001201e-1)
    p = p * f * f + f + np.float32(1)
    return p * _float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits`."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.int32), codegen
