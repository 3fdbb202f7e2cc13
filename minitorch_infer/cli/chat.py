"""minitorch-infer chat: an interactive conversation that keeps its KV cache between turns.

Commands: /reset (forget the conversation), /undo (take back the last turn), /exit. When stdin is not a
terminal, each line of stdin is one user turn.
"""

from __future__ import annotations

import argparse
import sys

from .options import add_model_arguments, add_sampling_arguments, load_model, note, sampling_settings

HELP = "chat with an instruct model (/reset, /undo, /exit)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="system message")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.set_defaults(model="smollm2-135m-instruct", max_new_tokens=256)


def run(args: argparse.Namespace) -> int:
    model = load_model(args)
    settings = sampling_settings(args)
    interactive = sys.stdin.isatty()
    with model.chat(system=args.system) as session:
        if session.template.is_fallback:
            note(args, "note: the model has no chat template; using ChatML")
        if interactive:
            note(args, "chatting with " + args.model + "; /reset, /undo, /exit")
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
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
                note(args, "\n(interrupted)")
            sys.stdout.write("\n")
    return 0
