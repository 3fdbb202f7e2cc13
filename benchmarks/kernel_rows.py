"""Which product is fastest for each number of rows of x: the evidence behind backends/quantized.py's choice.

    python benchmarks/kernel_rows.py [--kind q4_1] [--rows 1,2,4,8,16,32,64,128] [--threads 2]

For each of SmolLM2's matrix shapes (q|k|v, o, gate|up, down, head), times y = x · wᵀ with x of R rows five
ways, taking turns, best of 5: the weight in panels (quantized_panel_kernels, every row count on a machine
with AVX-512), the row-major direct and tiled kernels (elsewhere), tiles of up to 4 MiB dequantised and
handed to BLAS (how prefill ran above 64 rows until the tiled kernel beat it at every count), and float32
BLAS on the dequantised weight. A "whole step" line adds one step's products (30 layers and the head).
Absolute times mean little across machines; compare along a row.

Each weight is timed alone, so it stays in cache, which flatters float32 most (this machine's 105 MB L3 holds
any one float32 weight; a model's 540 MB of them stream from memory). `bench --concurrency`'s "products
bound" times a real step's chain of products in place.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from minitorch_infer.backends import quantized, quantized_kernels, thread_handover
from minitorch_infer.quantized import QuantizedPanels, QuantizedTensor, quantize

# SmolLM2-135M: [rows, cols] of each fused weight, and how many a step multiplies by.
SHAPES = {"q|k|v": ((960, 576), 30), "o": ((576, 576), 30), "gate|up": ((3072, 576), 30),
          "down": ((576, 1536), 30), "head": ((49152, 576), 1)}
WAYS = ("panels", "direct", "tiled", "dequantised+BLAS", "float32 BLAS")
DEQUANTIZED_TILE = 1 << 20       # float32 values


def dequantized_blas(x: np.ndarray, w: QuantizedTensor, y: np.ndarray):
    """y = x · wᵀ by BLAS on tiles of w's rows dequantised in turn."""
    tile_rows = max(1, min(w.shape[0], DEQUANTIZED_TILE // w.shape[1]))
    tile = np.empty((tile_rows, w.shape[1]), np.float32)
    ids = [np.arange(start, min(start + tile_rows, w.shape[0])) for start in range(0, w.shape[0], tile_rows)]
    dequantize = quantized.rows_dequantizer(w)

    def call():
        for picked in ids:
            dequantize(picked, tile[:len(picked)])
            np.matmul(x, tile[:len(picked)].T, out=y[:, picked[0]:picked[-1] + 1])
    return call


def products(kind: str, shape: tuple[int, int], rows: int, rng: np.random.Generator) -> dict:
    w = quantize(rng.standard_normal(shape).astype(np.float32), kind)
    dense = w.dequantize()
    x = rng.standard_normal((rows, shape[1])).astype(np.float32)
    y = np.empty((rows, shape[0]), np.float32)
    offsets = w.offsets
    if kind == "q8_0":
        direct = lambda: quantized_kernels.matmul_rows_q8(w.codes, w.scales, x, y, False)    # noqa: E731
        tiled = lambda: quantized_kernels.matmul_tiles_q8(w.codes, w.scales, x, y, False)    # noqa: E731
    else:
        direct = lambda: quantized_kernels.matmul_rows_q4(w.codes, w.scales, offsets, x, y, False)  # noqa: E731
        tiled = lambda: quantized_kernels.matmul_tiles_q4(w.codes, w.scales, offsets, x, y, False)  # noqa: E731
    panels = quantized.matmul(x, QuantizedPanels.of(w), y)
    blas_tiles = dequantized_blas(x, w, y)
    calls = dict(zip(WAYS, (panels, direct, tiled, blas_tiles, lambda: np.matmul(x, dense.T, out=y))))
    repeats = 3 if shape[0] > 10_000 else 20
    best = dict.fromkeys(WAYS, float("inf"))
    for call in calls.values():
        call()                                   # compile or load from the cache first
    for _ in range(5):
        for way, call in calls.items():
            # The cores go to the library that runs this way (OpenBLAS's idle workers spin for ~0.1 s after a
            # call, and took them from the Numba kernels timed next: a one-row product 10x slower).
            (thread_handover.before_blas_step if "BLAS" in way else thread_handover.before_numba_step)()
            began = time.perf_counter()
            for _ in range(repeats):
                call()
            best[way] = min(best[way], (time.perf_counter() - began) / repeats)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="q4_1", choices=("q8_0", "q4_0", "q4_1"))
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--threads", type=int, default=0, help="kernel and BLAS threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        quantized.limit_threads(args.threads)
        quantized.limit_numba_threads()          # on this thread, which calls every kernel
    rng = np.random.default_rng(0)
    print(f"{args.kind}: milliseconds per product, best of 5 " + " | ".join(WAYS))
    for rows in (int(r) for r in args.rows.split(",")):
        step = dict.fromkeys(WAYS, 0.0)
        for name, (shape, count) in SHAPES.items():
            best = products(args.kind, shape, rows, rng)
            print(f"  {rows:4d} rows  {name:8s} {shape[0]:6d} x {shape[1]:5d}  "
                  + "  ".join(f"{best[way] * 1e3:8.3f}" for way in WAYS))
            for way in WAYS:
                step[way] += best[way] * count
        print(f"  {rows:4d} rows  whole step       " + "  ".join(f"{step[way] * 1e3:8.1f}" for way in WAYS))


if __name__ == "__main__":
    main()
