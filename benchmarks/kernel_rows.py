"""Which product is fastest for each number of rows of x: the evidence behind backends/quantized.py's choice.

    python benchmarks/kernel_rows.py [--kind q4_1] [--rows 1,2,4,8,16,32,64,128] [--threads 2]

For each of SmolLM2's matrix shapes (q|k|v, o, gate|up, down, head), times y = x · wᵀ with x of R rows four
ways, taking turns, best of 5: the direct kernel, the tiled kernel, a dequantised tile handed to BLAS, and
float32 BLAS on the dequantised weight (what the float32 model runs). A "whole step" line adds one step's
products (30 layers and the head). Absolute times mean little across machines; compare along a row.

Each weight is timed alone, so it stays in cache, which flatters float32 most (this machine's 105 MB L3 holds
any one float32 weight; a model's 540 MB of them stream from memory). `bench --concurrency`'s "products
bound" times a real step's chain of products in place.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from minitorch_infer.backends import quantized, quantized_kernels
from minitorch_infer.ir.ops import DEQUANTIZED_TILE
from minitorch_infer.quantized import quantize

# SmolLM2-135M: [rows, cols] of each fused weight, and how many a step multiplies by.
SHAPES = {"q|k|v": ((960, 576), 30), "o": ((576, 576), 30), "gate|up": ((3072, 576), 30),
          "down": ((576, 1536), 30), "head": ((49152, 576), 1)}
WAYS = ("direct", "tiled", "dequantised+BLAS", "float32 BLAS")


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
    blas_tiles = quantized.dequantized_blas(x, w, y, np.empty(DEQUANTIZED_TILE, np.float32))
    calls = dict(zip(WAYS, (direct, tiled, blas_tiles, lambda: np.matmul(x, dense.T, out=y))))
    repeats = 3 if shape[0] > 10_000 else 20
    best = dict.fromkeys(WAYS, float("inf"))
    for call in calls.values():
        call()                                   # compile or load from the cache first
    for _ in range(5):
        for way, call in calls.items():
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
