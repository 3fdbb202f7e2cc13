"""backends/blas_threads.py: OpenBLAS's idle workers are stopped before a step whose products run in Numba's
threads, only where no other thread can be inside a BLAS call, and BLAS works on after."""

import ctypes
import os
import threading

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController, threadpool_limits

import minitorch_infer
from minitorch_infer.backends import blas_threads
from tests.conftest import require_model

openblas_workers = pytest.mark.skipif(not blas_threads._openblas_shutdowns() or (os.cpu_count() or 1) < 2,
                                      reason="needs OpenBLAS's own (pthreads) workers and two cores")


def _workers_running() -> list[bool]:
    """Each OpenBLAS's own flag for a running pool of workers (0 once blas_thread_shutdown_ has ended it)."""
    return [bool(ctypes.c_int.in_dll(controller.dynlib, "blas_server_avail").value)
            for controller in ThreadpoolController().lib_controllers if controller.internal_api == "openblas"]


def _square(rng) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((384, 384)).astype(np.float32)
    return a, a.astype(np.float64) @ a.astype(np.float64)


@openblas_workers
def test_the_workers_end_and_the_next_product_starts_them_again():
    a, expected = _square(np.random.default_rng(0))
    with threadpool_limits(limits=2), blas_threads.claimed():
        a @ a                                         # OpenBLAS's workers run (and spin)
        assert any(_workers_running())
        blas_threads.stop_spinning()
        assert not any(_workers_running())
        blas_threads.stop_spinning()                  # nothing left to stop: a no-op
        np.testing.assert_allclose(a @ a, expected, rtol=1e-4, atol=1e-3)
        assert any(_workers_running())


@openblas_workers
def test_another_thread_that_might_call_blas_keeps_them():
    a, _ = _square(np.random.default_rng(1))
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        with threadpool_limits(limits=2):
            a @ a
            blas_threads.stop_spinning()              # not claimed, and a second Python thread is alive
            assert any(_workers_running())
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
