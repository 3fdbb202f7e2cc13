"""`eval`: sliding windows, perplexity against transformers' on the same windows (tests/fixtures/perplexity.json,
made by tests/oracle/make_perplexity_fixture.py), and the comparison with a reference weight type."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import minitorch_infer
from minitorch_infer.errors import MinitorchError
from minitorch_infer.evaluation import evaluate, sliding_windows

from conftest import require_model

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "perplexity.json").read_text())


@given(tokens=st.integers(2, 300), context=st.integers(2, 64), data=st.data())
def test_windows_score_each_token_at_most_once_and_all_when_they_overlap(tokens, context, data):
    stride = data.draw(st.integers(1, context))
    windows = sliding_windows(tokens, context, stride)
    scored = [i for w in windows for i in range(w.begin + w.first_scored, w.end)]
    assert len(scored) == len(set(scored))
    assert windows[0].begin == 0 and windows[-1].end == tokens
    assert all(0 < w.end - w.begin <= context and w.first_scored >= 1 for w in windows)
    if stride < context:
        assert sorted(scored) == list(range(1, tokens))


def test_bad_windows_are_refused():
    with pytest.raises(MinitorchError, match="stride <= context"):
        sliding_windows(100, 16, 32)
    with pytest.raises(MinitorchError, match="at least 2"):
        sliding_windows(1, 16, 8)


@pytest.mark.parametrize("name", ["story", "smollm2-135m-instruct"])
def test_float_perplexity_equals_transformers(name):
    require_model(name)
    case = FIXTURE[name]
    model = minitorch_infer.load(name, weights="f32", context=case["context"])
    report = evaluate(model, case["ids"], case["context"], case["stride"])
    assert report.perplexity == pytest.approx(case["perplexity"], rel=1e-3)
    assert report.scored == len(case["ids"]) - 1


def test_a_model_against_itself_agrees_everywhere():
    model = minitorch_infer.load("story", context=64)
    ids = FIXTURE["story"]["ids"][:150]
    report = evaluate(model, ids, 64, 32, reference=model)
    assert report.kl_mean == pytest.approx(0, abs=1e-9) and report.top1_agreement == 1.0
    assert report.reference_perplexity == pytest.approx(report.perplexity)


def test_eval_command_reports_json_against_a_reference():
    done = subprocess.run([sys.executable, "-m", "minitorch_infer", "eval", "--weights", "q8_0",
                           "--reference-weights", "f32", "--context", "64", "--max-tokens", "200", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["weights"] == "q8_0" and report["reference_weights"] == "f32"
    assert report["tokens"] == 200 and report["scored"] == 199 and report["windows"] == 6
    assert 0 < report["kl_mean"] < 0.01 and report["top1_agreement"] > 0.9
    assert report["perplexity"] == pytest.approx(report["reference_perplexity"], rel=0.05)


def test_eval_command_names_a_missing_file():
    done = subprocess.run([sys.executable, "-m", "minitorch_infer", "eval", "no/such.txt"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "no text file at no/such.txt" in done.stderr
