"""Flags shared by several subcommands, with checks that name the flag and the bad value."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager

from ..formats.model_files import KNOWN_MODELS
from ..generation.speculative import DEFAULT_DRAFT_MAX, DEFAULT_NGRAM, SPECULATION_MODES
from ..passes.quantization import TARGETS as WEIGHT_CHOICES


def _checked(kind, test, requirement: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return parse


non_negative_float = _checked(float, lambda v: v >= 0, ">= 0")
positive_float = _checked(float, lambda v: v > 0, "> 0")
non_negative_int = _checked(int, lambda v: v >= 0, ">= 0")
positive_int = _checked(int, lambda v: v > 0, "> 0")
top_p_value = _checked(float, lambda v: 0 < v <= 1, "in (0, 1]")
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", default="story",
                       help=f"model folder, .gguf file, or a known name ({', '.join(KNOWN_MODELS)}); default: story")
    group.add_argument("--context", type=positive_int, default=None,
                       help="context length in tokens (default: the model's, at most 4096)")
    group.add_argument("--prefill-chunk", type=positive_int, default=128,
                       help="prompt tokens per prefill step (default: 128)")
    group.add_argument("--passes", default=None,
                       help="comma-separated passes to run instead of the defaults (e.g. fuse_qkv,dce)")
    group.add_argument("--weights", choices=WEIGHT_CHOICES, default=None,
                       help="what matrices are computed from: f32, q8_0, q4_0, q4_1, or native (as the file stores "
                            "them); default: native for GGUF, f32 for safetensors")
    group.add_argument("--no-passes", action="store_true", help="run the traced graph unoptimised")
    group.add_argument("--no-memory-plan", action="store_true",
                       help="give every activation its own buffer instead of sharing one planned arena")
    group.add_argument("--kv-memory", default=None, metavar="SIZE",
                       help="the KV cache's pool: bytes with a unit (512MiB, 2GB) or positions (8192tokens); "
                            "default: four contexts' worth, committed only as it is written")
    group.add_argument("--threads", type=non_negative_int, default=0,
                       help="threads for matrix products (BLAS and the quantised kernels; default: all cores)")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress or notes on stderr")
    add_plugin_argument(group)


def add_plugin_argument(parser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE (a module name, or a .py path) first, for the passes, ops and "
                             "architectures it registers; repeatable")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", "-n", type=non_negative_int, default=128, help="default: 128")
    group.add_argument("--greedy", action="store_true", help="always take the most likely token")
    group.add_argument("--temperature", type=non_negative_float, default=None, help="default 0.8; 0 = greedy")
    group.add_argument("--top-k", type=non_negative_int, default=None, help="default 40; 0 = off")
    group.add_argument("--top-p", type=top_p_value, default=None, help="default 0.95; 1 = off")
    group.add_argument("--min-p", type=unit_interval, default=None, help="default 0.05; 0 = off")
    group.add_argument("--repetition-penalty", type=positive_float, default=None, help="default 1 (off)")
    group.add_argument("--presence-penalty", type=float, default=None, help="default 0 (off)")
    group.add_argument("--frequency-penalty", type=float, default=None, help="default 0 (off)")
    group.add_argument("--seed", type=int, default=None, help="same seed and settings: same text")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop when this text appears (not printed); repeatable")
    group.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    group.add_argument("--speculate", choices=SPECULATION_MODES, default=None,
                       help="speculative decoding: 'ngram' drafts from the prompt and the text so far; 'draft' "
                            "from --draft-model (same tokens under --greedy, same distribution when sampling)")
    group.add_argument("--draft-max", type=positive_int, default=None, metavar="K",
                       help=f"guess at most K tokens a step (default {DEFAULT_DRAFT_MAX}; fewer while guesses fail)")
    group.add_argument("--ngram", type=positive_int, default=None, metavar="N",
                       help=f"with --speculate ngram: match the last N tokens (default {DEFAULT_NGRAM})")
    group.add_argument("--draft-model", default=None, metavar="PATH",
                       help="speculate with this smaller model (folder, .gguf or name), which must share the "
                            "model's vocabulary")


def sampling_settings(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "greedy": args.greedy, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty, "presence_penalty": args.presence_penalty,
            "frequency_penalty": args.frequency_penalty, "seed": args.seed, "stop": args.stop,
            "ignore_eos": args.ignore_eos, "speculate": args.speculate, "draft_max": args.draft_max,
            "ngram": args.ngram, "draft_model": args.draft_model}


def pass_list(args: argparse.Namespace) -> list[str] | None:
    if args.no_passes:
        return []
    if args.passes is not None:
        return [name.strip() for name in args.passes.split(",") if name.strip()]
    return None


def load_model(args: argparse.Namespace):
    import minitorch_infer

    with progress(args, f"loading {args.model}"):
        return minitorch_infer.load(args.model, context=args.context, prefill_chunk=args.prefill_chunk,
                                    passes=pass_list(args), memory_plan=not args.no_memory_plan,
                                    kv_memory=args.kv_memory, weights=args.weights)


def note(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


@contextmanager
def progress(args: argparse.Namespace, what: str):
    """'loading story ... done in 0.2 s' on stderr, when it is a terminal and not --quiet."""
    show = not args.quiet and sys.stderr.isatty()
    if show:
        print(f"{what} ...", end="", file=sys.stderr, flush=True)
    began = time.perf_counter()
    yield
    if show:
        print(f" done in {time.perf_counter() - began:.2f} s", file=sys.stderr)
