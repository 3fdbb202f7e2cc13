"""A register tile of four weight rows by four rows of x, for the quantised tiled kernels (quantized_kernels'
matmul_tiles_*), which dequantise four weight rows into a float32 tile in L1 and multiply it by x here.

`dot_tile` keeps 16 accumulators of 16 lanes along K in registers, one per (row of x, weight row), so that
each loaded vector serves four products, and finishes them with vector_lanes' shuffle tree. x is read as whole
tiles of rows (`padded_rows`), and the tile's sums are stored only where y has rows and columns (`store_tile`).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .vector_lanes import (LANES, VECTOR, accumulate_lanes, data_and_shape, float32_rows, load_lanes, row_sums,
                           store_lanes)

TILE = 4                 # weight rows and rows of x in a tile


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
def dot_tile(typingctx, w, n, x, m, sums, x_rows):
    """sums[4i + j] = x[m + i] · w[n + j] for i < x_rows, j < 4 (x_rows a literal, 2 or 4; the other lanes of sums
    are 0): an accumulator of 16 lanes per product along the rows (whose length must be a multiple of 16),
    finished by the shuffle tree."""
    if not (float32_rows(w, 2) and float32_rows(x, 2) and isinstance(x_rows, types.IntegerLiteral)):
        return None
    products = x_rows.literal_value

    def codegen(context, builder, signature, args):
        w_data, (_, width) = data_and_shape(context, builder, signature.args[0], args[0])
        x_data, _ = data_and_shape(context, builder, signature.args[2], args[2])
        n_, m_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 3))
        intp = width.type

        def row(data, index):
            return builder.gep(data, [builder.mul(index, width)])
        w_rows = [row(w_data, builder.add(n_, intp(j))) for j in range(TILE)]
        x_rows_ = [row(x_data, builder.add(m_, intp(i))) for i in range(products)]
        zero = ir.Constant(VECTOR, [0.0] * LANES)
        accumulators = [[cgutils.alloca_once_value(builder, zero) for _ in range(TILE)] for _ in range(products)]
        with cgutils.for_range(builder, builder.udiv(width, intp(LANES))) as loop:
            at = builder.mul(loop.index, intp(LANES))
            ws = [load_lanes(builder, builder.gep(p, [at])) for p in w_rows]
            xs = [load_lanes(builder, builder.gep(p, [at])) for p in x_rows_]
            for i in range(products):
                for j in range(TILE):
                    accumulate_lanes(builder, accumulators[i][j], xs[i], ws[j])
        totals = [builder.load(a) for line in accumulators for a in line]
        sums_ = row_sums(builder, totals + [zero] * (LANES - len(totals)))
        store_lanes(builder, sums_, args[4])
        return context.get_dummy_value()
    return types.void(w, n, x, m, sums, x_rows), codegen
