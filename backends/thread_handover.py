"""Handing the cores over between OpenBLAS's threads and Numba's, whose idle workers spin for a while.

After each call OpenBLAS leaves its workers spinning for 2**28 clock ticks (~0.13 s on a 2 GHz clock), and
Numba's OpenMP workers spin for some milliseconds after each parallel loop. A step that runs the other
library's threads in that time shares the cores with the spinning ones, and its threads wait for the
scheduler, whole ticks at a time. On a 2-core machine: a quantised SmolLM2 decode token right after the
prompt's prefill took 20-100 ms instead of 13; the first 16-sequence float32 step after a prefill step 139-185
ms instead of 53-73; the story model's prefill right after a batched step 5-17 ms instead of 2.

So before each step the backend ends the other side's idle workers, and the next call of that library starts
them again (~0.1 ms each way; a call with nothing to end costs ~1 µs):
- `before_numba_step` runs OpenBLAS's own blas_thread_shutdown_, and holds OpenBLAS to the calling thread
  until the next BLAS step (openblas_set_num_threads(1)): a Numba step may still call BLAS between its
  products (a prompt's attention), and a call on OpenBLAS's threads would wake them to spin through the
  products that follow. Prompts prefilled one after another, their products in panel kernels: the story
  model's 128 tokens took 9.1 ms with OpenBLAS's two threads and 0.50 with one; SmolLM2 float32's 512 tokens
  1,851 and 411 ms. (Late in a long prompt, where one attention call outweighs a handover, the attention
  kernel hands the cores to OpenBLAS and back around that call: numpy.BLAS_ATTENTION.) That is safe only
  while no other thread is inside a BLAS call, so it runs only in a process whose other threads are known
  not to call BLAS: one with a single Python thread, or one whose entry point said so for as long as it
  runs (`claimed()`: the minitorch-infer command). Elsewhere, and with any BLAS but OpenBLAS's own threads,
  it does nothing.
- `before_blas_step` pauses OpenMP (omp_pause_resource_all), which ends the workers of the calling thread's
  own parallel loops only, so it is safe whatever other threads do, and gives OpenBLAS back the threads
  before_numba_step took.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

OMP_PAUSE_SOFT = 1                   # omp_pause_resource_t: release the threads, keep what is cheap to keep

_openblas_pools_found: list | None = None  # found on first use: threadpoolctl's scan of the loaded libraries takes ~ms
_openmp_pauses: list | None = None
_claimed = False
_held_threads: list = []             # (OpenBLAS pool, its thread count) while before_numba_step holds it to one


@contextmanager
def claimed() -> Iterator[None]:
    """While inside: in this process only the thread that steps models calls BLAS (the command-line tools)."""
    global _claimed
    outer, _claimed = _claimed, True
    try:
        yield
    finally:
        _claimed = outer


def before_numba_step() -> None:
    """End OpenBLAS's worker threads now and keep its calls on the calling thread until before_blas_step, if it
    is safe to (see the module's docstring)."""
    if not (_claimed or threading.active_count() == 1):
        return
    for pool in _openblas_pools():
        threads = pool.get_threads()
        if threads != 1:
            _held_threads.append((pool, threads))
            pool.set_threads(1)
        pool.shutdown()


def before_blas_step() -> None:
    """End the OpenMP workers Numba's parallel loops left behind on this thread; give OpenBLAS back its threads."""
    for pause in _numba_openmp_pauses():
        pause(OMP_PAUSE_SOFT)
    while _held_threads:
        pool, threads = _held_threads.pop()
        pool.set_threads(threads)


class _OpenBLASPool(NamedTuple):
    """The calls into one OpenBLAS library that manage its threads."""

    shutdown: Callable[[], None]
    get_threads: Callable[[], int]
    set_threads: Callable[[int], None]


def _openblas_pools() -> list[_OpenBLASPool]:
    global _openblas_pools_found
    if _openblas_pools_found is None:
        _openblas_pools_found = []
        for controller in _libraries("openblas"):
            dynlib = controller.dynlib
            calls = (getattr(dynlib, "blas_thread_shutdown_", None), _affixed(dynlib, "openblas_get_num_threads"),
                     _affixed(dynlib, "openblas_set_num_threads"))
            # pthreads only: an OpenMP build of OpenBLAS runs in OpenMP's threads, which are not its to stop.
            if controller.threading_layer == "pthreads" and all(calls):
                _openblas_pools_found.append(_OpenBLASPool(*calls))
    return _openblas_pools_found


def _affixed(dynlib, name: str):
    """dynlib's function `name`, under the prefix and suffix its build gave it (NumPy's wheels: scipy_…64_)."""
    for prefix in ("", "scipy_"):
        for suffix in ("", "64_", "_64"):
            function = getattr(dynlib, f"{prefix}{name}{suffix}", None)
            if function is not None:
                return function
    return None


def _numba_openmp_pauses() -> list:
    global _openmp_pauses
    if _openmp_pauses is None:
        if "numba.np.ufunc.omppool" not in sys.modules:
            return []                    # Numba has run no parallel loop on OpenMP yet: nothing spins
        _openmp_pauses = [controller.dynlib.omp_pause_resource_all for controller in _libraries("openmp")
                          if hasattr(controller.dynlib, "omp_pause_resource_all")]
    return _openmp_pauses


def _libraries(internal_api: str) -> list:
    from threadpoolctl import ThreadpoolController

    return [c for c in ThreadpoolController().lib_controllers if c.internal_api == internal_api]
