"""minitorch-infer serve --ray: the OpenAI API from Ray Serve replicas, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import functools
import signal
import threading

from ..ray_cluster import connected, import_ray
from .options import load_model, note
from .serve import served_name


def run_on_ray(args: argparse.Namespace) -> int:
    import_ray()                                          # before any work: say at once if Ray is missing
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.set())
    with connected(args.address, quiet=args.quiet):
        from ray import serve

        from ..serving.ray_serve import APP_NAME, openai_application, run_openai_application

        name = served_name(args)
        application = openai_application(
            functools.partial(load_model, argparse.Namespace(**{**vars(args), "quiet": True})), name,
            replicas=args.replicas or 1, autoscale=args.autoscale, threads=args.threads or 1,
            max_batch_tokens=args.max_batch_tokens, api_key=args.api_key, max_queue=args.max_queue,
            shutdown_grace=args.shutdown_grace)
        url = run_openai_application(application, args.host, args.port)
        note(args, f"serving {name!r} on {url}/v1 (OpenAI API) from Ray Serve; Ctrl-C stops")
        try:
            while not stop.wait(1):
                pass
        finally:
            # Only this application goes: a cluster joined with --address may serve others.
            serve.delete(APP_NAME)
    return 0
