"""Measuring many sequences at once: `bench --concurrency 1,4,16`.

For each concurrency level C, C requests (distinct 64-token prompts, 128 greedy new tokens each) go to the
batched engine at once. Reported per level: aggregate decode tok/s (tokens made by steps in which every
request decodes, over those steps' time), per-request decode tok/s, time to first token and inter-token
latency (p50 and p99), and the KV memory the live tokens held at the peak. The single-stream engine
(`Model.generate`) runs in the same process, and the levels take turns run by run, so a drifting machine
moves them alike. The "products bound" is a bare chain of a step's matrix products with C rows: what
BLAS allows a batch of C when it does nothing but its products, as the ceiling on its speed-up.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .benchmark import products_bound

PROMPT_TOKENS = 64
NEW_TOKENS = 128


@dataclass
class LevelMeasurement:
    concurrency: int                                   # 0: the single-stream engine (Model.generate)
    aggregate_tok_s: list[float] = field(default_factory=list)
    first_token_ms: list[float] = field(default_factory=list)
    inter_token_ms: list[float] = field(default_factory=list)
    products_bound_tok_s: list[float] = field(default_factory=list)
    kv_in_use_mib: float = 0.0


def measure_model(name: str, levels: list[int], repeats: int, threads: int, weights: str | None = None
                  ) -> list[LevelMeasurement]:
    """Every level (and the single-stream engine) `repeats` times, taking turns; in this process."""
    import minitorch_infer
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads or None):
        context = PROMPT_TOKENS + NEW_TOKENS + 8
        # A pool that holds every request of the largest level: the benchmark measures batching, not preemption.
        model = minitorch_infer.load(name, context=context, max_batch=max(levels),
                                     kv_memory=f"{max(levels) * (context + 16)}tokens", weights=weights)
        rng = np.random.default_rng(0)
        results = {level: LevelMeasurement(level) for level in [0, *levels]}
        _run_level(model, 0, rng)                     # warm up: binds the programs
        for level in levels:
            _run_level(model, level, rng)
        for _ in range(repeats):
            for level in [0, *levels]:
                _run_level(model, level, rng, results[level])
    return list(results.values())


def _prompts(model, count: int, rng: np.random.Generator) -> list[list[int]]:
    """Fresh random prompts: no two share a prefix, so the prefix cache never shortens a prefill."""
    return [rng.integers(3, model.config.vocab_size, size=PROMPT_TOKENS).tolist() for _ in range(count)]


def _run_level(model, level: int, rng: np.random.Generator, into: LevelMeasurement | None = None) -> None:
    if level == 0:
        run = model.generate(_prompts(model, 1, rng)[0], max_new_tokens=NEW_TOKENS, greedy=True, ignore_eos=True)
        if into is not None:
            into.aggregate_tok_s.append(run.stats.decode_tokens_per_second)
            into.first_token_ms.append(run.stats.time_to_first_token * 1e3)
            into.products_bound_tok_s.append(products_bound(model, 1))
        return
    engine = model.engine(max_batch_tokens=model.prefill_chunk)
    handles = [engine.submit(p, max_new_tokens=NEW_TOKENS, greedy=True, ignore_eos=True)
               for p in _prompts(model, level, rng)]
    requests = [handle._request for handle in handles]
    decode_seconds, decode_tokens, kv_peak = 0.0, 0, 0
    while engine.scheduler.has_work:
        all_decoding = not engine.scheduler.waiting and all(r.decoder.new_ids for r in requests)
        before = sum(len(r.decoder.new_ids) for r in requests)
        began = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - began           # the step alone, not this loop's own bookkeeping
        kv_peak = max(kv_peak, model.kv_cache.used_blocks)
        if all_decoding:
            decode_seconds += seconds
            decode_tokens += sum(len(r.decoder.new_ids) for r in requests) - before
    if into is None:
        return
    into.aggregate_tok_s.append(decode_tokens / decode_seconds)
    for request in requests:
        times = request.token_times
        into.first_token_ms.append((times[0] - request.submitted_at) * 1e3)
        into.inter_token_ms.extend(np.diff(times) * 1e3)
    into.products_bound_tok_s.append(products_bound(model, level))
    cache = model.kv_cache
    into.kv_in_use_mib = max(into.kv_in_use_mib, kv_peak * cache.block_size * cache.bytes_per_token / 2**20)


def measure_in_subprocess(name: str, levels: list[int], repeats: int, threads: int, weights: str | None = None
                          ) -> list[LevelMeasurement]:
    command = [sys.executable, "-m", "minitorch_infer.cli.batch_benchmark", name, ",".join(map(str, levels)),
               str(repeats), str(threads or 0), weights or "default"]
    environment = {**os.environ, **({"NUMBA_NUM_THREADS": str(threads)} if threads else {})}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    if completed.returncode != 0:
        raise RuntimeError(f"concurrency benchmark of {name} failed:\n{completed.stderr.strip()}")
    return [LevelMeasurement(**row) for row in json.loads(completed.stdout.strip().splitlines()[-1])]


def merged(rounds: list[list[LevelMeasurement]]) -> list[LevelMeasurement]:
    """The runs of several processes (each a list of levels, in the same order) as one measurement per level."""
    result = []
    for levels in zip(*rounds):
        level = LevelMeasurement(levels[0].concurrency)
        for run in levels:
            level.aggregate_tok_s += run.aggregate_tok_s
            level.first_token_ms += run.first_token_ms
            level.inter_token_ms += run.inter_token_ms
            level.products_bound_tok_s += run.products_bound_tok_s
            level.kv_in_use_mib = max(level.kv_in_use_mib, run.kv_in_use_mib)
        result.append(level)
    return result


def versus(measured: list[LevelMeasurement], baseline: list[LevelMeasurement], label: str) -> str:
    """Aggregate decode at each level over the baseline's, run by run (runs taken in turn, so each ratio compares
    measurements minutes apart at most): the median of the runs' ratios."""
    parts = []
    for ours, theirs in zip(measured, baseline):
        ratios = [a / b for a, b in zip(ours.aggregate_tok_s, theirs.aggregate_tok_s)]
        name = "single" if ours.concurrency == 0 else str(ours.concurrency)
        parts.append(f"{name} {statistics.median(ratios):.2f}x")
    return f"  aggregate decode / {label}, median of {len(ratios)} runs taken in turn: " + ", ".join(parts)


def table(measurements: list[LevelMeasurement]) -> list[str]:
    single = statistics.median(measurements[0].aggregate_tok_s)
    lines = [f"  {'concurrency':<22}{'aggregate decode':>18}{'per request':>13}{'x single':>10}"
             f"{'first token p50/p99':>22}{'inter-token p50/p99':>22}{'products bound':>16}{'KV in use':>11}"]
    for m in measurements:
        aggregate = statistics.median(m.aggregate_tok_s)
        per_request = aggregate / max(m.concurrency, 1)
        first = f"{_percentile(m.first_token_ms, 50):.1f}/{_percentile(m.first_token_ms, 99):.1f} ms"
        inter = (f"{_percentile(m.inter_token_ms, 50):.1f}/{_percentile(m.inter_token_ms, 99):.1f} ms"
                 if m.inter_token_ms else "-")
        label = "single stream (generate)" if m.concurrency == 0 else str(m.concurrency)
        kv = f"{m.kv_in_use_mib:.1f} MiB" if m.concurrency else "-"
        lines.append(f"  {label:<22}{aggregate:>13,.1f} tok/s{per_request:>13,.1f}{aggregate / single:>9.2f}x"
                     f"{first:>22}{inter:>22}{statistics.median(m.products_bound_tok_s):>10,.0f} tok/s{kv:>11}")
    return lines


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


if __name__ == "__main__":
    name_arg, levels_arg, repeats_arg, threads_arg, weights_arg = sys.argv[1:6]
    measured = measure_model(name_arg, [int(c) for c in levels_arg.split(",")], int(repeats_arg), int(threads_arg),
                             None if weights_arg == "default" else weights_arg)
    print(json.dumps([asdict(m) for m in measured]))
