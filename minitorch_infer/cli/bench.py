"""minitorch-infer bench: prefill and decode speed, time to first token, load time and peak RSS, for our
engine and the in-repo naive path (the reference backend on the unoptimised graph), with their ratios."""

from __future__ import annotations

import argparse

from . import batch_benchmark, speculative_benchmark
from .benchmark import DECODE_TOKENS, PROMPT_TOKENS, Measurement, measure_alternating, median_and_spread
from ..errors import ModelNotFoundError
from ..formats.model_files import find_model
from .options import WEIGHT_CHOICES, add_plugin_argument, non_negative_int, positive_int

HELP = "measure speed and memory against the naive path (medians of several runs)"
DEFAULT_MODELS = ("story", "smollm2-135m-instruct")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", action="append", default=None,
                        help=f"model to measure; repeatable (default: {', '.join(DEFAULT_MODELS)} where present)")
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="runs per measurement, each in a fresh process, ours and naive in turn (default: 3)")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="BLAS and quantised-kernel threads (default: all)")
    parser.add_argument("--weights", type=_weight_list, default=[None], metavar="LIST",
                        help="weight types to measure in turn, e.g. f32,q8_0,native, with ratios to the first "
                             "(default: each model's default)")
    parser.add_argument("--profile", action="store_true",
                        help="also print each op type's share of a decode step (fused ops under their pass)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive path (it is slow on big models)")
    parser.add_argument("--concurrency", type=_levels, default=None, metavar="LIST",
                        help="instead, measure the batched engine at these numbers of concurrent requests, "
                             "e.g. 1,4,16, against the single-stream engine in the same run")
    parser.add_argument("--speculate", action="store_true",
                        help="instead, measure prompt-lookup speculative decoding against plain decoding on "
                             "input-grounded prompts (SmolLM2 chat) and free story generation (story model)")
    add_plugin_argument(parser)


def _weight_list(text: str) -> list[str]:
    types = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [t for t in types if t not in WEIGHT_CHOICES]
    if not types or unknown:
        raise argparse.ArgumentTypeError(f"expected weight types from {', '.join(WEIGHT_CHOICES)} separated by "
                                         f"commas, got {text!r}")
    return types


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"every concurrency must be at least 1, got {text!r}")
    return levels


def run(args: argparse.Namespace) -> int:
    names = args.model or [n for n in DEFAULT_MODELS if _exists(n)]
    if args.concurrency:
        return _run_concurrency(names, args)
    if args.speculate:
        return _run_speculative(args)
    print(f"prompt {PROMPT_TOKENS} tokens, {DECODE_TOKENS} greedy decode steps, {args.repeat} runs each; "
          "median [min-max]")
    for name in names:
        measured, naive = measure_alternating(name, args.repeat, args.threads, args.profile,
                                              naive=not args.no_naive, weights=args.weights)
        print(f"\n{name}  ({measured[0].blas})")
        for ours in measured:
            print(_row(ours))
        if naive is not None:
            print(_row(naive))
            print(_ratios(measured[0], naive, "ours / naive"))
        for ours in measured[1:]:
            print(_ratios(ours, measured[0], f"{ours.weights} / {measured[0].weights}"))
        for ours in measured:
            print(_bound(ours))
            if ours.profile:
                which = f" ({ours.weights})" if len(measured) > 1 else ""
                print(f"decode step time by op{which}: "
                      + ", ".join(f"{op} {share:.0%}" for op, share in ours.profile.items()))
    return 0


def _run_concurrency(names: list[str], args: argparse.Namespace) -> int:
    print(f"{batch_benchmark.PROMPT_TOKENS}-token prompts, {batch_benchmark.NEW_TOKENS} greedy new tokens per request, "
          f"{args.repeat} runs per level taking turns; medians (latencies over every request and token)")
    several = len(args.weights) > 1
    for name in names:
        # Several weight types take turns, one process per type and run: a machine that drifts over minutes
        # then moves them alike, as the levels inside a process already are.
        runs: dict = {weights: [] for weights in args.weights}
        for _ in range(args.repeat if several else 1):
            for weights in args.weights:
                runs[weights].append(batch_benchmark.measure_in_subprocess(
                    name, args.concurrency, 1 if several else args.repeat, args.threads, weights))
        baseline = None
        for weights, rounds in runs.items():
            measured = batch_benchmark.merged(rounds)
            print(f"\n{name}" + (f" ({weights} weights)" if weights else ""))
            print("\n".join(batch_benchmark.table(measured)))
            if baseline is None:
                baseline = measured
            else:
                print(batch_benchmark.versus(measured, baseline, f"{args.weights[0]}'s"))
    return 0


def _run_speculative(args: argparse.Namespace) -> int:
    from threadpoolctl import threadpool_limits

    print(f"greedy, {speculative_benchmark.NEW_TOKENS} new tokens per prompt, plain and speculative runs taking "
          f"turns, {args.repeat} runs; decode tok/s medians, x plain: median [min-max] of the runs' ratios")
    with threadpool_limits(limits=args.threads or None):
        measured = [speculative_benchmark.measure_set(name, args.repeat)
                    for name in speculative_benchmark.available_sets()]
    print("\n".join(speculative_benchmark.table(measured)))
    return 0


def _exists(name: str) -> bool:
    try:
        find_model(name)
        return True
    except ModelNotFoundError:
        return False


def _stat(values: list[float], unit: str, digits: int = 0) -> str:
    median, low, high = median_and_spread(values)
    return f"{median:,.{digits}f} {unit} [{low:,.{digits}f}-{high:,.{digits}f}]"


def _label(m: Measurement) -> str:
    return m.engine if m.engine != "minitorch-infer" else f"{m.engine} ({m.weights})"


def _row(m: Measurement) -> str:
    return (f"  {_label(m):<28} prefill {_stat(m.prefill_tok_s, 'tok/s')}  decode {_stat(m.decode_tok_s, 'tok/s', 1)}  "
            f"first token {_stat(m.first_token_ms, 'ms', 1)}  load+compile {_stat(m.load_seconds, 's', 3)}  "
            f"peak RSS {m.peak_rss_mb:,.0f} MB")


def _bound(ours: Measurement) -> str:
    bound = median_and_spread(ours.matvec_bound_tok_s)[0]
    decode = median_and_spread(ours.decode_tok_s)[0]
    return (f"  {'matrix-vector bound (' + ours.weights + ')':<28} decode {_stat(ours.matvec_bound_tok_s, 'tok/s', 1)}: the step's "
            f"matrix-vector products alone, nothing else; ours reaches {decode / bound:.0%} of it")


def _ratios(ours: Measurement, naive: Measurement, label: str) -> str:
    def ratio(a, b):
        return median_and_spread(a)[0] / median_and_spread(b)[0]

    return (f"  {label:<28} prefill x{ratio(ours.prefill_tok_s, naive.prefill_tok_s):.2f}  "
            f"decode x{ratio(ours.decode_tok_s, naive.decode_tok_s):.2f}  "
            f"first token x{ratio(naive.first_token_ms, ours.first_token_ms):.2f} sooner  "
            f"peak RSS x{ours.peak_rss_mb / naive.peak_rss_mb:.2f}")
