"""Compiled products for float32 weights and a few rows of x: the products of a batched decode step.

OpenBLAS multiplies a few rows by a large weight badly. Its gemm packs the weight into its own layout on
every call and then streams it from memory at ~4 GB/s, where its one-row gemv reaches ~15 GB/s: SmolLM2's
products at 16 rows ran at 26-35 GFLOP/s, and a 16-sequence step took 3-4 single-sequence steps. These
kernels read the weight where it lies, once per call, into register tiles written as LLVM vector IR, and ask
for its cache lines ahead of use (software prefetch): without that, the same kernels reached only BLAS's rate.

- `matmul_rows`: a row-major weight [N, K] (SmolLM2's o and down projections and logits). A tile is 4 weight
  rows by 4 rows of x: 16 accumulators of 16 lanes along K, each loaded value serving four products, finished
  by vector_lanes' shuffle tree. Each pass over a tile asks for a share of the weight rows PREFETCH_ROWS on.
- `matmul_columns`: a column-major weight, read as wᵀ [K, N] (the packed q|k|v and gate|up). Eight rows of wᵀ
  at a time multiply 16 columns by up to 16 rows of x (4 or 8 when x has no more), each value of x broadcast
  to the 16 lanes. The partial sums of a stripe of columns (STRIPE_VALUES of them) stay in L1 while the
  stripe's rows of wᵀ stream past, each read along its length: reading whole columns of 16 instead, page
  after page, ran at BLAS's rate with prefetch or without.

Both share rows of the weight among Numba's threads (`prange`). They need K a multiple of 16 (rows) or 8
(columns) and N a multiple of 16 (columns); `fits` says whether a weight qualifies. Checked against NumPy in
tests/test_float_kernels.py. Numba compiles them on first use and keeps the machine code in its cache.

A tile keeps 16 accumulators of 16 lanes in registers, with up to 8 more vectors loaded beside them: 24 of
AVX-512's 32 registers. Without AVX-512 LLVM splits each vector in two, over 16 registers, and spills, so the
NumPy backend uses these only where AVX-512 is present.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding, ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .vector_lanes import (LANES, VECTOR, accumulate_lanes, data_and_shape, float32_rows, lane_buffer, load_lanes,
                           prefetch_line, row_sums, splat, store_lanes)

TILE = 4                 # weight rows and rows of x in a matmul_rows tile
RUNS = 64                # runs of tiles the threads share out (matmul_rows)
PREFETCH_ROWS = 16       # how far ahead matmul_rows asks for weight rows
STEP = 8                 # rows of wᵀ in one step of matmul_columns
BLOCK_ROWS = LANES       # rows of x that one matmul_columns block multiplies (4 or 8 when x has no more)
STRIPE_VALUES = 8192     # partial sums one matmul_columns run keeps (32 KiB: 512 columns of 16 rows)
MIN_STRIPES = 4          # runs matmul_columns shares out at least, where there are columns enough
PREFETCH_STEPS = 1       # how many steps ahead matmul_columns asks for rows of wᵀ

AVAILABLE = "avx512f" in binding.get_host_cpu_features()


def fits(w: np.ndarray) -> bool:
    """Whether a weight [N, K] is float32 in a layout and shape one of the kernels takes."""
    if w.dtype != np.float32 or w.ndim != 2:
        return False
    rows, width = w.shape
    if w.flags.c_contiguous:
        return width % LANES == 0 and rows >= TILE
    return w.flags.f_contiguous and rows % LANES == 0 and width % STEP == 0


def warm_up() -> None:
    """Compile (or load from Numba's cache) both kernels for the types a program passes, so that the first
    batched step does not pay for it: weights writeable, or read-only as mapped from a file."""
    for writeable in (True, False):
        w = np.zeros((16, 16), np.float32)
        w.flags.writeable = writeable
        x, y = np.zeros((2, 16), np.float32), np.zeros((2, 16), np.float32)
        matmul_rows(w, x, y, False)
        matmul_columns(w, x, y, False)           # w as the transpose of a column-major weight


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matmul_rows(w, x, y, accumulate):
    """y (+)= x · wᵀ for a row-major w [N, K]: K a multiple of 16, N at least 4."""
    n_rows = w.shape[0]
    x_tiles = padded_rows(x)
    passes = x_tiles.shape[0] // TILE
    share = max(1, TILE // passes)        # weight rows each pass asks for, so that a tile's passes ask for 4
    groups = (n_rows + TILE - 1) // TILE
    runs = min(groups, RUNS)
    for run in prange(runs):
        sums = lane_buffer(LANES, np.float32)
        for group in range(run * groups // runs, (run + 1) * groups // runs):
            first = TILE * group
            n = min(first, n_rows - TILE)             # a short last tile ends at row N - 1, and skips rows done
            for p in range(passes):
                ahead = min(n + PREFETCH_ROWS + p * share, n_rows - 1)
                last = min(ahead + share - 1, n_rows - 1)
                if x.shape[0] <= 2:                   # half the products (x_rows is a literal of the code)
                    dot_tile(w, n, x_tiles, 0, sums, ahead, last, TILE, 2)
                else:
                    dot_tile(w, n, x_tiles, TILE * p, sums, ahead, last, TILE, TILE)
                store_tile(y, sums, TILE * p, n, first - n, accumulate)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matmul_columns(w_t, x, y, accumulate):
    """y (+)= x · w_t for w_t [K, N] row-major (a column-major weight's transpose): K a multiple of 8, N of 16."""
    width, columns = w_t.shape
    rows = x.shape[0]
    block_rows = 4 if rows <= 4 else 8 if rows <= 8 else BLOCK_ROWS     # the fewest lanes of x that hold them
    blocks = (rows + block_rows - 1) // block_rows
    x_t = np.zeros((blocks, width, block_rows), np.float32)
    for m in range(rows):
        for k in range(width):
            x_t[m // block_rows, k, m % block_rows] = x[m, k]
    stripe = min(STRIPE_VALUES // (blocks * block_rows * LANES) * LANES,
                 (columns // LANES + MIN_STRIPES - 1) // MIN_STRIPES * LANES)
    stripes = (columns + stripe - 1) // stripe
    for s in prange(stripes):
        first = s * stripe
        last = min(columns, first + stripe)
        partial = np.zeros((blocks, block_rows, stripe), np.float32)
        for k in range(0, width, STEP):
            for n in range(first, last, LANES):
                for b in range(blocks):
                    if block_rows == 4:                   # the rows are a literal of the generated code
                        _broadcast_step(w_t, k, n, x_t, b, partial, n - first, 4)
                    elif block_rows == 8:
                        _broadcast_step(w_t, k, n, x_t, b, partial, n - first, 8)
                    else:
                        _broadcast_step(w_t, k, n, x_t, b, partial, n - first, BLOCK_ROWS)
        for m in range(rows):
            for n in range(first, last):
                if accumulate:
                    y[m, n] += partial[m // block_rows, m % block_rows, n - first]
                else:
                    y[m, n] = partial[m // block_rows, m % block_rows, n - first]


@njit(inline="always")
def padded_rows(x):
    """x's rows, followed by zero rows up to a whole number of tiles (for dot_tile)."""
    padded = np.zeros(((x.shape[0] + TILE - 1) // TILE * TILE, x.shape[1]), np.float32)
    padded[:x.shape[0]] = x
    return padded


@njit(inline="always")
def store_tile(y, sums, m, n, skip, accumulate):
    """y[m + i, n + j] (+)= sums[4i + j] for the rows and columns y has, from column n + skip on."""
    for i in range(TILE):
        if m + i < y.shape[0]:
            for j in range(skip, TILE):
                if n + j < y.shape[1]:
                    if accumulate:
                        y[m + i, n + j] += sums[TILE * i + j]
                    else:
                        y[m + i, n + j] = sums[TILE * i + j]


@intrinsic
def dot_tile(typingctx, w, n, x, m, sums, ahead_first, ahead_last, ahead_rows, x_rows):
    """sums[4i + j] = x[m + i] · w[n + j] for i < x_rows, j < 4 (x_rows a literal, 2 or 4; the other lanes of sums
    are 0): an accumulator of 16 lanes per product along the rows (whose length must be a multiple of 16),
    finished by the shuffle tree. On the way it asks for ahead_rows (a literal, 0 to 4) rows of w from
    ahead_first on, none past ahead_last, a line of each per 16 values."""
    if not (float32_rows(w, 2) and float32_rows(x, 2) and isinstance(ahead_rows, types.IntegerLiteral)
            and isinstance(x_rows, types.IntegerLiteral)):
        return None
    asked, products = ahead_rows.literal_value, x_rows.literal_value

    def codegen(context, builder, signature, args):
        w_data, (_, width) = data_and_shape(context, builder, signature.args[0], args[0])
        x_data, _ = data_and_shape(context, builder, signature.args[2], args[2])
        n_, m_, first, last = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 3, 5, 6))
        intp = width.type

        def row(data, index):
            return builder.gep(data, [builder.mul(index, width)])
        w_rows = [row(w_data, builder.add(n_, intp(j))) for j in range(TILE)]
        x_rows_ = [row(x_data, builder.add(m_, intp(i))) for i in range(products)]
        ahead = [row(w_data, _smaller(builder, builder.add(first, intp(j)), last)) for j in range(asked)]
        zero = ir.Constant(VECTOR, [0.0] * LANES)
        accumulators = [[cgutils.alloca_once_value(builder, zero) for _ in range(TILE)] for _ in range(products)]
        with cgutils.for_range(builder, builder.udiv(width, intp(LANES))) as loop:
            at = builder.mul(loop.index, intp(LANES))
            ws = [load_lanes(builder, builder.gep(p, [at])) for p in w_rows]
            xs = [load_lanes(builder, builder.gep(p, [at])) for p in x_rows_]
            for p in ahead:
                prefetch_line(builder, builder.gep(p, [at]))
            for i in range(products):
                for j in range(TILE):
                    accumulate_lanes(builder, accumulators[i][j], xs[i], ws[j])
        totals = [builder.load(a) for line in accumulators for a in line]
        sums_ = row_sums(builder, totals + [zero] * (LANES - len(totals)))
        store_lanes(builder, sums_, args[4])
        return context.get_dummy_value()
    return types.void(w, n, x, m, sums, ahead_first, ahead_last, ahead_rows, x_rows), codegen


@intrinsic
def _broadcast_step(typingctx, w_t, k, n, x_t, block, partial, column, rows):
    """partial[block, r, column : column + 16] += Σ_{k <= j < k + STEP} x_t[block, j, r] · w_t[j, n : n + 16] for
    r < rows (a literal: x_t and partial hold that many rows a block); asks for the same columns of w_t
    PREFETCH_STEPS steps on."""
    if not (float32_rows(w_t, 2) and float32_rows(x_t, 3) and float32_rows(partial, 3)
            and isinstance(rows, types.IntegerLiteral)):
        return None
    block_rows = rows.literal_value

    def codegen(context, builder, signature, args):
        w_data, (height, width) = data_and_shape(context, builder, signature.args[0], args[0])
        x_data, _ = data_and_shape(context, builder, signature.args[3], args[3])
        partial_data, (_, _, stripe) = data_and_shape(context, builder, signature.args[5], args[5])
        k_, n_, block_, column_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2, 4, 6))
        intp = width.type
        x_block = builder.gep(x_data, [builder.mul(block_, builder.mul(height, intp(block_rows)))])
        partial_block = builder.gep(partial_data, [builder.mul(block_, builder.mul(stripe, intp(block_rows)))])
        targets = [builder.gep(partial_block, [builder.add(builder.mul(intp(r), stripe), column_)])
                   for r in range(block_rows)]
        sums = [load_lanes(builder, t) for t in targets]
        last = builder.sub(height, intp(1))
        for j in range(STEP):
            row = builder.add(k_, intp(j))
            lanes = load_lanes(builder, builder.gep(w_data, [builder.add(builder.mul(row, width), n_)]))
            ahead = _smaller(builder, builder.add(row, intp(PREFETCH_STEPS * STEP)), last)
            prefetch_line(builder, builder.gep(w_data, [builder.add(builder.mul(ahead, width), n_)]))
            x_row = builder.gep(x_block, [builder.mul(row, intp(block_rows))])
            for r in range(block_rows):
                value = splat(builder, builder.load(builder.gep(x_row, [intp(r)])))
                sums[r] = builder.fadd(builder.fmul(value, lanes, flags=("fast",)), sums[r], flags=("fast",))
        for target, total in zip(targets, sums):
            store_lanes(builder, total, target)
        return context.get_dummy_value()
    return types.void(w_t, k, n, x_t, block, partial, column, rows), codegen


def _smaller(builder, a, b):
    return builder.select(builder.icmp_signed("<", a, b), a, b)
