"""The NumPy backend's products and lookups on quantised weights: which compiled kernel runs, bound once.

A step with few rows (decode, a batched decode of a few sequences) runs the direct kernel, which reads each
weight byte once per row of x. With more rows (prefill) that kernel's work grows with the rows while BLAS's
does not grow as fast, so the weight is dequantised a tile of rows at a time into the node's workspace and
multiplied by BLAS: the tile is reused by every row of x while it sits in cache.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..quantized import QuantizedTensor, quantize

# Up to this many rows of x, the direct kernel; above, dequantised tiles and BLAS. Chosen on SmolLM2's shapes
# (benchmarks/quantized_kernels.py): the direct Q8_0 kernel is 3x faster than float32 BLAS at 4 rows and
# slower from about 16.
DIRECT_MAX_ROWS = 8


def _kernels():
    # Imported when first needed: Numba costs ~0.5 s and ~40 MB to import, which float32 models never pay.
    from . import quantized_kernels

    return quantized_kernels


def warm_up(kinds: set[str]) -> None:
    """Compile (or load from Numba's cache) the kernels these block types use, on tiny arrays of the types and
    layouts a program passes, so that the first step does not pay for it and load-and-compile times count it."""
    x, y = np.zeros((1, 32), np.float32), np.zeros((1, 1), np.float32)
    for kind in kinds:
        w = quantize(np.zeros((1, 32), np.float32), kind)
        matmul(x, w, y, None)()
        rows_dequantizer(w)(np.zeros(1, np.int64), np.zeros((1, 32), np.float32))
        rows_dequantizer(w)(np.zeros(1, np.int32), np.zeros((1, 32), np.float32))   # an embedding's token ids


def matmul(x: np.ndarray, w: QuantizedTensor, y: np.ndarray, scratch: np.ndarray | None,
           accumulate: bool = False) -> Callable[[], None]:
    """A call computing y = x · wᵀ, or y += x · wᵀ with accumulate (y already holds the addend)."""
    kernels = _kernels()
    if x.shape[0] <= DIRECT_MAX_ROWS:
        if w.kind == "q8_0":
            return lambda: kernels.matmul_rows_q8(w.codes, w.scales, x, y, accumulate)
        return lambda: kernels.matmul_rows_q4(w.codes, w.scales, w.offsets, x, y, accumulate)

    rows, width = w.shape
    tile_rows = max(1, min(rows, scratch.size // width))
    tile = scratch[:tile_rows * width].reshape(tile_rows, width)
    starts = range(0, rows, tile_rows)
    ids = [np.arange(start, min(start + tile_rows, rows), dtype=np.int64) for start in starts]
    dequantize = rows_dequantizer(w)

    def tiled():
        for picked in ids:
            part = tile[:len(picked)]
            dequantize(picked, part)
            product = x @ part.T
            target = y[:, picked[0]:picked[-1] + 1]
            if accumulate:
                target += product
            else:
                target[...] = product
    return tiled


def rows_dequantizer(w: QuantizedTensor) -> Callable[[np.ndarray, np.ndarray], None]:
    """`dequantize(ids, out)`: out[i] = row ids[i] of w as float32."""
    kernels = _kernels()
    if w.kind == "q8_0":
        return lambda ids, out: kernels.dequantize_rows_q8(w.codes, w.scales, ids, out)
    return lambda ids, out: kernels.dequantize_rows_q4(w.codes, w.scales, w.offsets, ids, out)


def embedding(ids: np.ndarray, table: QuantizedTensor, y: np.ndarray) -> Callable[[], None]:
    """A call writing the dequantised rows of `table` picked by `ids` into y."""
    dequantize = rows_dequantizer(table)
    return lambda: dequantize(ids, y)
