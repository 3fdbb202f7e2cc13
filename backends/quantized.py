"""The NumPy backend's products and lookups on quantised weights: which compiled kernel runs, bound once.

A weight in panels (QuantizedPanels: a program's, on a machine with AVX-512) runs quantized_panel_kernels at
every number of rows. A row-major one (QuantizedTensor): one row of x (decode) runs the direct kernel, which
reads each weight byte once and widens it in a register; more rows (a batched decode step, a prefill chunk)
run the tiled kernel: four weight rows at a time dequantised into a small float32 tile that every row of x
then multiplies.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from ..quantized import QuantizedPanels, QuantizedTensor

# Which product runs on row-major blocks, by the rows of x (SmolLM2's shapes, 2 threads, measured by
# benchmarks/kernel_rows.py): one row (decode), the direct kernel; more, tiles of dequantised rows in L1.
# Prefill once handed larger dequantised tiles to BLAS above 64 rows; since the tiles are multiplied in
# register tiles (dot_tiles) they beat that at every row count measured: SmolLM2's chain of products at 64 /
# 128 / 256 / 512 rows, Q4_1 1.7 / 1.9 / 1.6 / 1.6x, Q8_0 2.4 / 2.0 / 1.6 / 1.4x (AMD EPYC, AVX-512,
# OpenBLAS's Haswell kernel; with the kernels compiled for Haswell too, Q4_1 1.6 / 1.5 / 1.3x).
DIRECT_MAX_ROWS = 1


_thread_limit = 0                 # 0: Numba's own count (all cores)
_limited_threads: set[int] = set()


def limit_threads(threads: int) -> None:
    """Let the kernels use at most `threads` threads (0: all cores), whichever thread calls them (--threads).

    Numba's limit belongs to the calling thread, so it is applied in each thread on its first kernel call;
    setting NUMBA_NUM_THREADS instead would break a process whose Numba threads already run."""
    global _thread_limit
    _thread_limit = threads
    _limited_threads.clear()


_kernel_module = None


def _kernels():
    # Imported when first needed: Numba costs ~0.5 s and ~60 MB to import, which float32 models never pay. Kept
    # in a global: an import statement costs ~1 µs even when done, and a decode step makes ~120 calls here.
    global _kernel_module
    if _kernel_module is None:
        from . import quantized_kernels

        _kernel_module = quantized_kernels
    limit_numba_threads()
    return _kernel_module


_panel_kernel_module = None


def _panel_kernels():
    """quantized_panel_kernels, imported when a program holds quantised weights in panels (kept as _kernels)."""
    global _panel_kernel_module
    if _panel_kernel_module is None:
        from . import quantized_panel_kernels

        _panel_kernel_module = quantized_panel_kernels
    return _panel_kernel_module


def warm_up_panels() -> None:
    """Compile (or load from Numba's cache) the kernels of quantised weights in panels."""
    _panel_kernels().warm_up()


def limit_numba_threads() -> None:
    """Apply limit_threads to the calling thread, once per thread (for every kernel that runs in Numba's threads:
    these, and the panel kernels; Program.run applies it before each step that runs them)."""
    if _thread_limit and threading.get_ident() not in _limited_threads:
        import numba

        numba.set_num_threads(min(_thread_limit, numba.config.NUMBA_NUM_THREADS))
        _limited_threads.add(threading.get_ident())


def warm_up(kinds: set[str]) -> None:
    """Compile (or load from Numba's cache) the kernels these block types use, on tiny arrays of the types and
    layouts a program passes, so that the first step does not pay for it and load-and-compile times count it."""
    for kind in kinds:
        w = QuantizedTensor.zeros(kind, (1, 32))
        for rows in (1, 2):                      # the direct kernel, the tiled one
            matmul(np.zeros((rows, 32), np.float32), w, np.zeros((rows, 1), np.float32))()
        rows_dequantizer(w)(np.zeros(1, np.int64), np.zeros((1, 32), np.float32))
        rows_dequantizer(w)(np.zeros(1, np.int32), np.zeros((1, 32), np.float32))   # an embedding's token ids


def matmul(x: np.ndarray, w: QuantizedTensor | QuantizedPanels, y: np.ndarray, accumulate: bool = False
           ) -> Callable[[], None]:
    """A call computing y = x · wᵀ, or y += x · wᵀ with accumulate (y already holds the addend)."""
    if isinstance(w, QuantizedPanels):
        panels = _panel_kernels()
        if w.kind == "q8_0":
            return lambda: panels.matmul_panels_q8(w.codes, w.scales, x, y, accumulate)
        return lambda: panels.matmul_panels_q4(w.codes, w.scales, w.offsets, x, y, accumulate)
    if x.shape[0] <= DIRECT_MAX_ROWS:
        if w.kind == "q8_0":
            return lambda: _kernels().matmul_rows_q8(w.codes, w.scales, x, y, accumulate)
        return lambda: _kernels().matmul_rows_q4(w.codes, w.scales, w.offsets, x, y, accumulate)
    if w.kind == "q8_0":
        return lambda: _kernels().matmul_tiles_q8(w.codes, w.scales, x, y, accumulate)
    return lambda: _kernels().matmul_tiles_q4(w.codes, w.scales, w.offsets, x, y, accumulate)


def rows_dequantizer(w: QuantizedTensor) -> Callable[[np.ndarray, np.ndarray], None]:
    """`dequantize(ids, out)`: out[i] = row ids[i] of w as float32."""
    if w.kind == "q8_0":
        return lambda ids, out: _kernels().dequantize_rows_q8(w.codes, w.scales, ids, out)
    return lambda ids, out: _kernels().dequantize_rows_q4(w.codes, w.scales, w.offsets, ids, out)


def embedding(ids: np.ndarray, table: QuantizedTensor | QuantizedPanels, y: np.ndarray) -> Callable[[], None]:
    """A call writing the dequantised rows of `table` picked by `ids` into y."""
    if isinstance(table, QuantizedPanels):        # a table tied to the logits' weight
        panels = _panel_kernels()
        if table.kind == "q8_0":
            return lambda: panels.lookup_q8(table.codes, table.scales, ids, y)
        return lambda: panels.lookup_q4(table.codes, table.scales, table.offsets, ids, y)
    dequantize = rows_dequantizer(table)
    return lambda: dequantize(ids, y)
