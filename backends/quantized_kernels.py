"""Compiled kernels for products with quantised weights (Numba: LLVM machine code, cached on disk).

NumPy has no product of int8 or 4-bit blocks with float32, and widening a weight to float32 first would
read and write four to eight times its bytes. These kernels read the weight as stored (codes and float32
scales, minitorch_infer/quantized.py) and widen each code in a register.

- `matmul_rows_*`: y[m, n] (+)= Σ_k x[m, k] w[n, k], computed directly: decode (one row of x), where reading
  the weight is the cost. Four weight rows at a time, so each x value loaded serves four products. Each row
  keeps 16 accumulators (one vector register), which take d · code · x for pairs of values block after block
  and are summed once per row: summing each block's 32 products before applying its scale, as the format
  suggests, costs a horizontal reduction per block and ran 1.3x slower. Threads share out the groups of four
  rows (`prange`). Each group asks for the rows PREFETCH_ROWS ahead (software prefetch): the hardware's own
  prefetching kept one core's stream of weight bytes at ~5 GB/s, and SmolLM2's Q8_0 decode went 1.29x faster.
- `matmul_tiles_*`: the same product for several rows of x (batched decode steps, prefill chunks), where
  widening each code once per row of x would cost more than reading it: four weight rows are dequantised
  into a float32 tile that stays in L1, then multiplied by every four rows of x in dot_tiles' register
  tiles (`dot_tile`). A block widens in vector lanes of our own (`_widened_q8`, `_widened_q4`): LLVM's loop
  over a block of 32 values stayed scalar, no longer than one pass of its vector loop.
- `dequantize_rows_*`: rows of w as float32, for the rows an embedding lookup picks. One thread: a few rows.

Every kernel is checked against dequantise-then-NumPy (tests/test_quantized.py). Numba compiles each
signature on first use (seconds) and keeps the machine code in its cache (`__pycache__` beside this file, or
NUMBA_CACHE_DIR), so later processes load it in milliseconds.
"""

# Compiled with the helpers of fingerprint 69e31d2c2dff (dot_tiles.py, vector_lanes.py; tests/test_kernel_caches.py).

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.numpy_support import carray

from .dot_tiles import TILE, dot_tile, padded_rows, store_tile
from .vector_lanes import VECTOR, lane_buffer, prefetch_line, splat, store_lanes

ROWS = TILE           # weight rows per iteration (a dot tile's, in the tiled kernels)
LANES = 16            # accumulators per weight row in the direct kernels: a block's 32 values as 16 pairs
RUNS = 64             # runs of groups of rows the threads share out (matmul_tiles_*)
ACCUMULATORS = ROWS * LANES
PREFETCH_ROWS = 16    # how far ahead the direct kernels ask for weight rows


@intrinsic
def _prefetch(typingctx, array, row, column):
    """Ask for the cache line holding array[row, column]."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        indices = [context.cast(builder, value, kind, types.intp) for value, kind in zip(args[1:], signature.args[1:])]
        prefetch_line(builder, cgutils.get_item_pointer(context, builder, array_type,
                                                        context.make_array(array_type)(context, builder, args[0]),
                                                        indices))
        return context.get_dummy_value()
    return types.void(array, row, column), codegen


@njit(inline="always")
def _prefetch_rows(codes, n, rows, column):
    """The lines at `column` of the four weight rows PREFETCH_ROWS past the group at n."""
    ahead = n + PREFETCH_ROWS
    for r in range(ROWS):
        _prefetch(codes, min(ahead + r, rows - 1), column)


@njit(inline="always")
def _accumulators():
    """Four weight rows' 16 accumulators, kept in registers."""
    return carray(lane_buffer(ACCUMULATORS, np.float32), (ROWS, LANES))


@njit(inline="always")
def _row(n, rows):
    """Weight row n, or the last row for the padding of a final group of fewer than four (computed, not stored)."""
    return min(n, rows - 1)


@njit(inline="always")
def _store(y, m, n, value, accumulate):
    if n < y.shape[1]:
        if accumulate:
            y[m, n] += value
        else:
            y[m, n] = value


@njit(inline="always")
def _pair_q8(codes, r, k, x_low, x_high):
    """code·x for value k of row r and for the value 16 places on, in the same block."""
    return np.float32(codes[r, k]) * x_low + np.float32(codes[r, k + LANES]) * x_high


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matmul_rows_q8(codes, scales, x, y, accumulate):
    """Q8_0: value = code · d. Lane i of a row's accumulators gathers d · (code·x) of values i and i + 16 of
    every block."""
    rows, blocks = scales.shape
    for group in prange((rows + ROWS - 1) // ROWS):
        n = group * ROWS
        r0, r1, r2, r3 = _row(n, rows), _row(n + 1, rows), _row(n + 2, rows), _row(n + 3, rows)
        acc = _accumulators()
        for m in range(x.shape[0]):
            acc[:] = 0
            for b in range(blocks):
                d0, d1, d2, d3 = scales[r0, b], scales[r1, b], scales[r2, b], scales[r3, b]
                first = 32 * b
                if b % 2 == 0:                            # a 64-byte line holds two blocks' codes
                    _prefetch_rows(codes, n, rows, first)
                for i in range(LANES):
                    x_low, x_high = x[m, first + i], x[m, first + LANES + i]
                    acc[0, i] += d0 * _pair_q8(codes, r0, first + i, x_low, x_high)
                    acc[1, i] += d1 * _pair_q8(codes, r1, first + i, x_low, x_high)
                    acc[2, i] += d2 * _pair_q8(codes, r2, first + i, x_low, x_high)
                    acc[3, i] += d3 * _pair_q8(codes, r3, first + i, x_low, x_high)
            for r in range(ROWS):
                _store(y, m, n + r, acc[r].sum(), accumulate)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matmul_rows_q4(codes, scales, offsets, x, y, accumulate):
    """Q4_1: value = code · d + m; Q4_0 (offsets None): (code - 8) · d. Byte i of a block holds value i in its
    low nibble and value i + 16 in its high one, so lane i takes byte i: d · (low·x_i + high·x_i+16). The
    offsets' part, m · (the block's sum of x), is one scalar per row and block, from block sums of x made
    once per call (Q4_0: m = -8d); in the lanes it cost two more vector operations per block and row, and
    native SmolLM2 decode was 1.03-1.07x slower (one process, eight alternating turns, three times).

    Only the high nibble is taken out of the byte, in float32 (high = floor(byte / 16)): Numba widens integer
    arithmetic to 64 bits, which LLVM then vectorises four lanes to a register instead of sixteen. The low
    one is never formed: with byte = low + 16 high, low·x_i + high·x_i+16 = byte·x_i + high·(x_i+16 - 16 x_i),
    whose second factor `_high_terms` makes once per call. One vector operation fewer per byte and row:
    native SmolLM2 decode 1.04-1.10x (one process, eight alternating turns, five times). The difference of
    byte·x_i and 16 high·x_i rounds a little worse: ~1e-6 of the largest output against ~3e-7."""
    rows, blocks = scales.shape
    sixteenth, minus_eight = np.float32(0.0625), np.float32(-8)
    x_sums = _block_sums(x, blocks)
    high_terms = _high_terms(x, blocks)
    for group in prange((rows + ROWS - 1) // ROWS):
        n = group * ROWS
        r0, r1, r2, r3 = _row(n, rows), _row(n + 1, rows), _row(n + 2, rows), _row(n + 3, rows)
        acc = _accumulators()
        for m in range(x.shape[0]):
            acc[:] = 0
            o0, o1, o2, o3 = np.float32(0), np.float32(0), np.float32(0), np.float32(0)
            for b in range(blocks):
                d0, d1, d2, d3 = scales[r0, b], scales[r1, b], scales[r2, b], scales[r3, b]
                if offsets is None:
                    m0, m1, m2, m3 = minus_eight * d0, minus_eight * d1, minus_eight * d2, minus_eight * d3
                else:
                    m0, m1, m2, m3 = offsets[r0, b], offsets[r1, b], offsets[r2, b], offsets[r3, b]
                x_sum = x_sums[m, b]
                o0 += m0 * x_sum
                o1 += m1 * x_sum
                o2 += m2 * x_sum
                o3 += m3 * x_sum
                if b % 4 == 0:                            # a 64-byte line holds four blocks' codes
                    _prefetch_rows(codes, n, rows, LANES * b)
                for i in range(LANES):
                    x_low, high_term = x[m, 32 * b + i], high_terms[m, LANES * b + i]
                    c0, c1 = np.float32(codes[r0, LANES * b + i]), np.float32(codes[r1, LANES * b + i])
                    c2, c3 = np.float32(codes[r2, LANES * b + i]), np.float32(codes[r3, LANES * b + i])
                    h0, h1 = np.floor(c0 * sixteenth), np.floor(c1 * sixteenth)
                    h2, h3 = np.floor(c2 * sixteenth), np.floor(c3 * sixteenth)
                    acc[0, i] += d0 * (c0 * x_low + h0 * high_term)
                    acc[1, i] += d1 * (c1 * x_low + h1 * high_term)
                    acc[2, i] += d2 * (c2 * x_low + h2 * high_term)
                    acc[3, i] += d3 * (c3 * x_low + h3 * high_term)
            _store(y, m, n, acc[0].sum() + o0, accumulate)
            _store(y, m, n + 1, acc[1].sum() + o1, accumulate)
            _store(y, m, n + 2, acc[2].sum() + o2, accumulate)
            _store(y, m, n + 3, acc[3].sum() + o3, accumulate)


@njit(inline="always")
def _high_terms(x, blocks):
    """[rows of x, 16 · blocks]: x_i+16 - 16 x_i for the first 16 values i of every block (matmul_rows_q4)."""
    terms = np.empty((x.shape[0], LANES * blocks), np.float32)
    for m in range(x.shape[0]):
        for b in range(blocks):
            for i in range(LANES):
                terms[m, LANES * b + i] = x[m, 32 * b + LANES + i] - np.float32(16) * x[m, 32 * b + i]
    return terms


@njit(inline="always")
def _block_sums(x, blocks):
    """[rows of x, blocks]: the sum of each block of 32 values of each row of x."""
    sums = np.empty((x.shape[0], blocks), np.float32)
    for m in range(x.shape[0]):
        for b in range(blocks):
            total = np.float32(0)
            for i in range(32):
                total += x[m, 32 * b + i]
            sums[m, b] = total
    return sums


@njit(inline="always")
def _products_of_tile(tile, x_tiles, y, n, sums, accumulate):
    """y[:, n:n+4] (+)= x · tileᵀ for a tile of four dequantised weight rows (in L1: nothing to ask ahead for),
    by dot_tiles' register tiles, four rows of x (padded to whole tiles) at a time."""
    for m in range(0, x_tiles.shape[0], ROWS):
        if y.shape[0] <= 2:                         # half the products (x_rows is a literal of the code)
            dot_tile(tile, 0, x_tiles, m, sums, 2)
        else:
            dot_tile(tile, 0, x_tiles, m, sums, ROWS)
        store_tile(y, sums, m, n, 0, accumulate)


@njit(inline="always")
def _group_ranges(rows):
    """The groups of four weight rows, and how many runs of them the threads share out: a few dozen, so that
    each run allocates its tile once and the runs still balance across threads."""
    groups = (rows + ROWS - 1) // ROWS
    return groups, min(groups, RUNS)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matmul_tiles_q8(codes, scales, x, y, accumulate):
    """y (+)= x · wᵀ for several rows of x: four weight rows at a time are dequantised into a small float32
    tile (in L1) once, and every row of x is multiplied by the tile."""
    rows, blocks = scales.shape
    groups, runs = _group_ranges(rows)
    x_tiles = padded_rows(x)
    for run in prange(runs):
        tile = np.empty((ROWS, 32 * blocks), np.float32)
        sums = lane_buffer(LANES, np.float32)
        for group in range(run * groups // runs, (run + 1) * groups // runs):
            n = group * ROWS
            for r in range(ROWS):
                _dequantize_row_q8(codes, scales, _row(n + r, rows), tile[r])
            _products_of_tile(tile, x_tiles, y, n, sums, accumulate)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matmul_tiles_q4(codes, scales, offsets, x, y, accumulate):
    """As matmul_tiles_q8, for 4-bit codes (offsets None: Q4_0). The loop is written out twice because Numba
    does not cache on disk a kernel that takes the dequantiser as an argument."""
    rows, blocks = scales.shape
    groups, runs = _group_ranges(rows)
    x_tiles = padded_rows(x)
    for run in prange(runs):
        tile = np.empty((ROWS, 32 * blocks), np.float32)
        sums = lane_buffer(LANES, np.float32)
        for group in range(run * groups // runs, (run + 1) * groups // runs):
            n = group * ROWS
            for r in range(ROWS):
                _dequantize_row_q4(codes, scales, offsets, _row(n + r, rows), tile[r])
            _products_of_tile(tile, x_tiles, y, n, sums, accumulate)


@njit(inline="always")
def _dequantize_row_q8(codes, scales, n, out):
    """out[:] = weight row n as float32, a block of 32 values at a time in vector lanes (_widened_q8). LLVM's
    own loop over a block is scalar: 32 values is no more than one pass of its vector loop."""
    for b in range(scales.shape[1]):
        _widened_q8(codes, n, 32 * b, scales[n, b], out)


@njit(inline="always")
def _dequantize_row_q4(codes, scales, offsets, n, out):
    """As _dequantize_row_q8, for 4-bit codes (offsets None: Q4_0, whose m is -8d); _widened_q4."""
    for b in range(scales.shape[1]):
        d = scales[n, b]
        _widened_q4(codes, n, 16 * b, d, np.float32(-8) * d if offsets is None else offsets[n, b], out)


@intrinsic
def _widened_q8(typingctx, codes, n, start, d, out):
    """out[start : start + 32] = d · codes[n, start : start + 32] (int8 codes), as two vectors of 16 lanes."""
    if not _block_arrays(codes, out):
        return None

    def codegen(context, builder, signature, args):
        first, target = _block_pointers(context, builder, signature, args, 4)
        scale = splat(builder, args[3])
        bytes_ = ir.VectorType(ir.IntType(8), LANES)
        for half in range(2):
            at = builder.gep(first, [ir.IntType(64)(LANES * half)])
            values = builder.sitofp(builder.load(builder.bitcast(at, bytes_.as_pointer()), align=1), VECTOR)
            store_lanes(builder, builder.fmul(values, scale, flags=("fast",)), target, LANES * half)
        return context.get_dummy_value()
    return types.void(codes, n, start, d, out), codegen


@intrinsic
def _widened_q4(typingctx, codes, n, start, d, m, out):
    """out[2 start : 2 start + 32] = codes · d + m for the 32 nibbles of codes[n, start : start + 16]: byte i
    holds value i in its low four bits and value i + 16 in its high four."""
    if not _block_arrays(codes, out):
        return None

    def codegen(context, builder, signature, args):
        first, target = _block_pointers(context, builder, signature, args, 5, out_start=2)
        scale, offset = splat(builder, args[3]), splat(builder, args[4])
        bytes_, words = ir.VectorType(ir.IntType(8), LANES), ir.VectorType(ir.IntType(32), LANES)
        wide = builder.zext(builder.load(builder.bitcast(first, bytes_.as_pointer()), align=1), words)
        low = builder.and_(wide, ir.Constant(words, [15] * LANES))
        high = builder.lshr(wide, ir.Constant(words, [4] * LANES))
        for half, nibbles in enumerate((low, high)):
            values = builder.uitofp(nibbles, VECTOR)
            store_lanes(builder, builder.fadd(builder.fmul(values, scale, flags=("fast",)), offset, flags=("fast",)),
                        target, LANES * half)
        return context.get_dummy_value()
    return types.void(codes, n, start, d, m, out), codegen


def _block_arrays(codes, out) -> bool:
    """Whether codes and out are the C-contiguous arrays the widening intrinsics address directly."""
    return (isinstance(codes, types.Array) and codes.ndim == 2 and codes.layout == "C" and isinstance(out, types.Array)
            and out.ndim == 1 and out.layout == "C" and out.dtype == types.float32)


def _block_pointers(context, builder, signature, args, out_position, out_start=1):
    """Pointers to codes[n, start] and to out[out_start · start], for the (codes, n, start, ..., out) arguments."""
    codes_type, out_type = signature.args[0], signature.args[out_position]
    n, start = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2))
    codes = context.make_array(codes_type)(context, builder, args[0])
    first = cgutils.get_item_pointer(context, builder, codes_type, codes, [n, start], wraparound=False)
    out = context.make_array(out_type)(context, builder, args[out_position])
    target = builder.gep(out.data, [builder.mul(start, start.type(out_start))])
    return first, target


@njit(fastmath=True, cache=True, nogil=True)
def dequantize_rows_q8(codes, scales, ids, out):
    """out[t] = row ids[t] of the weight as float32."""
    for t in range(ids.shape[0]):
        _dequantize_row_q8(codes, scales, ids[t], out[t])


@njit(fastmath=True, cache=True, nogil=True)
def dequantize_rows_q4(codes, scales, offsets, ids, out):
    """As dequantize_rows_q8, for 4-bit codes (offsets None: Q4_0)."""
    for t in range(ids.shape[0]):
        _dequantize_row_q4(codes, scales, offsets, ids[t], out[t])
