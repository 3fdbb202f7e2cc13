"""minitorch-infer serve: the OpenAI-compatible HTTP API for one model, on the batched engine."""

from __future__ import annotations

import argparse
import contextlib
import signal
from pathlib import Path

from ..errors import MinitorchError
from .options import add_model_arguments, load_model, note, positive_int

HELP = "serve a model over the OpenAI API (chat and text completions, streamed or whole)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=8000, help="port (default: 8000)")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=128,
                        help="tokens per engine step, prefill chunks and decode tokens together (default: 128)")
    parser.add_argument("--max-queue", type=positive_int, default=None,
                        help="answer 429 when this many requests already wait (default: no limit)")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/ endpoints")
    parser.add_argument("--shutdown-grace", type=positive_int, default=10, metavar="SECONDS",
                        help="on SIGTERM or Ctrl-C, stop accepting and give running requests this long (default: 10)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients ask for (default: the --model name, or the file's stem)")
    ray = parser.add_argument_group("Ray Serve (pip install 'minitorch-infer[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="serve from Ray Serve replicas (one model and engine each) behind Serve's HTTP proxy")
    ray.add_argument("--address", default=None,
                     help="with --ray: the cluster to join (auto, or HOST:PORT; default: start a local one)")
    scaling = ray.add_mutually_exclusive_group()
    scaling.add_argument("--replicas", type=positive_int, default=None,
                         help="with --ray: how many replicas (default: 1)")
    scaling.add_argument("--autoscale", type=replica_range, default=None, metavar="MIN,MAX",
                         help="with --ray: between MIN and MAX replicas, as the load asks")
    add_model_arguments(parser)


def replica_range(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        low, high = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two whole numbers), got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"needs 0 <= MIN <= MAX and MAX >= 1, got {text}")
    return low, high


def run(args: argparse.Namespace) -> int:
    if args.ray:
        from .ray_serve import run_on_ray
        return run_on_ray(args)
    for flag in ("address", "replicas", "autoscale"):
        if getattr(args, flag) is not None:
            raise MinitorchError(f"--{flag} needs --ray")
    import uvicorn

    from ..serving.app import build_app

    model = load_model(args)
    name = served_name(args)
    engine = model.engine(max_batch_tokens=args.max_batch_tokens).start()
    app = build_app(model, engine, name, api_key=args.api_key, max_queue=args.max_queue)
    note(args, f"serving {name!r} on http://{args.host}:{args.port}/v1 (OpenAI API); Ctrl-C stops")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.shutdown_grace))
    # SIGTERM and Ctrl-C stop accepting, give open requests the grace period (a stream still open then is
    # closed, which cancels its request), and exit 0. uvicorn's own handlers would re-raise the signal at exit.
    server.capture_signals = contextlib.nullcontext

    def shut_down(signum, frame) -> None:
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, shut_down)
    try:
        server.run()
    finally:
        engine.stop()
    return 0


def served_name(args: argparse.Namespace) -> str:
    return args.served_model_name or (args.model if not Path(args.model).exists() else Path(args.model).stem)
