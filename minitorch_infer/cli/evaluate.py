"""minitorch-infer eval: perplexity of a text over sliding windows, and the distance to a reference weight type."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MinitorchError
from .options import WEIGHT_CHOICES, add_model_arguments, load_model, positive_int

HELP = "perplexity of a text file over sliding windows, and KL divergence / top-1 agreement against another weight type"
DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "eval.txt"
DEFAULT_WINDOW = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", default=None,
                        help="a UTF-8 text file (default: the public-domain text that ships with the package)")
    parser.add_argument("--stride", type=positive_int, default=None, metavar="N",
                        help="tokens from one window's start to the next's (default: half of --context, the window)")
    parser.add_argument("--reference-weights", choices=WEIGHT_CHOICES, default=None,
                        help="also run the model with these weights and report the KL divergence and top-1 agreement")
    parser.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                        help="evaluate only the text's first N tokens")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate

    path = Path(args.text) if args.text else DEFAULT_TEXT
    text = _read_text(path)
    args.context = args.context or DEFAULT_WINDOW         # for eval, --context is the window
    stride = args.stride or max(1, args.context // 2)
    if stride > args.context:
        raise MinitorchError(f"--stride {stride} is longer than the window (--context {args.context}): tokens "
                             "between windows would never be scored")
    model = load_model(args)
    ids = model.encode(text)[:args.max_tokens]
    reference = None
    if args.reference_weights is not None:
        reference = load_model(argparse.Namespace(**{**vars(args), "weights": args.reference_weights}))
    report = evaluate(model, ids, args.context, stride, reference, progress=_progress_bar(args))
    if args.json:
        print(json.dumps({"text": str(path), **report.to_json()}))
    else:
        print(f"{path}:")
        print(report)
    return 0


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MinitorchError(f"no text file at {path}") from None
    except UnicodeDecodeError as error:
        raise MinitorchError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise MinitorchError(f"{path}: cannot read it: {error.strerror}") from None


def _progress_bar(args: argparse.Namespace):
    """A bar on stderr, redrawn per window, when stderr is a terminal and not --quiet."""
    if args.quiet or not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        filled = 30 * done // total
        end = "\n" if done == total else ""
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} windows", end=end, file=sys.stderr, flush=True)
    return show
