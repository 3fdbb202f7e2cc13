"""Measuring speed and memory: our compiled engine against the in-repo naive path, in one run.

The naive path is the reference backend (a plain interpreter that allocates every intermediate) on the
unoptimised traced graph: what running the model without passes, planning or preallocation costs.
Every run is a fresh subprocess, so its peak RSS is its own, and ours and the naive path take turns run by
run, so that a machine whose speed drifts during the benchmark (shared ones do, by up to 1.6x within
minutes) moves both alike and their ratio stays fair.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..backends import numpy as numpy_backend, quantized
from ..backends.layout import StepLayout
from ..panelled import PanelledWeight
from ..quantized import is_quantized

PROMPT_TOKENS = 128
DECODE_TOKENS = 128


@dataclass
class Measurement:
    engine: str
    model: str
    weights: str = "default"
    prefill_tok_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    first_token_ms: list[float] = field(default_factory=list)
    matvec_bound_tok_s: list[float] = field(default_factory=list)
    load_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    blas: str = ""
    profile: dict[str, float] = field(default_factory=dict)


def median_and_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def prompt_ids(model, count: int = PROMPT_TOKENS, seed: int = 0) -> list[int]:
    """A fixed prompt of `count` token ids, the same in every run and for both engines."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, model.config.vocab_size, size=count).tolist()


def blas_description() -> str:
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            return f"{pool.get('internal_api')} {pool.get('version')} {pool.get('architecture')} kernel, {pool.get('num_threads')} threads"
    return "unknown BLAS"


def measure_ours(name: str, repeats: int, profile: bool, weights: str | None = None) -> Measurement:
    import minitorch_infer

    began = time.perf_counter()
    model = minitorch_infer.load(name, context=PROMPT_TOKENS + DECODE_TOKENS + 8, weights=weights)
    result = Measurement("minitorch-infer", name, weights=model.weight_type,
                         load_seconds=[time.perf_counter() - began])
    ids = prompt_ids(model)
    # Warm up (binds the prefill and decode programs) with another prompt: the same one would leave its blocks
    # in the prefix cache, and the measured prefill would compute only the last few tokens.
    model.generate(prompt_ids(model, seed=1), max_new_tokens=4, greedy=True)
    for repeat in range(repeats):
        if repeat:
            ids = prompt_ids(model, seed=1 + repeat)
        run = model.generate(ids, max_new_tokens=DECODE_TOKENS, greedy=True, ignore_eos=True)
        result.prefill_tok_s.append(run.stats.prefill_tokens_per_second)
        result.decode_tok_s.append(run.stats.decode_tokens_per_second)
        result.first_token_ms.append(run.stats.time_to_first_token * 1e3)
        result.matvec_bound_tok_s.append(matvec_bound(model))
    if profile:
        result.profile = profile_decode(model, ids)
    result.peak_rss_mb = peak_rss_mb()
    return result


def matvec_bound(model, steps: int = 8) -> float:
    """Tokens per second of a bare chain of the decode step's matrix-vector products (the same weights,
    layouts and BLAS calls, nothing else): the most a decode step could reach while it reads every weight
    once per token. For SmolLM2 this is memory bandwidth; for a model that fits in cache, BLAS's own speed."""
    return products_bound(model, 1, steps)


def products_bound(model, rows: int, steps: int = 8) -> float:
    """Tokens per second of a bare chain of one step's matrix products with `rows` rows (the step's weights in
    their layouts, nothing else). One row is the decode bound above; with more, what the products a batched
    step of that many sequences runs (the compiled float or panel kernels, or BLAS) allow it."""
    weights = [model.weights[node.inputs[1].name] for node in model.graph.nodes
               if node.op in ("matmul", "matmul_add") and node.inputs[1].kind == "param"]
    calls = [_product(model, np.ones((rows, w.shape[1]), np.float32), w,
                      np.empty((rows, w.shape[0]), np.float32)) for w in weights]
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        for call in calls:
            call()
        times.append(time.perf_counter() - began)
    return rows / statistics.median(times)


def _product(model, x: np.ndarray, w, y: np.ndarray):
    """The product the decode or batched step makes with this weight, as the NumPy backend binds it."""
    if is_quantized(w):
        return quantized.matmul(x, w, y)
    rows, k = x.shape
    w = model.program.panels_for(sequences=rows).get(id(w), w)      # as a step of `rows` sequences
    if isinstance(w, PanelledWeight):
        return numpy_backend.panel_product(x, w, y)
    return numpy_backend.float_product(x, w, y, np.empty((k + w.shape[0]) * rows, np.float32))


def profile_decode(model, ids: list[int]) -> dict[str, float]:
    """Share of a decode step's time per op type."""
    sequence = model.kv_cache.open()
    times: dict[str, float] = {}
    try:
        model.forward(sequence, ids[:16])
        for token in ids[16:48]:
            sequence.reserve(1)
            inputs = {"tokens": np.array([token]), "positions": np.array([sequence.length])}
            layout = StepLayout.of([1], [sequence.slots(sequence.length + 1)])
            for op, seconds in model.program.profile(inputs, sequence.arrays, layout).items():
                times[op] = times.get(op, 0.0) + seconds
            sequence.advance([token])
    finally:
        sequence.close()
    total = sum(times.values())
    return {op: seconds / total for op, seconds in sorted(times.items(), key=lambda item: -item[1])}


def measure_naive(name: str, repeats: int) -> Measurement:
    """The reference backend on the traced graph: prefill the prompt in one step, then decode one by one."""
    import minitorch_infer
    from ..backends import reference

    began = time.perf_counter()
    context = PROMPT_TOKENS + DECODE_TOKENS + 8
    model = minitorch_infer.load(name, context=context, passes=[], kv_memory=f"{context}tokens")
    graph = model.trace()
    params = {n: model.weights[n] for n in graph.params}
    result = Measurement("naive (reference backend)", name, load_seconds=[time.perf_counter() - began])
    ids = prompt_ids(model)

    def fresh_cache():
        return {n: np.zeros(v.type.concrete_shape(), np.float32) for n, v in graph.states.items()}

    reference.run(graph, params, {"tokens": np.array(ids[:8]), "positions": np.arange(8)}, fresh_cache(),
                  {"S": 8, "T": 8})                                     # warm up, as ours does
    for _ in range(repeats):
        state = fresh_cache()
        began = time.perf_counter()
        (logits,) = reference.run(graph, params, {"tokens": np.array(ids), "positions": np.arange(len(ids))},
                                  state, {"S": len(ids), "T": len(ids)})
        token = int(np.argmax(logits[-1]))
        prefill = time.perf_counter() - began
        result.first_token_ms.append(prefill * 1e3)
        began = time.perf_counter()
        for step in range(DECODE_TOKENS - 1):
            position = len(ids) + step
            (logits,) = reference.run(graph, params, {"tokens": np.array([token]), "positions": np.array([position])},
                                      state, {"S": 1, "T": position + 1})
            token = int(np.argmax(logits[-1]))
        result.prefill_tok_s.append(len(ids) / prefill)
        result.decode_tok_s.append((DECODE_TOKENS - 1) / (time.perf_counter() - began))
    result.peak_rss_mb = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_alternating(name: str, repeats: int, threads: int | None, profile: bool, naive: bool,
                        weights: list[str | None] = (None,)) -> tuple[list[Measurement], Measurement | None]:
    """`repeats` runs of ours (at each weight type) and, if `naive`, of the naive path, each in its own
    process, taking turns."""
    ours_runs, naive_runs = {w: [] for w in weights}, []
    for run in range(repeats):
        for w in weights:
            ours_runs[w].append(measure_in_subprocess("ours", name, 1, threads, profile and run == repeats - 1, w))
        if naive:
            naive_runs.append(measure_in_subprocess("naive", name, 1, threads, False))
    return [merged(runs) for runs in ours_runs.values()], merged(naive_runs) if naive else None


def merged(runs: list[Measurement]) -> Measurement:
    """One Measurement holding every run's numbers; peak RSS is the largest any run reached."""
    result = Measurement(runs[0].engine, runs[0].model, runs[0].weights, blas=runs[0].blas,
                         peak_rss_mb=max(run.peak_rss_mb for run in runs))
    for run in runs:
        for series in ("prefill_tok_s", "decode_tok_s", "first_token_ms", "matvec_bound_tok_s", "load_seconds"):
            getattr(result, series).extend(getattr(run, series))
        result.profile = result.profile or run.profile
    return result


def measure_in_subprocess(engine: str, name: str, repeats: int, threads: int | None, profile: bool,
                          weights: str | None = None) -> Measurement:
    """Run one measurement in a fresh interpreter (so peak RSS is this model's alone) and read back its JSON."""
    command = [sys.executable, "-m", "minitorch_infer.cli.benchmark", engine, name, str(repeats), str(threads or 0),
               "1" if profile else "0", weights or "default"]
    environment = {**os.environ, **({"NUMBA_NUM_THREADS": str(threads)} if threads else {})}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark of {name} ({engine}) failed:\n{completed.stderr.strip()}")
    return Measurement(**json.loads(completed.stdout.strip().splitlines()[-1]))


def _worker(engine: str, name: str, repeats: int, threads: int, profile: bool, weights: str | None) -> None:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads or None):
        blas = blas_description()          # before any step: a step in Numba holds OpenBLAS to one thread
        measured = measure_ours(name, repeats, profile, weights) if engine == "ours" else measure_naive(name, repeats)
        measured.blas = blas
    print(json.dumps(asdict(measured)))


if __name__ == "__main__":
    engine_arg, name_arg, repeats_arg, threads_arg, profile_arg, weights_arg = sys.argv[1:7]
    _worker(engine_arg, name_arg, int(repeats_arg), int(threads_arg), profile_arg == "1",
            None if weights_arg == "default" else weights_arg)
