"""A batched step's float32 products, by BLAS and by the compiled float kernels: the evidence behind
backends/numpy.py's FLOAT_KERNEL_MAX_ROWS and FLOAT_KERNEL_MIN_BYTES.

    python benchmarks/float_rows.py [-m smollm2-135m-instruct] [--rows 1,2,4,8,16,32,64] [--turns 5] [--threads 2]

For each number of rows R, one step's chain of products (every matmul weight of the model, in the layouts it
has, each multiplied by R rows of x) runs both ways, taking turns, and prints the best and the median of the
turns and their ratio. SmolLM2's 540 MB of weights stream from memory as in a real step; the story model's
stay in cache. Each turn starts after a pause: OpenBLAS's threads spin for a while after a call, and would
take a core from the kernels' threads that follow (the engine never mixes the two in one step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np
from threadpoolctl import threadpool_limits

import minitorch_infer
from minitorch_infer.backends import float_kernels
from minitorch_infer.backends import numpy as numpy_backend

PAUSE = 0.3        # seconds: more than OpenBLAS's threads spin after a call


def product_weights(model) -> list[np.ndarray]:
    """Every weight a step multiplies by, once per use."""
    return [model.weights[node.inputs[1].name] for node in model.graph.nodes
            if node.op in ("matmul", "matmul_add") and node.inputs[1].kind == "param"]


def chains(weights: list[np.ndarray], rows: int) -> dict:
    """The step's products with `rows` rows of x, as BLAS runs them and as the float kernels do."""
    rng = np.random.default_rng(0)
    inputs = {width: rng.standard_normal((rows, width)).astype(np.float32) for width in {w.shape[1] for w in weights}}
    ways = {"BLAS": [], "float kernels": []}
    for w in weights:
        x, y = inputs[w.shape[1]], np.empty((rows, w.shape[0]), np.float32)
        scratch = np.empty((w.shape[0] + w.shape[1]) * rows, np.float32)
        ways["BLAS"].append(numpy_backend.float_product(x, w, y, scratch))
        ways["float kernels"].append(numpy_backend.compiled_float_product(x, w, y))
    return ways


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with threadpool_limits(limits=args.threads):
        numba.set_num_threads(args.threads)
        weights = product_weights(minitorch_infer.load(args.model, weights="f32"))
        misfits = [w.shape for w in weights if not float_kernels.fits(w)]
        if misfits:
            raise SystemExit(f"{args.model}: weights of shapes {sorted(set(misfits))} do not fit the float kernels")
        print(f"{args.model}, one step's products, {args.turns} turns each, ms (best / median)")
        for rows in (int(r) for r in args.rows.split(",")):
            ways = chains(weights, rows)
            seconds = {way: [] for way in ways}
            for calls in ways.values():                   # compile, or load from the cache, first
                calls[0]()
            for _ in range(args.turns):
                for way, calls in ways.items():
                    time.sleep(PAUSE)
                    began = time.perf_counter()
                    for call in calls:
                        call()
                    seconds[way].append(time.perf_counter() - began)
            blas, kernels = seconds["BLAS"], seconds["float kernels"]
            print(f"  {rows:3d} rows: BLAS {min(blas) * 1e3:8.2f} / {statistics.median(blas) * 1e3:8.2f}   "
                  f"float kernels {min(kernels) * 1e3:8.2f} / {statistics.median(kernels) * 1e3:8.2f}   "
                  f"x{statistics.median(blas) / statistics.median(kernels):.2f} faster")


if __name__ == "__main__":
    main()
