"""backends/thread_handover.py: OpenBLAS's idle workers are stopped before a step whose products run in Numba's
threads, only where no other thread can be inside a BLAS call, and BLAS works on after; Numba's OpenMP workers
are released before a step whose products run in OpenBLAS's."""

import ctypes
import os
import threading
import time

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController, threadpool_limits

import minitorch_infer
from minitorch_infer.backends import numpy as numpy_backend, thread_handover
from tests.conftest import require_model

openblas_workers = pytest.mark.skipif(not thread_handover._openblas_pools() or (os.cpu_count() or 1) < 2,
                                      reason="needs OpenBLAS's own (pthreads) workers and two cores")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _workers_running() -> list[bool]:
    """Each OpenBLAS's own flag for a running pool of workers (0 once blas_thread_shutdown_ has ended it)."""
    return [bool(ctypes.c_int.in_dll(controller.dynlib, "blas_server_avail").value)
            for controller in ThreadpoolController().lib_controllers if controller.internal_api == "openblas"]


def _openblas_threads() -> set[int]:
    return {controller.num_threads for controller in ThreadpoolController().lib_controllers
            if controller.internal_api == "openblas"}


def _square(rng) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((384, 384)).astype(np.float32)
    return a, a.astype(np.float64) @ a.astype(np.float64)


@openblas_workers
def test_the_workers_end_products_stay_on_the_calling_thread_until_a_blas_step():
    a, expected = _square(np.random.default_rng(0))
    with threadpool_limits(limits=2), thread_handover.claimed():
        a @ a                                         # OpenBLAS's workers run (and spin)
        assert any(_workers_running())
        thread_handover.before_numba_step()
        assert not any(_workers_running())
        thread_handover.before_numba_step()           # nothing left to stop: a no-op
        np.testing.assert_allclose(a @ a, expected, rtol=1e-4, atol=1e-3)
        assert not any(_workers_running())            # a Numba step's own BLAS call (attention) wakes no worker
        assert _openblas_threads() == {1}
        thread_handover.before_blas_step()
        assert _openblas_threads() == {2}
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
            thread_handover.before_numba_step()       # not claimed, and a second Python thread is alive
            assert any(_workers_running())
    finally:
        release.set()
        other.join()


def test_claimed_lasts_as_long_as_its_block():
    assert not thread_handover._claimed
    with thread_handover.claimed():
        with thread_handover.claimed():
            assert thread_handover._claimed
        assert thread_handover._claimed
    assert not thread_handover._claimed


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"),
                    reason="needs two cores, and Linux's /proc to count threads")
def test_numba_s_workers_end_before_a_blas_step_and_come_back_for_the_next_parallel_loop():
    import numba
    from numba import njit, prange

    @njit(parallel=True)
    def count_up(values):
        for i in prange(values.shape[0]):
            values[i] += 1

    values = np.zeros(64)
    limit = numba.get_num_threads()                   # the calling thread's (--threads tests lower it)
    numba.set_num_threads(2)
    try:
        count_up(values)                              # OpenMP's workers start (and spin)
        running = _threads()
        thread_handover.before_blas_step()
        assert thread_handover._numba_openmp_pauses()
        deadline = time.monotonic() + 5               # OpenMP's workers are detached: they end a moment later
        while _threads() >= running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _threads() < running
        count_up(values)
    finally:
        numba.set_num_threads(limit)
    np.testing.assert_array_equal(values, 2)


@pytest.mark.parametrize("weights, held_in_panels, numba_steps", [("q8_0", False, True), (None, False, False),
                                                                 (None, True, numpy_backend._has_avx512())])
def test_a_step_hands_the_cores_to_the_library_that_runs_its_products(monkeypatch, weights, held_in_panels,
                                                                     numba_steps):
    """Quantised weights, and float32 weights held in panels (a large model's, with AVX-512), are multiplied in
    Numba; float32 weights held as arrays (a small model's single stream), by BLAS."""
    if held_in_panels:
        monkeypatch.setattr(numpy_backend, "PANELS_MIN_BYTES", 0)
    model = minitorch_infer.load(require_model("story"), weights=weights, context=64)
    calls = []
    monkeypatch.setattr(thread_handover, "before_numba_step", lambda: calls.append("numba"))
    monkeypatch.setattr(thread_handover, "before_blas_step", lambda: calls.append("blas"))
    model.generate("Once upon a time", max_new_tokens=3, greedy=True)
    assert calls == ["numba" if numba_steps else "blas"] * 3       # the prompt's prefill and two decode steps


def test_a_long_prompt_s_attention_in_a_numba_step_gets_openblas_s_threads(monkeypatch):
    """A prompt's attention past BLAS_ATTENTION multiply-adds, in a step whose products run in Numba, hands the
    cores to OpenBLAS for that call and back after it, and computes what it computes without the handover."""
    model = minitorch_infer.load(require_model("story"), weights="q8_0", context=128)
    prompt = model.encode("Once upon a time, there was a little girl named Lily. She liked to play outside.")
    expected = model.logits(prompt)                     # below the bar: no handover
    monkeypatch.setattr(numpy_backend, "BLAS_ATTENTION", 1)
    calls = []
    monkeypatch.setattr(thread_handover, "before_numba_step", lambda: calls.append("numba"))
    monkeypatch.setattr(thread_handover, "before_blas_step", lambda: calls.append("blas"))
    np.testing.assert_allclose(model.logits(prompt), expected, rtol=1e-5, atol=1e-5)
    layers = model.config.num_layers
    assert calls == ["numba"] + ["blas", "numba"] * layers      # the step's own, then each layer's attention
