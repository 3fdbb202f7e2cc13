"""A step's float32 products, by OpenBLAS and by the panel kernels: the evidence behind backends/numpy.py's
params_held_in_panels and Program.batch_panels (float32 weights in panels on a machine with AVX-512).

    python benchmarks/panel_products.py [-m smollm2-135m-instruct] [--rows 1,4,16,64,256] [--turns 5] [--threads 2]

For each number of rows R, one step's chain of products (every matmul weight of the model, each multiplied
by R rows of x) runs both ways, taking turns: BLAS on the weights as a machine without AVX-512 holds them
(the packed q|k|v and gate|up column-major), and the panel kernels on the same weights in panels. It prints
the best and the median of the turns and their ratio. SmolLM2's 540 MB of weights stream from memory as in
a real step; the story model's stay in cache. Before each turn the cores are handed over to the library that
runs it, as the engine does before a step (backends/thread_handover.py: OpenBLAS's threads spin for a while
after a call, and would take a core from the kernels' threads that follow), and the chain runs once untimed,
so that the timed run finds its threads awake, as a step among steps does. (Pausing instead let this VM's idle
cores sleep: the story model's 0.2 ms chain then took 7-12 ms.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np
from threadpoolctl import threadpool_limits

import minitorch_infer
from minitorch_infer.backends import numpy as numpy_backend, thread_handover
from minitorch_infer.panelled import PanelledWeight

HANDOVER = {"BLAS": thread_handover.before_blas_step, "panels": thread_handover.before_numba_step}


def plain_weights(model_name: str) -> list[np.ndarray]:
    """Every weight a step multiplies by, once per use, held as arrays (the model loaded without panels)."""
    in_panels, numpy_backend._has_avx512 = numpy_backend._has_avx512, lambda: False
    try:
        model = minitorch_infer.load(model_name, weights="f32")
    finally:
        numpy_backend._has_avx512 = in_panels
    return [model.weights[node.inputs[1].name] for node in model.graph.nodes
            if node.op in ("matmul", "matmul_add") and node.inputs[1].kind == "param"]


def chains(weights: list[np.ndarray], panelled: dict[int, PanelledWeight], rows: int) -> dict:
    """The step's products with `rows` rows of x, as BLAS runs them and as the panel kernels do."""
    rng = np.random.default_rng(0)
    inputs = {width: rng.standard_normal((rows, width)).astype(np.float32) for width in {w.shape[1] for w in weights}}
    ways = {"BLAS": [], "panels": []}
    for w in weights:
        x, y = inputs[w.shape[1]], np.empty((rows, w.shape[0]), np.float32)
        scratch = np.empty((w.shape[0] + w.shape[1]) * rows, np.float32)
        ways["BLAS"].append(numpy_backend.float_product(x, w, y, scratch))
        ways["panels"].append(numpy_backend.panel_product(x, panelled[id(w)], y))
    return ways


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", default="1,4,16,64,256")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with threadpool_limits(limits=args.threads):
        numba.set_num_threads(args.threads)
        weights = plain_weights(args.model)
        panelled = {id(w): PanelledWeight.of(w) for w in weights}
        print(f"{args.model}, one step's products, {args.turns} turns each, ms (best / median)")
        for rows in (int(r) for r in args.rows.split(",")):
            ways = chains(weights, panelled, rows)
            seconds = {way: [] for way in ways}
            for _ in range(args.turns):
                for way, calls in ways.items():
                    HANDOVER[way]()
                    for call in calls:                    # wakes the threads (and compiles, the first time)
                        call()
                    began = time.perf_counter()
                    for call in calls:
                        call()
                    seconds[way].append(time.perf_counter() - began)
            blas, panels = seconds["BLAS"], seconds["panels"]
            print(f"  {rows:3d} rows: BLAS {min(blas) * 1e3:8.3f} / {statistics.median(blas) * 1e3:8.3f}   "
                  f"panels {min(panels) * 1e3:8.3f} / {statistics.median(panels) * 1e3:8.3f}   "
                  f"x{statistics.median(blas) / statistics.median(panels):.2f} faster")


if __name__ == "__main__":
    main()
