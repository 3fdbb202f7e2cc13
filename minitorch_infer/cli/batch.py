"""minitorch-infer batch IN.jsonl -o OUT.jsonl: run a file of prompts through the batched engine.

Each input line is a JSON object: `id` (a string or a number, unique in the file), `prompt` (text or token
ids) or `messages` (a chat, rendered with the model's template), and optionally `max_tokens`,
`temperature`, `top_p`, `top_k`, `min_p`, `seed`, `stop`, `greedy`, `repetition_penalty`,
`presence_penalty`, `frequency_penalty`, `ignore_eos`; the command's flags are the defaults. Each result is
appended to OUT as soon as it finishes (`id`, `text`, `token_ids`, `finish_reason`, `prompt_tokens`). A
rerun skips the ids OUT already holds, so an interrupted run resumes. A bad line is reported with its
number and the rest still run; the exit status is then 2. With --ray the same file runs as a Ray Data pipeline
(ray_batch.py), through the functions here that check a line, make its request and write its result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import MinitorchError
from ..generation.chat import render_chat_prompt
from .options import add_model_arguments, add_sampling_arguments, load_model, note, positive_int, sampling_settings

HELP = "run a JSONL file of prompts through the batched engine, writing each result as it finishes"
# A line's own settings, by the name it uses, and the name generate takes.
LINE_SETTINGS = {"max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens", "temperature": "temperature",
                 "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed", "stop": "stop",
                 "greedy": "greedy", "repetition_penalty": "repetition_penalty",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                 "ignore_eos": "ignore_eos"}
LINE_FIELDS = {"id", "prompt", "messages", "system", *LINE_SETTINGS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="the prompts, one JSON object per line")
    parser.add_argument("--output", "-o", required=True, help="where results go, one JSON object per line "
                                                               "(appended; ids already there are skipped)")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=128,
                        help="tokens per step, prefill chunks and decode tokens together (default: 128, at most "
                             "--prefill-chunk)")
    ray = parser.add_argument_group("Ray (pip install 'minitorch-infer[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="run as a Ray Data pipeline: a pool of workers, each with its own model and engine")
    ray.add_argument("--address", default=None,
                     help="with --ray: the cluster to join (auto, or HOST:PORT; default: start a local one)")
    ray.add_argument("--workers", type=positive_int, default=None,
                     help="with --ray: how many workers (default: the cluster's CPUs / --threads)")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


class BadLine(MinitorchError):
    pass


def run(args: argparse.Namespace) -> int:
    if args.ray:
        from .ray_batch import run_on_ray
        return run_on_ray(args)
    check_ray_flags_unused(args)
    source, target = Path(args.input), Path(args.output)
    lines = numbered_lines(source)
    done = finished_ids(target)
    model = load_model(args)
    engine = model.engine(max_batch_tokens=args.max_batch_tokens)
    # The engine says which requests finished, so a step never scans every request of a long file.
    finished: list = []
    engine.finish_observers.append(lambda request, result: finished.append((request, result)))
    defaults = sampling_settings(args)
    ids, keys, bad, skipped = {}, set(), 0, 0
    for number, line in lines:
        try:
            parsed = parse_line(line)
            if parsed.key in done:
                skipped += 1
                continue
            if parsed.key in keys:
                raise BadLine(f"id {parsed.request_id!r} appears twice")
            prompt, settings = line_request(parsed.item, model, defaults)
            ids[engine.submit(prompt, **settings)._request] = parsed.request_id
            keys.add(parsed.key)
        except MinitorchError as error:
            bad += 1
            report_bad_line(source, number, error)
    _run_writing(engine, ids, finished, target, args)
    note(args, summary(len(ids), target, skipped, bad))
    return 2 if bad else 0


def check_ray_flags_unused(args: argparse.Namespace) -> None:
    """--address and --workers mean something only with --ray; a silent no-op would hide a typo."""
    for flag in ("address", "workers"):
        if getattr(args, flag) is not None:
            raise MinitorchError(f"--{flag} needs --ray")


def numbered_lines(source: Path) -> list[tuple[int, str]]:
    """The input's non-blank lines with their line numbers (counted from 1, blank lines included)."""
    if not source.is_file():
        raise MinitorchError(f"{source}: no such input file")
    return [(number, line) for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1)
            if line.strip()]


def report_bad_line(source: Path, number: int, error: Exception) -> None:
    print(f"minitorch-infer: {source} line {number}: {error}", file=sys.stderr)


def summary(written: int, target: Path, skipped: int, bad: int) -> str:
    return (f"wrote {written} results to {target}" + (f"; {skipped} already there" if skipped else "")
            + (f"; {bad} bad line(s) skipped" if bad else ""))


@dataclass
class ParsedLine:
    key: str              # the id as JSON text: 1 and "1" are different ids
    request_id: object
    item: dict


def parse_line(line: str) -> ParsedLine:
    """One input line checked on its own (no model needed): JSON, known fields, an id, a prompt or messages."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadLine(f"not JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(item, dict):
        raise BadLine(f"expected a JSON object, got {type(item).__name__}")
    unknown = sorted(set(item) - LINE_FIELDS)
    if unknown:
        raise BadLine(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(LINE_FIELDS))}")
    request_id = item.get("id")
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise BadLine(f"id must be a string or an integer, got {request_id!r}")
    if ("prompt" in item) == ("messages" in item):
        raise BadLine("give exactly one of prompt and messages")
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadLine("messages must be a list of objects with role and content")
    elif not isinstance(item["prompt"], (str, list)):
        raise BadLine(f"prompt must be text or a list of token ids, got {type(item['prompt']).__name__}")
    return ParsedLine(json.dumps(request_id), request_id, item)


def line_request(item: dict, model, defaults: dict) -> tuple[object, dict]:
    """A parsed line's prompt (messages rendered with the model's template) and its settings over `defaults`."""
    if "messages" in item:
        prompt = render_chat_prompt(model, item["messages"], system=item.get("system"))
    else:
        prompt = item["prompt"]
    settings = dict(defaults)
    settings.update({LINE_SETTINGS[name]: value for name, value in item.items() if name in LINE_SETTINGS})
    return prompt, settings


def result_line(request_id, result) -> str:
    """A result as its output line (without the newline)."""
    return json.dumps({"id": request_id, "text": result.text, "token_ids": result.token_ids,
                       "finish_reason": result.finish_reason, "prompt_tokens": len(result.prompt_ids)},
                      ensure_ascii=False)


def finished_ids(target: Path) -> set[str]:
    """The ids OUT already holds. A last line cut short (the run was killed while writing it) is removed, so
    that request runs again."""
    if not target.exists():
        return set()
    data = target.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(target, "r+b") as file:
            file.truncate(len(complete))
    done = set()
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        try:
            done.add(json.dumps(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MinitorchError(f"{target} line {number} is not a result written by this command; "
                                 "give another --output") from None
    return done


def _run_writing(engine, ids: dict, finished: list, target: Path, args: argparse.Namespace) -> None:
    """Step the engine, appending each result as its request finishes (`finished` collects them)."""
    total, written, tokens, began = len(ids), 0, 0, time.perf_counter()
    show = not args.quiet and sys.stderr.isatty()
    with open(target, "a", encoding="utf-8") as out:
        while engine.step() or finished:
            for request, result in finished:
                out.write(result_line(ids[request], result) + "\n")
                written += 1
                tokens += len(result.token_ids)
            if finished:
                out.flush()
                finished.clear()
                if show:
                    rate = tokens / (time.perf_counter() - began)
                    print(f"\r{written}/{total} done, {rate:,.0f} tok/s", end="", file=sys.stderr, flush=True)
    if show and total:
        print(file=sys.stderr)
