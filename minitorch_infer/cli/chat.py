"""minitorch-infer chat: an interactive conversation that keeps its KV cache between turns.

Commands: /reset (forget the conversation), /undo (take back the last turn), /exit. When stdin is not a
terminal, each line of stdin is one user turn.

Ctrl-C during a reply stops that reply; the turn is kept as far as it got (/undo takes it back) and the
chat goes on. A turn that fails (a line that is not UTF-8, a conversation that no longer fits the
context) prints its error and the chat goes on; the exit status is then 2 instead of 0.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import MinitorchError
from .options import add_model_arguments, add_sampling_arguments, load_model, note, sampling_settings

HELP = "chat with an instruct model (/reset, /undo, /exit)"
EXIT_A_TURN_FAILED = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="system message")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.set_defaults(model="smollm2-135m-instruct", max_new_tokens=256)


def run(args: argparse.Namespace) -> int:
    model = load_model(args)
    settings = sampling_settings(args)
    interactive = sys.stdin.isatty()
    failed = False
    with model.chat(system=args.system) as session:
        if session.template.is_fallback:
            note(args, "note: the model has no chat template; using ChatML")
        if interactive:
            note(args, "chatting with " + args.model + "; /reset, /undo, /exit")
        line_number = 0
        while True:
            if interactive:
                print("> ", end="", flush=True)
            raw = sys.stdin.buffer.readline()
            if not raw:
                break
            line_number += 1
            try:
                text = decode_line(raw, line_number)
            except MinitorchError as error:
                print(f"minitorch-infer: error: {error}", file=sys.stderr)
                failed = True
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                session.reset()
                note(args, "(conversation reset)")
                continue
            if text == "/undo":
                session.rollback()
                note(args, "(last turn undone)")
                continue
            if not text.strip():
                continue
            try:
                for piece in session.stream(text, **settings):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                # the session records the stopped turn when it is next used (see Session._end_unfinished_turn)
                note(args, "\n(interrupted)")
            except MinitorchError as error:
                print(f"\nminitorch-infer: error: {error}", file=sys.stderr)
                failed = True
            sys.stdout.write("\n")
            sys.stdout.flush()
    return EXIT_A_TURN_FAILED if failed else 0


def decode_line(raw: bytes, line_number: int) -> str:
    """One line of stdin as text, without its line ending."""
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise MinitorchError(
            f"stdin line {line_number} is not valid UTF-8 (byte {error.start}: {raw[error.start:error.start + 1]!r}); "
            "line skipped") from None
