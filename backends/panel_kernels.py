"""The products by float32 weights on a machine with AVX-512: y = x · wᵀ from w's panels, for any number of rows.

A weight w [N, K] is held in panels of 16 rows, [N / 16, K, 16] (minitorch_infer.panelled), so that one panel is
K lines of 64 bytes read in order, and a panel's 16 outputs for up to 16 rows of x stay in 16 registers for the
whole of K: per value of K, one load of the panel's line and 16 values of x broadcast, 16 FMAs, nothing stored
until the end (more rows of x: the panel again, from cache, for each further block of 16). Each step also asks
for the line PREFETCH_AHEAD values of K on (software prefetch), and at a panel's end for the next panel's first
lines. SmolLM2's chain of products at 16 rows, one process taking turns (AMD EPYC, 2 cores): 24.6 ms without
asking, 13.0 asking 64 lines ahead, 11.4 asking 128 (256 and 384 no better); at one row 8.0-8.4 ms either way.

Against OpenBLAS (0.3.31, SkylakeX kernel) on the same machine, one step's chain of float32 products
(benchmarks/panel_products.py, medians of five turns): SmolLM2 at 1 / 4 / 16 / 64 / 256 rows 1.44 / 3.83 / 4.12
/ 2.21 / 1.94x faster; the story model, whose weights stay in cache, 1.23 / 3.68 / 2.56 / 1.92 / 1.80x. At 16
rows they ran 1.7x faster than the compiled kernels that read SmolLM2's weights in their own layouts did:
walking 16 columns down a column-major weight, one line a page, runs at half BLAS's speed, and the panels are
one contiguous stream per thread, which the hardware and the prefetches keep ahead of.

Products of at least PARALLEL_PRODUCTS multiply-adds share their panels among Numba's threads; the smallest
run on the calling thread. Alone, with Numba's threads asleep, sharing out the story model's gate|up (768 x
128, 16 rows) took 48 µs against 36 on one thread: waking them costs more than half the product. In a run of
batched steps they never sleep (each step's attention and logits keep them spinning), and there sharing out
every product down to its o projection (128 x 128) ran the story model's 16-sequence graph 1.09-1.10x faster
(one process, taking turns with the old threshold; 736 against 670-680 µs).
Checked against x · wᵀ in float64 by tests/test_panel_kernels.py.
"""

# Compiled with the helpers of fingerprint 39d855ea8b68 (vector_lanes.py; tests/test_kernel_caches.py).

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..panelled import PanelledWeight
from .vector_lanes import (LANES, VECTOR, data_and_shape, float32_rows, load_lanes, prefetch_line, splat,
                           store_or_add_lanes)

PARALLEL_PRODUCTS = 1 << 18       # rows × N × K from which a product shares its panels among threads
PREFETCH_AHEAD = 128              # lines of a panel (values of K) between the one multiplied and the one asked for


def product(x: np.ndarray, w_panels: np.ndarray):
    """The kernel for y = x · wᵀ: shared among threads when large enough to gain from it."""
    multiply_adds = x.shape[0] * w_panels.shape[0] * LANES * w_panels.shape[1]
    return matmul_panels_threaded if multiply_adds >= PARALLEL_PRODUCTS else matmul_panels


def warm_up() -> None:
    """Compile (or load from Numba's cache) both kernels for the types a program passes."""
    w_panels = PanelledWeight.of(np.zeros((16, 8), np.float32)).panels
    for kernel in (matmul_panels, matmul_panels_threaded):
        kernel(w_panels, np.zeros((2, 8), np.float32), np.zeros((2, 16), np.float32), False)


@njit(fastmath=True, cache=True, nogil=True)
def matmul_panels(w_panels, x, y, accumulate):
    """y (+)= x · wᵀ from w's panels, on the calling thread."""
    x = np.ascontiguousarray(x)               # the blocks read rows of x as runs of K values
    for panel in range(w_panels.shape[0]):
        _panel_rows(w_panels, panel, x, y, accumulate)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matmul_panels_threaded(w_panels, x, y, accumulate):
    """matmul_panels with the panels shared out among Numba's threads."""
    x = np.ascontiguousarray(x)
    for panel in prange(w_panels.shape[0]):
        _panel_rows(w_panels, panel, x, y, accumulate)


@njit(inline="always")
def _panel_rows(w_panels, panel, x, y, accumulate):
    """Every row of x against one panel, in blocks of 16 rows, then 8, 4, 2 and 1 for what is left: a block's
    rows are a literal of the generated code, and a block never reads past the last row."""
    first, rows = 0, x.shape[0]
    while first < rows:
        left = rows - first
        if left >= 16:
            _panel_block(w_panels, panel, x, first, y, 16, accumulate)
            first += 16
        elif left >= 8:
            _panel_block(w_panels, panel, x, first, y, 8, accumulate)
            first += 8
        elif left >= 4:
            _panel_block(w_panels, panel, x, first, y, 4, accumulate)
            first += 4
        elif left >= 2:
            _panel_block(w_panels, panel, x, first, y, 2, accumulate)
            first += 2
        else:
            _panel_block(w_panels, panel, x, first, y, 1, accumulate)
            first += 1


@intrinsic
def _panel_block(typingctx, w_panels, panel, x, first, y, rows, accumulate):
    """y[first + m, 16 panel : + 16] (+)= Σ_k x[first + m, k] · w_panels[panel, k] for m < rows (a literal): one
    accumulator of 16 lanes per row of x, kept in a register across K."""
    if not (float32_rows(w_panels, 3) and float32_rows(x, 2) and float32_rows(y, 2)
            and isinstance(rows, types.IntegerLiteral)):
        return None
    count = rows.literal_value

    def codegen(context, builder, signature, args):
        panels_data, (_, width, _) = data_and_shape(context, builder, signature.args[0], args[0])
        x_data, (_, x_width) = data_and_shape(context, builder, signature.args[2], args[2])
        y_data, (_, y_width) = data_and_shape(context, builder, signature.args[4], args[4])
        panel_, first_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 3))
        add = context.cast(builder, args[6], signature.args[6], types.boolean)
        intp = width.type
        panel_start = builder.gep(panels_data, [builder.mul(panel_, builder.mul(width, intp(LANES)))])
        x_rows = [builder.gep(x_data, [builder.mul(builder.add(first_, intp(m)), x_width)]) for m in range(count)]
        zero = ir.Constant(VECTOR, [0.0] * LANES)
        sums = [cgutils.alloca_once_value(builder, zero) for _ in range(count)]
        with cgutils.for_range(builder, width) as loop:
            lanes = load_lanes(builder, builder.gep(panel_start, [builder.mul(loop.index, intp(LANES))]))
            # Past the panel's end this asks for the next panel's first lines, which the same thread multiplies
            # next; past the last panel, for lines a prefetch may name without faulting.
            ahead = builder.add(loop.index, intp(PREFETCH_AHEAD))
            prefetch_line(builder, builder.gep(panel_start, [builder.mul(ahead, intp(LANES))]))
            for m in range(count):
                value = splat(builder, builder.load(builder.gep(x_rows[m], [loop.index])))
                product_ = builder.fmul(value, lanes, flags=("fast",))
                builder.store(builder.fadd(builder.load(sums[m]), product_, flags=("fast",)), sums[m])
        column = builder.mul(panel_, intp(LANES))
        for m in range(count):
            target = builder.gep(y_data, [builder.add(builder.mul(builder.add(first_, intp(m)), y_width), column)])
            store_or_add_lanes(builder, builder.load(sums[m]), target, add)
        return context.get_dummy_value()
    return types.void(w_panels, panel, x, first, y, rows, accumulate), codegen
