"""`minitorch-infer bench` runs and reports (numbers are printed, never asserted: tests do not time)."""

import subprocess
import sys

from conftest import require_model


def test_bench_runs_and_reports_both_engines_and_ratios():
    require_model("story")
    done = subprocess.run([sys.executable, "-m", "minitorch_infer", "bench", "--model", "story", "--repeat", "1",
                           "--profile", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in ("minitorch-infer", "naive (reference backend)", "ours / naive", "prefill", "decode",
                     "first token", "load+compile", "peak RSS", "decode step time by op: matmul", "kernel, 1 threads"):
        assert expected in out, f"{expected!r} missing from:\n{out}"
