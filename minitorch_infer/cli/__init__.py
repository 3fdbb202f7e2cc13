"""The `minitorch-infer` command: generate, batch, serve, graph, chat, bench, eval, fetch, convert.

Text goes to stdout; progress, stats and errors to stderr. Every error the engine raises on purpose
(MinitorchError) and every bad flag ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from threadpoolctl import threadpool_limits

from ..backends import quantized, thread_handover
from ..errors import MinitorchError
from ..plugins import load_plugins
from . import batch, bench, chat, evaluate, generate, graph, models, serve

SUBCOMMANDS = {"generate": generate, "batch": batch, "serve": serve, "graph": graph, "chat": chat, "bench": bench,
               "eval": evaluate, "fetch": models.fetch, "convert": models.convert}
EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), not the usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="minitorch-infer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, module in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "generate")        # `minitorch-infer --prompt ...` means generate
    args = build_parser().parse_args(argv)
    try:
        # --plugin: modules that register passes, ops, kernels or architectures, before anything is looked up
        load_plugins(getattr(args, "plugin", None) or [])
        # --threads: how many threads BLAS and the quantised kernels may use; the rest of the engine runs on
        # the calling thread.
        threads = getattr(args, "threads", 0)
        quantized.limit_threads(threads)
        # Only the thread that steps models calls BLAS here (a server's other threads parse and stream), so
        # OpenBLAS's idle workers may be stopped before Numba's steps (backends/thread_handover.py).
        with threadpool_limits(limits=threads or None), thread_handover.claimed():
            return args.run(args) or 0
    except MinitorchError as error:
        print(f"minitorch-infer: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
