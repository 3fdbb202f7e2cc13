"""minitorch-infer generate: stream a continuation of a prompt to stdout."""

from __future__ import annotations

import argparse
import sys

from ..errors import MinitorchError
from ..generation.loop import TRUNCATION_POLICIES
from .options import add_model_arguments, add_sampling_arguments, load_model, note, sampling_settings

HELP = "generate text from a prompt, streamed token by token"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", "-p", default=None, help="the prompt (default: read stdin)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user turn with the model's chat template")
    parser.add_argument("--system", default=None, help="system message, with --chat")
    parser.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    parser.add_argument("--truncate-prompt", choices=TRUNCATION_POLICIES, default="error",
                        help="a prompt longer than the context: 'error' (default) refuses it; 'left' drops tokens "
                             "from its start (keeping BOS), leaving room for up to --max-new-tokens new tokens "
                             "but at most half the context")
    parser.add_argument("--stats", action="store_true",
                        help="print speed, time to first token and memory to stderr afterwards")
    parser.add_argument("--dump-dot", metavar="PATH", default=None,
                        help="write the graph as Graphviz: PATH (optimised, with the memory plan) and "
                             "PATH's .traced.dot sibling (as traced); also .svg where `dot` exists")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MinitorchError(f"stdin is not valid UTF-8 (byte {error.start}: {data[error.start:error.start + 1]!r}); "
                             "pass text, or use --prompt") from None


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    model = load_model(args)
    if args.dump_dot:
        from .graph import dump_traced_and_optimised

        for line in dump_traced_and_optimised(model, args.dump_dot):
            note(args, line)
    if args.chat:
        from ..generation.chat import render_chat_prompt

        prompt_ids = render_chat_prompt(model, [{"role": "user", "content": prompt}], system=args.system)
    else:
        prompt_ids = model.encode(prompt)
    if args.echo:
        sys.stdout.write(prompt)
    stream = model.stream(prompt_ids, truncate_prompt=args.truncate_prompt, **sampling_settings(args))
    if stream.dropped_prompt_tokens:
        note(args, f"note: dropped {stream.dropped_prompt_tokens} tokens from the start of the prompt to fit the "
                   f"context of {model.context}")
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        print_stats(model, stream.result)
    return 0


def print_stats(model, result) -> None:
    s, mib, cache = result.stats, 2 ** 20, model.kv_cache
    positions = len(result.prompt_ids) + max(len(result.token_ids) - 1, 0)   # the last token is never fed
    lines = [
        f"prefill: {s.prompt_tokens} tokens in {s.prefill_seconds * 1e3:.1f} ms, {s.prefill_tokens_per_second:,.0f} tok/s",
        f"decode: {s.new_tokens} tokens, {s.decode_tokens_per_second:,.1f} tok/s; time to first token "
        f"{s.time_to_first_token * 1e3:.1f} ms; finish: {result.finish_reason}",
        f"memory: peak RSS {s.peak_rss_bytes / mib:.1f} MiB; weights {model.weight_summary()}; "
        f"{model.memory_plan.summary()}; KV cache: this run's {positions} positions "
        f"({positions * cache.bytes_per_token / mib:.2f} MiB, {cache.bytes_per_token / 1024:.1f} KiB each) in a pool of "
        f"{cache.capacity_tokens} ({cache.planned_bytes / mib:.1f} MiB reserved, committed as written)",
    ]
    print("\n".join(lines), file=sys.stderr)
