"""The NumPy backend's products and lookups on quantised weights: which compiled kernel runs, bound once.

A step with few rows (decode, a batched decode of a few sequences) runs the direct kernel, which reads each
weight byte once per row of x. With more rows (prefill) that kernel's work grows with the rows while BLAS's
does not grow as fast, so the weight is dequantised a tile of rows at a time into the node's workspace and
multiplied by BLAS: the tile is reused by every row of x while it sits in cache.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from ..quantized import QuantizedTensor, quantize

# Up to this many rows of x (a batched decode step of 16 sequences), the direct kernel; above, dequantised
# tiles and BLAS. On SmolLM2's shapes the direct kernel costs about what float32 BLAS does at 16 rows, while
# the tiles pay a whole weight's dequantisation each step, which only a prefill's many rows amortise.
DIRECT_MAX_ROWS = 16


_thread_limit = 0                 # 0: Numba's own count (all cores)
_limited_threads: set[int] = set()


def limit_threads(threads: int) -> None:
    """Let the kernels use at most `threads` threads (0: all cores), whichever thread calls them (--threads).

    Numba's limit belongs to the calling thread, so it is applied in each thread on its first kernel call;
    setting NUMBA_NUM_THREADS instead would break a process whose Numba threads already run."""
    global _thread_limit
    _thread_limit = threads
    _limited_threads.clear()


def _kernels():
    # Imported when first needed: Numba costs ~0.5 s and ~60 MB to import, which float32 models never pay.
    from . import quantized_kernels

    if _thread_limit and threading.get_ident() not in _limited_threads:
        import numba

        numba.set_num_threads(min(_thread_limit, numba.config.NUMBA_NUM_THREADS))
        _limited_threads.add(threading.get_ident())
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
    if x.shape[0] <= DIRECT_MAX_ROWS:
        if w.kind == "q8_0":
            return lambda: _kernels().matmul_rows_q8(w.codes, w.scales, x, y, accumulate)
        return lambda: _kernels().matmul_rows_q4(w.codes, w.scales, w.offsets, x, y, accumulate)

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
    if w.kind == "q8_0":
        return lambda ids, out: _kernels().dequantize_rows_q8(w.codes, w.scales, ids, out)
    return lambda ids, out: _kernels().dequantize_rows_q4(w.codes, w.scales, w.offsets, ids, out)


def embedding(ids: np.ndarray, table: QuantizedTensor, y: np.ndarray) -> Callable[[], None]:
    """A call writing the dequantised rows of `table` picked by `ids` into y."""
    dequantize = rows_dequantizer(table)
    return lambda: dequantize(ids, y)
