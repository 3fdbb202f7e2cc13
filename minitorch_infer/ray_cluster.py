"""Joining a Ray cluster for the `--ray` commands: Ray is an optional extra, imported only here and only then.

Without `--address` a local cluster is started for the command and shut down after it; with one, the
command joins that cluster (`auto` finds the one `ray start --head` made on this machine) and leaves it
running. A cluster some caller already joined (a notebook, a test) is used as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

from .errors import MinitorchError

RAY_MISSING = "--ray needs Ray, an optional extra: pip install 'minitorch-infer[ray]'"
# A local cluster's shared-memory object store. Prompts and results are small, so a small store leaves the
# machine's memory to the models (Ray would take 30% of it by default).
LOCAL_OBJECT_STORE_BYTES = 200 * 1024 * 1024
CONNECT_SECONDS = 5


def import_ray():
    """The `ray` module, or a one-line error saying what to install."""
    try:
        import ray
    except ImportError:
        raise MinitorchError(RAY_MISSING) from None
    return ray


def worker_runtime_env(threads: int) -> dict:
    """The runtime environment of a worker or replica that owns `threads` CPUs: the quantised kernels' Numba
    threads read their count when Numba is first imported, so it is set before the process starts (BLAS is
    limited by threadpoolctl in the worker itself)."""
    return {"env_vars": {"NUMBA_NUM_THREADS": str(threads)}}


@contextlib.contextmanager
def connected(address: str | None, quiet: bool = False) -> Iterator[object]:
    """Within the block, this process is a driver of a Ray cluster: the one at `address`, one this process
    already joined, or a local one started here (and shut down when the block ends)."""
    ray = import_ray()
    # One copy of each repeated worker log line is enough on a terminal; workers' Python logging stays quiet.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if ray.is_initialized():
        yield ray
        return
    if address is not None:
        _check_reachable(address)
    options = dict(logging_level=logging.ERROR, log_to_driver=not quiet, include_dashboard=False)
    if address is None:
        options["object_store_memory"] = LOCAL_OBJECT_STORE_BYTES
    try:
        ray.init(address=address, **options)
    except ConnectionError as error:
        raise MinitorchError(f"--address {address}: {error}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """A HOST:PORT nobody answers on fails here in seconds; Ray itself would retry for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return                                            # "auto" and other forms: Ray resolves and checks them
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise MinitorchError(f"--address {address}: no Ray cluster answers there ({error.strerror or error}); "
                             "start one with `ray start --head`, or leave out --address for a local one") from None
