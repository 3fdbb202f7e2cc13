"""`minitorch-infer bench` runs and reports (numbers are printed, never asserted: tests do not time)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_model

from minitorch_infer.benchmark import blas_description

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_and_reports_both_engines_and_ratios():
    require_model("story")
    done = subprocess.run([sys.executable, "-m", "minitorch_infer", "bench", "--model", "story", "--repeat", "1",
                           "--profile", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in ("minitorch-infer", "naive (reference backend)", "ours / naive", "prefill", "decode",
                     "first token", "load+compile", "peak RSS", "decode step time by op: ", "matmul (fuse_gate_up)", "kernel, 1 threads",
                     "matrix-vector bound"):
        assert expected in out, f"{expected!r} missing from:\n{out}"


def test_the_benchmark_script_measures_with_the_kernel_openblas_picks():
    require_model("story")
    if "openblas" not in blas_description():
        pytest.skip("OPENBLAS_CORETYPE only matters to OpenBLAS")
    forced = {**os.environ, "OPENBLAS_CORETYPE": "Prescott"}          # an ancient core, never picked by itself
    flags = ["--model", "story", "--repeat", "1", "--no-naive"]

    def kernel(command):
        done = subprocess.run(command + flags, capture_output=True, text=True, timeout=300, env=forced)
        assert done.returncode == 0, done.stderr
        found = re.search(r"\((.*) kernel, (\d+) threads\)", done.stdout)
        assert found, done.stdout
        return found.groups()

    assert kernel([sys.executable, "-m", "minitorch_infer", "bench", "--threads", "2"]) != kernel(
        [sys.executable, str(ROOT / "benchmarks" / "run.py")])
