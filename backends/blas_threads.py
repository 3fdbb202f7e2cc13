"""Stopping OpenBLAS's idle worker threads before a step whose products run in Numba's threads.

After each call OpenBLAS leaves its workers spinning for 2**28 clock ticks (~0.13 s on a 2 GHz clock) before
they sleep. A step that runs Numba's parallel kernels in that time (quantised weights, a float32 batch) wants
every core, and with a worker still spinning, three busy threads share two cores: Numba's parallel loops wait
for the scheduler, whole ticks at a time. On a 2-core machine, a quantised SmolLM2 decode token right after the
prompt's prefill took 20-100 ms instead of 13, and the first 16-sequence float32 step after a prefill step
150-170 ms instead of 55-75. OpenBLAS's own blas_thread_shutdown_ (which it runs around fork) ends the workers
at once; the next BLAS call starts them again. Each costs ~0.1 ms, and `stop_spinning` costs ~1 µs when the
workers are already stopped.

The shutdown is safe only while no other thread is inside a BLAS call, so it runs only in a process whose other
threads are known not to call BLAS: one with a single Python thread, or one whose entry point said so for
as long as it runs (`claimed()`: the minitorch-infer command). Elsewhere, and with any BLAS but OpenBLAS's own
threads, it does nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_shutdowns: list | None = None      # found on first use: threadpoolctl's scan of the loaded libraries takes ~ms
_claimed = False


@contextmanager
def claimed() -> Iterator[None]:
    """While inside: in this process only the thread that steps models calls BLAS (the command-line tools)."""
    global _claimed
    outer, _claimed = _claimed, True
    try:
        yield
    finally:
        _claimed = outer


def stop_spinning() -> None:
    """End OpenBLAS's worker threads now, if it is safe to (see the module's docstring)."""
    if not (_claimed or threading.active_count() == 1):
        return
    for shutdown in _openblas_shutdowns():
        shutdown()


def _openblas_shutdowns() -> list:
    global _shutdowns
    if _shutdowns is None:
        from threadpoolctl import ThreadpoolController

        # pthreads only: an OpenMP build of OpenBLAS runs in OpenMP's threads, which are not its to stop.
        _shutdowns = [controller.dynlib.blas_thread_shutdown_ for controller in ThreadpoolController().lib_controllers
                      if controller.internal_api == "openblas" and controller.threading_layer == "pthreads"
                      and hasattr(controller.dynlib, "blas_thread_shutdown_")]
    return _shutdowns
