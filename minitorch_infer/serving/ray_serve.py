"""The OpenAI-compatible app as a Ray Serve deployment: each replica loads the model, runs its own engine on
a background thread and answers with the same FastAPI app as `minitorch-infer serve`; Serve's HTTP proxy
spreads requests over the replicas, restarts a replica whose process dies and, with autoscaling, adds and
removes replicas as the number of ongoing requests per replica moves.

Importing this module imports Ray (the optional extra): import it only for `--ray`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ray import serve

from ..ray_cluster import worker_runtime_env
from .app import build_app

APP_NAME = "minitorch-infer"
# As quiet as the single-process server (uvicorn at "warning"): warnings and errors, no line per request.
QUIET_LOGS = {"log_level": "WARNING", "enable_access_log": False}
# Requests one replica takes at a time. Its engine runs them together, 16 at once making 2-3x the tokens of
# one; beyond this, requests wait in Serve's proxy, from where a replica that dies takes none of them down.
MAX_ONGOING_REQUESTS = 16


@serve.ingress()
class OpenAIReplica:
    """One replica: a model, its engine, and the app over them."""

    def __init__(self, load_model: Callable, model_name: str, max_batch_tokens: int, threads: int,
                 api_key: str | None, max_queue: int | None):
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)              # the replica's CPUs, no more (BLAS would take them all)
        self.model = load_model()
        self.engine = self.model.engine(max_batch_tokens=max_batch_tokens).start()
        self._app = build_app(self.model, self.engine, model_name, api_key=api_key, max_queue=max_queue)

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        """Serve restarts a replica whose check fails: here, one whose engine thread has stopped."""
        if not self.engine.running_in_background:
            raise RuntimeError(f"the engine of replica {os.getpid()} is not running")

    def __del__(self):
        self.engine.stop()


def openai_application(load_model: Callable, model_name: str, *, replicas: int = 1,
                       autoscale: tuple[int, int] | None = None, threads: int = 1, max_batch_tokens: int = 128,
                       api_key: str | None = None, max_queue: int | None = None,
                       shutdown_grace: float = 10) -> serve.Application:
    """The Serve application: `replicas` copies of the app, or between autoscale's (min, max). `load_model`
    is called once in each replica (so it must be picklable, e.g. a functools.partial)."""
    if autoscale is None:
        scaling = {"num_replicas": replicas}
    else:
        # Scale so a replica runs about half the requests it may take: its engine batches them, and the
        # other half is headroom while a new replica loads its model.
        scaling = {"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                          "target_ongoing_requests": MAX_ONGOING_REQUESTS // 2}}
    replica_options = {"num_cpus": threads, "runtime_env": worker_runtime_env(threads)}
    deployment = serve.deployment(OpenAIReplica, name="OpenAIReplica", max_ongoing_requests=MAX_ONGOING_REQUESTS,
                                  ray_actor_options=replica_options, graceful_shutdown_timeout_s=shutdown_grace,
                                  logging_config=QUIET_LOGS, **scaling)
    return deployment.bind(load_model, model_name, max_batch_tokens, threads, api_key, max_queue)


def run_openai_application(application: serve.Application, host: str, port: int) -> str:
    """Start Serve's proxy on host:port and deploy `application` at its root; returns the base URL."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET_LOGS)
    serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
