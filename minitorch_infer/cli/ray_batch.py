"""minitorch-infer batch --ray: the batch command as a Ray Data pipeline, for files larger than one machine.

The pipeline: the input's lines (checked here, as the local command checks them) → `map_batches` over a pool
of actors, one per worker, each loading the model once and running batches of lines through its own batched
engine → results streamed back and appended to OUT as they arrive. Ray restarts a worker that dies and runs
its batch again, and a batch's results reach OUT only when the batch is whole, so every id is written once.

Results are the local command's: each request's output depends only on its prompt and settings (greedy, or
sampled from its own seed), never on which worker ran it or what shared its steps.

The input is read by this process, not by Ray Data's JSON reader, because it lives on this machine (a
worker on another node could not open its path) and a malformed line must be reported by its number while
the others still run, where the reader would stop the whole dataset.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from threadpoolctl import threadpool_limits

from ..errors import MinitorchError
from ..ray_cluster import connected, import_ray, worker_runtime_env
from .batch import (BadLine, finished_ids, line_request, numbered_lines, parse_line, report_bad_line, result_line,
                    summary)
from .options import load_model, note, sampling_settings

# Lines per call of a worker: enough sequences to fill the engine's steps (16 at once run 2-3x faster than
# one), few enough that a batch redone after a worker dies repeats little work.
LINES_PER_BATCH = 32


class BatchWorker:
    """A Ray Data actor: loads the model once, then runs each batch of lines through a batched engine."""

    def __init__(self, args: argparse.Namespace, defaults: dict, threads: int):
        # Each worker owns `threads` of the cluster's CPUs; BLAS must not spread past them.
        threadpool_limits(limits=threads)
        self.model = load_model(args)
        self.defaults = defaults
        self.max_batch_tokens = args.max_batch_tokens

    def __call__(self, batch: dict) -> dict:
        engine = self.model.engine(max_batch_tokens=self.max_batch_tokens)
        handles, errors = {}, {}
        for number, line in zip(batch["line"], batch["request"]):
            parsed = parse_line(line)                      # checked by the driver: this cannot fail
            try:
                prompt, settings = line_request(parsed.item, self.model, self.defaults)
                handles[int(number)] = (parsed.request_id, engine.submit(prompt, **settings))
            except MinitorchError as error:
                errors[int(number)] = str(error)
        engine.run()
        results = {}
        for number, (request_id, handle) in handles.items():
            try:
                results[number] = result_line(request_id, handle.result())
            except MinitorchError as error:
                errors[number] = str(error)
        numbers = sorted([*results, *errors])
        return {"line": numbers, "result": [results.get(n, "") for n in numbers],
                "error": [errors.get(n, "") for n in numbers]}


def run_on_ray(args: argparse.Namespace) -> int:
    import_ray()                                          # before any work: say at once if Ray is missing
    source, target = Path(args.input), Path(args.output)
    lines = numbered_lines(source)
    done = finished_ids(target)
    rows, keys, bad, skipped = [], set(), 0, 0
    for number, line in lines:
        try:
            parsed = parse_line(line)
            if parsed.key in done:
                skipped += 1
                continue
            if parsed.key in keys:
                raise BadLine(f"id {parsed.request_id!r} appears twice")
            keys.add(parsed.key)
            rows.append({"line": number, "request": line})
        except MinitorchError as error:
            bad += 1
            report_bad_line(source, number, error)
    written = 0
    if rows:
        with connected(args.address, quiet=args.quiet):
            began = time.perf_counter()
            show = not args.quiet and sys.stderr.isatty()
            with open(target, "a", encoding="utf-8") as out:
                for row in infer_on_ray(rows, args):
                    if row["error"]:
                        bad += 1
                        report_bad_line(source, row["line"], row["error"])
                        continue
                    out.write(row["result"] + "\n")
                    out.flush()
                    written += 1
                    if show:
                        print(f"\r{written}/{len(rows)} done, {time.perf_counter() - began:.0f} s", end="",
                              file=sys.stderr, flush=True)
            if show:
                print(file=sys.stderr)
    note(args, summary(written, target, skipped, bad))
    return 2 if bad else 0


def infer_on_ray(rows: list[dict], args: argparse.Namespace, worker: type = BatchWorker) -> Iterator[dict]:
    """Each row ({"line": number, "request": JSON text}) through the workers: yields {"line", "result" (an
    output line) or "error"} as batches finish, in no particular order. Needs a connected Ray."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    # The command shows its own progress line; Ray Data's bars and notes would mix with it on stderr.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    threads = args.threads or 1
    workers = args.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
    # Enough blocks that every worker gets batches from the start.
    blocks = max(1, min(len(rows), max(workers, math.ceil(len(rows) / LINES_PER_BATCH))))
    dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        worker, batch_size=LINES_PER_BATCH, compute=ActorPoolStrategy(size=workers),
        fn_constructor_args=(args, sampling_settings(args), threads), num_cpus=threads, batch_format="numpy",
        runtime_env=worker_runtime_env(threads))
    for row in dataset.iter_rows():
        yield {"line": int(row["line"]), "result": str(row["result"]), "error": str(row["error"])}
