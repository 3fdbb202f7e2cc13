"""backends/blas_threads.py: OpenBLAS's idle workers are stopped before a step whose products run in Numba's
threads, only where no other thread can be inside a BLAS call, and BLAS works on after."""

import os
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import minitorch_infer
from minitorch_infer.backends import blas_threads
from tests.conftest import require_model

openblas_workers = pytest.mark.skipif(
    not blas_threads._openblas_shutdowns() or (os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"),
    reason="needs OpenBLAS's own (pthreads) workers, two cores, and Linux's /proc to count threads")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _square(rng) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((384, 384)).astype(np.float32)
    return a, a.astype(np.float64) @ a.astype(np.float64)


@openblas_workers
def test_the_workers_end_and_the_next_product_starts_them_again():
    a, expected = _square(np.random.default_rng(0))
    with threadpool_limits(limits=2), blas_threads.claimed():
        a @ a                                         # OpenBLAS's workers run (and spin)
        running = _threads()
        blas_threads.stop_spinning()
        assert _threads() < running
        blas_threads.stop_spinning()                  # nothing left to stop: a no-op
        np.testing.assert_allclose(a @ a, expected, rtol=1e-4, atol=1e-3)
        assert _threads() == running


@openblas_workers
def test_another_thread_that_might_call_blas_keeps_them():
    a, _ = _square(np.random.default_rng(1))
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        with threadpool_limits(limits=2):
            a @ a
            running = _threads()
            blas_threads.stop_spinning()              # not claimed, and a second Python thread is alive
            assert _threads() == running
    finally:
        release.set()
        other.join()


def test_claimed_lasts_as_long_as_its_block():
    assert not blas_threads._claimed
    with blas_threads.claimed():
        with blas_threads.claimed():
            assert blas_threads._claimed
        assert blas_threads._claimed
    assert not blas_threads._claimed


@pytest.mark.parametrize("weights, stops", [("q8_0", True), (None, False)])
def test_a_step_stops_them_when_its_products_run_in_numba(monkeypatch, weights, stops):
    model = minitorch_infer.load(require_model("story"), weights=weights, context=64)
    calls = []
    monkeypatch.setattr(blas_threads, "stop_spinning", lambda: calls.append(1))
    model.generate("Once upon a time", max_new_tokens=3, greedy=True)
    steps = 3                                         # the prompt's prefill and two decode steps
    assert len(calls) == (steps if stops else 0)
