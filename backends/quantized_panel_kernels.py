"""The products by quantised weights held in panels (minitorch_infer.quantized.QuantizedPanels), at any number of
rows of x, and the lookup of an embedding table's rows from them.

A panel is 16 rows of the weight with their codes interleaved: for each byte position of a block, the 16 rows'
bytes are one 16-byte line. So one load gives a value of K for all 16 rows (Q8_0), or two values (Q4_x: the
low and high nibbles), widened in vector lanes and scaled by the 16 rows' block scales into one 16-lane vector
of weights, which multiplies every row of x as in the float32 panel kernels (panel_kernels): one broadcast of
x and one FMA per row, the sums in registers for the whole of K. Row-major codes (quantized_kernels) widen each
weight row on its own and finish each product with a horizontal sum: their tiled kernel spent about half its
instructions outside the FMAs, and 16 rows of x ran at ~55% of these (SmolLM2's chain of products from
memory, AMD EPYC: Q8_0 1.77x, Q4_1 1.69x; one row 1.23x and 1.17x; 128 rows 1.15x and 1.36x).

A block of few rows keeps 2 or 4 sums per row, each taking every second or fourth value of K, so that
consecutive FMAs do not wait on each other (an FMA's result comes 4 cycles later): with weights in cache,
one row with a single sum ran 2x slower than the row-major direct kernel, and 2.2x faster with four.
Each line asks for the codes 8 KiB ahead (software prefetch), as the float32 panels ask 8 KiB ahead. SmolLM2's
decode in one process, panels against the row-major kernels: 2 KiB ahead Q8_0 0.95-0.99x and native 1.11x,
8 KiB 1.07-1.15x and 1.25x (16 KiB 1.07x and 1.21x).

Checked against dequantise-then-x·wᵀ in float64 by tests/test_quantized_panels.py.
"""

# Compiled with the helpers of fingerprint 39d855ea8b68 (vector_lanes.py; tests/test_kernel_caches.py).

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .vector_lanes import (LANES, VECTOR, data_and_shape, float32_rows, load_lanes, prefetch_line, splat,
                           store_or_add_lanes)

PREFETCH_BYTES = 8192             # how far ahead of the line it widens a block asks for the panel's codes
_BYTES = ir.VectorType(ir.IntType(8), LANES)
_WORDS = ir.VectorType(ir.IntType(32), LANES)


def warm_up() -> None:
    """Compile (or load from Numba's cache) the kernels for the types a program passes."""
    x, y, ids = np.zeros((2, 32), np.float32), np.zeros((2, 16), np.float32), np.zeros(2, np.int64)
    scales = np.zeros((1, 1, 16), np.float32)
    codes_q8, codes_q4 = np.zeros((1, 1, 32, 16), np.int8), np.zeros((1, 1, 16, 16), np.uint8)
    for rows in (1, 2):
        matmul_panels_q8(codes_q8, scales, x[:rows], y[:rows], False)
        matmul_panels_q4(codes_q4, scales, scales, x[:rows], y[:rows], False)
        matmul_panels_q4(codes_q4, scales, None, x[:rows], y[:rows], False)
    lookup_q8(codes_q8, scales, ids, x)
    lookup_q4(codes_q4, scales, scales, ids, x)
    lookup_q4(codes_q4, scales, None, ids, x)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matmul_panels_q8(codes, scales, x, y, accumulate):
    """y (+)= x · wᵀ for Q8_0 panels: codes [panels, blocks, 32, 16] int8, scales [panels, blocks, 16]."""
    x = np.ascontiguousarray(x)
    for panel in prange(codes.shape[0]):
        _panel_rows(codes, scales, None, panel, x, y, accumulate)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matmul_panels_q4(codes, scales, offsets, x, y, accumulate):
    """y (+)= x · wᵀ for Q4_x panels: codes [panels, blocks, 16, 16] uint8 (byte j of a block: value j in the low
    nibble, j + 16 in the high one), scales and offsets [panels, blocks, 16] (offsets None: Q4_0, m = -8d)."""
    x = np.ascontiguousarray(x)
    for panel in prange(codes.shape[0]):
        _panel_rows(codes, scales, offsets, panel, x, y, accumulate)


@njit(inline="always")
def _panel_rows(codes, scales, offsets, panel, x, y, accumulate):
    """Every row of x against one panel, in blocks of 16 rows, then 8, 4, 2 and 1 (a block's rows are a literal
    of the generated code)."""
    first, rows = 0, x.shape[0]
    while first < rows:
        left = rows - first
        if left >= 16:
            _panel_block(codes, scales, offsets, panel, x, first, y, 16, accumulate)
            first += 16
        elif left >= 8:
            _panel_block(codes, scales, offsets, panel, x, first, y, 8, accumulate)
            first += 8
        elif left >= 4:
            _panel_block(codes, scales, offsets, panel, x, first, y, 4, accumulate)
            first += 4
        elif left >= 2:
            _panel_block(codes, scales, offsets, panel, x, first, y, 2, accumulate)
            first += 2
        else:
            _panel_block(codes, scales, offsets, panel, x, first, y, 1, accumulate)
            first += 1


@intrinsic
def _panel_block(typingctx, codes, scales, offsets, panel, x, first, y, rows, accumulate):
    """y[first + m, 16 panel : + 16] (+)= Σ_k x[first + m, k] · w_k for m < rows (a literal), w_k the panel's 16
    weights at k, widened from its codes line by line (see the module docstring)."""
    four_bit = isinstance(codes, types.Array) and codes.dtype == types.uint8
    if not (isinstance(codes, types.Array) and codes.ndim == 4 and codes.layout == "C"
            and codes.dtype in (types.int8, types.uint8) and float32_rows(scales, 3)
            and (isinstance(offsets, types.NoneType) or (four_bit and float32_rows(offsets, 3)))
            and float32_rows(x, 2) and float32_rows(y, 2) and isinstance(rows, types.IntegerLiteral)):
        return None
    count, has_offsets = rows.literal_value, not isinstance(offsets, types.NoneType)
    sets = 4 if count <= 4 else 2 if count <= 8 else 1        # sums per row of x (see the module docstring)
    values_per_line = 2 if four_bit else 1
    lines = 32 // values_per_line                             # a block's lines of codes (a literal of the code)
    lines_per_step = max(1, sets // values_per_line)

    def codegen(context, builder, signature, args):
        codes_data, (_, blocks, _, _) = data_and_shape(context, builder, signature.args[0], args[0])
        scales_data, _ = data_and_shape(context, builder, signature.args[1], args[1])
        offsets_data = data_and_shape(context, builder, signature.args[2], args[2])[0] if has_offsets else None
        x_data, (_, x_width) = data_and_shape(context, builder, signature.args[4], args[4])
        y_data, (_, y_width) = data_and_shape(context, builder, signature.args[6], args[6])
        panel_, first_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (3, 5))
        add = context.cast(builder, args[8], signature.args[8], types.boolean)
        intp = blocks.type
        panel_codes = builder.gep(codes_data, [builder.mul(panel_, builder.mul(blocks, intp(lines * LANES)))])
        panel_scales = builder.mul(panel_, builder.mul(blocks, intp(LANES)))
        x_rows = [builder.gep(x_data, [builder.mul(builder.add(first_, intp(m)), x_width)]) for m in range(count)]
        zero = ir.Constant(VECTOR, [0.0] * LANES)
        sums = [[cgutils.alloca_once_value(builder, zero) for _ in range(count)] for _ in range(sets)]

        def multiply_rows(weights, k, which):
            for m in range(count):
                value = splat(builder, builder.load(builder.gep(x_rows[m], [k])))
                accumulator = sums[which][m]
                product = builder.fmul(value, weights, flags=("fast",))
                builder.store(builder.fadd(builder.load(accumulator), product, flags=("fast",)), accumulator)

        with cgutils.for_range(builder, blocks) as block_loop:
            block = block_loop.index
            at_scales = builder.add(panel_scales, builder.mul(block, intp(LANES)))
            scale = load_lanes(builder, builder.gep(scales_data, [at_scales]))
            if four_bit:
                offset = (load_lanes(builder, builder.gep(offsets_data, [at_scales])) if has_offsets else
                          builder.fmul(scale, ir.Constant(VECTOR, [-8.0] * LANES), flags=("fast",)))
            block_codes = builder.gep(panel_codes, [builder.mul(block, intp(lines * LANES))])
            with cgutils.for_range(builder, intp(lines // lines_per_step)) as step:
                for part in range(lines_per_step):
                    line = builder.add(builder.mul(step.index, intp(lines_per_step)), intp(part))
                    at = builder.gep(block_codes, [builder.mul(line, intp(LANES))])
                    prefetch_line(builder, builder.gep(at, [intp(PREFETCH_BYTES)]))
                    raw = builder.load(builder.bitcast(at, _BYTES.as_pointer()), align=1)
                    k = builder.add(builder.mul(block, intp(32)), line)
                    if four_bit:
                        # Both halves widened before either multiplies (widened between, 1.4x slower at 128 rows).
                        wide = builder.zext(raw, _WORDS)
                        halves = [builder.fadd(builder.fmul(builder.uitofp(nibbles, VECTOR), scale, flags=("fast",)),
                                               offset, flags=("fast",))
                                  for nibbles in (builder.and_(wide, ir.Constant(_WORDS, [15] * LANES)),
                                                  builder.lshr(wide, ir.Constant(_WORDS, [4] * LANES)))]
                        for half, weights in enumerate(halves):
                            multiply_rows(weights, builder.add(k, intp(16 * half)), (2 * part + half) % sets)
                    else:
                        weights = builder.fmul(builder.sitofp(raw, VECTOR), scale, flags=("fast",))
                        multiply_rows(weights, k, part % sets)
        column = builder.mul(panel_, intp(LANES))
        for m in range(count):
            total = builder.load(sums[0][m])
            for which in range(1, sets):
                total = builder.fadd(total, builder.load(sums[which][m]), flags=("fast",))
            target = builder.gep(y_data, [builder.add(builder.mul(builder.add(first_, intp(m)), y_width), column)])
            store_or_add_lanes(builder, total, target, add)
        return context.get_dummy_value()
    return types.void(codes, scales, offsets, panel, x, first, y, rows, accumulate), codegen


@njit(fastmath=True, cache=True, nogil=True)
def lookup_q8(codes, scales, ids, out):
    """out[t] = row ids[t] of the weight as float32 (an embedding table's lookup)."""
    for t in range(ids.shape[0]):
        panel, row = ids[t] // 16, ids[t] % 16
        for block in range(codes.shape[1]):
            d = scales[panel, block, row]
            for j in range(32):
                out[t, 32 * block + j] = np.float32(codes[panel, block, j, row]) * d


@njit(fastmath=True, cache=True, nogil=True)
def lookup_q4(codes, scales, offsets, ids, out):
    """As lookup_q8, for 4-bit codes (offsets None: Q4_0, m = -8d)."""
    for t in range(ids.shape[0]):
        panel, row = ids[t] // 16, ids[t] % 16
        for block in range(codes.shape[1]):
            d = scales[panel, block, row]
            m = np.float32(-8) * d if offsets is None else offsets[panel, block, row]
            for j in range(16):
                byte = codes[panel, block, j, row]
                out[t, 32 * block + j] = np.float32(byte & 15) * d + m
                out[t, 32 * block + j + 16] = np.float32(byte >> 4) * d + m
