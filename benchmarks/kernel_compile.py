"""Load-and-compile time of a quantised model with a cold and a warm kernel cache.

    python benchmarks/kernel_compile.py [-m smollm2-135m-instruct] [--weights native]

Each measurement is a fresh process timing `minitorch_infer.load` (which binds the program and compiles, or
loads from Numba's cache, the kernels it uses). The cold run points NUMBA_CACHE_DIR at an empty folder, so
every kernel is compiled; the warm runs reuse that folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

MEASURE = """
import time
began = time.perf_counter()
import minitorch_infer
model = minitorch_infer.load({model!r}, weights={weights!r})
print(time.perf_counter() - began)
"""


def timed_load(model: str, weights: str, cache: str) -> float:
    environment = {**os.environ, "NUMBA_CACHE_DIR": cache}
    done = subprocess.run([sys.executable, "-c", MEASURE.format(model=model, weights=weights)], env=environment,
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="smollm2-135m-instruct")
    parser.add_argument("--weights", default="native")
    parser.add_argument("--warm-runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
        cold = timed_load(args.model, args.weights, cache)
        warm = sorted(timed_load(args.model, args.weights, cache) for _ in range(args.warm_runs))
    print(f"{args.model} ({args.weights}): import + load + compile, cold kernel cache {cold:.2f} s; "
          f"warm {warm[len(warm) // 2]:.2f} s (median of {len(warm)}, {warm[0]:.2f}-{warm[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
