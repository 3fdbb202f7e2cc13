"""The project's benchmark, as the performance issue defines it: both models, our engine against the naive
path, 5 runs each, 2 BLAS threads, with the per-op profile.

    python benchmarks/run.py                 # any `minitorch-infer bench` flag may follow and overrides these

OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from the measured processes' environment (some machines
set them, and Haswell's kernel is half as fast here as the SkylakeX one OpenBLAS picks by itself); tests and
CI leave them alone. The output names the kernel that ran.
"""

from __future__ import annotations

import os
import subprocess
import sys

BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
DEFAULT_FLAGS = ["--repeat", "5", "--threads", "2", "--profile"]


def main(argv: list[str]) -> int:
    environment = {name: value for name, value in os.environ.items() if name not in BLAS_OVERRIDES}
    command = [sys.executable, "-m", "minitorch_infer", "bench", *DEFAULT_FLAGS, *argv]
    return subprocess.run(command, env=environment).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
