"""minitorch-infer serve: the OpenAI-compatible HTTP API for one model, on the batched engine."""

from __future__ import annotations

import argparse
import contextlib
import signal
from pathlib import Path

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
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serving.app import build_app

    model = load_model(args)
    name = args.served_model_name or (args.model if not Path(args.model).exists() else Path(args.model).stem)
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
