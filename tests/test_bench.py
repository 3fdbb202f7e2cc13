"""`minitorch-infer bench` runs and reports (numbers are printed, never asserted: tests do not time)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_model

from minitorch_infer.cli.benchmark import blas_description

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_and_reports_both_engines_and_ratios():
    require_model("story")
    done = subprocess.run([sys.executable, "-m", "minitorch_infer", "bench", "--model", "story", "--repeat", "1",
                           "--profile", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in ("minitorch-infer", "naive (reference backend)", "ours / naive", "prefill", "decode",
                     "first token", "load+compile", "peak RSS", "decode step time by op: ", "matmul (fuse_gate_up)",
                     "kernel, 1 threads", "matrix-vector bound"):
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


def test_alternating_runs_merge_into_one_measurement():
    from minitorch_infer.cli.benchmark import Measurement, merged

    first = Measurement("ours", "story", prefill_tok_s=[1.0], decode_tok_s=[2.0], first_token_ms=[3.0],
                        matvec_bound_tok_s=[4.0], load_seconds=[0.5], peak_rss_mb=50, blas="openblas")
    last = Measurement("ours", "story", prefill_tok_s=[5.0], decode_tok_s=[6.0], first_token_ms=[7.0],
                       matvec_bound_tok_s=[8.0], load_seconds=[0.7], peak_rss_mb=52, profile={"matmul": 1.0})
    both = merged([first, last])
    assert both.prefill_tok_s == [1.0, 5.0] and both.decode_tok_s == [2.0, 6.0] and both.load_seconds == [0.5, 0.7]
    assert both.matvec_bound_tok_s == [4.0, 8.0] and both.first_token_ms == [3.0, 7.0]
    assert both.peak_rss_mb == 52 and both.profile == {"matmul": 1.0} and both.blas == "openblas"


def test_bench_speculate_measures_plain_and_speculative_decoding_of_one_prompt_set():
    require_model("story")
    from minitorch_infer.cli.speculative_benchmark import measure_set, table

    measured = measure_set("free story", repeats=1)
    assert measured.identical and measured.prompts == 8
    assert len(measured.plain_tok_s) == len(measured.speculative_tok_s) == 1 and measured.speculative_tok_s[0] > 0
    assert measured.decode_steps > 0 and measured.tokens_per_step >= 1
    header, rule, row = table([measured])
    assert "x plain" in header and "accepted" in header and "tokens/step" in header
    assert row.startswith("| free story (8) | story |") and row.endswith("| yes |")


def test_bench_concurrency_takes_weight_types_in_turn_and_compares_them_run_by_run():
    """Each weight type's table, merged from one process per run, and the aggregate decode over the first type's
    at every level, from runs taken in turn."""
    require_model("story")
    done = subprocess.run([sys.executable, "-m", "minitorch_infer", "bench", "--model", "story", "--concurrency",
                           "1,2", "--repeat", "2", "--threads", "1", "--weights", "f32,q8_0"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "2 runs per level taking turns" in out and "story (f32 weights)" in out and "story (q8_0 weights)" in out
    rows = re.findall(r"^  (single stream \(generate\)|1|2) +([\d,.]+) tok/s", out, re.MULTILINE)
    assert [level for level, _ in rows] == ["single stream (generate)", "1", "2"] * 2
    assert all(float(speed.replace(",", "")) > 0 for _, speed in rows)
    compared = re.search(r"aggregate decode / f32's, median of 2 runs taken in turn: single ([\d.]+)x, "
                         r"1 ([\d.]+)x, 2 ([\d.]+)x", out)
    assert compared, out
    assert all(0.1 < float(ratio) < 20 for ratio in compared.groups())


def test_concurrency_runs_merge_level_by_level():
    from minitorch_infer.cli.batch_benchmark import LevelMeasurement, merged, versus

    def run(*speeds):
        return [LevelMeasurement(level, aggregate_tok_s=[speed], first_token_ms=[1.0], kv_in_use_mib=level / 10)
                for level, speed in zip((0, 4), speeds)]

    ours = merged([run(10.0, 40.0), run(20.0, 60.0)])
    assert [m.aggregate_tok_s for m in ours] == [[10.0, 20.0], [40.0, 60.0]]
    assert ours[1].first_token_ms == [1.0, 1.0] and ours[1].kv_in_use_mib == 0.4
    baseline = merged([run(5.0, 40.0), run(20.0, 20.0)])
    # Run by run: single 2x and 1x (median 1.5x), 4 streams 1x and 3x (median 2x).
    assert versus(ours, baseline, "f32's").endswith("single 1.50x, 4 2.00x")
