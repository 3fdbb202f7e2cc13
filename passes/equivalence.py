"""check_equivalent: run two graphs on the reference backend with the same random inputs and compare.

A pass is correct when the graph it returns computes what it was given: the same outputs and the same KV
cache afterwards. Testing a new pass takes one line:

    check_pass(graph, ["my_pass"])                  # random weights; runs the pass on a copy and compares
    check_equivalent(before, after, model.weights)  # two graphs you already have
    check_kernels(graph)                            # the NumPy backend's kernels against the reference's

Each trial draws S new tokens (ids within the vocabulary) at positions past..past+S-1, over a KV cache
filled with random values, copied for each graph; the cache afterwards is compared too, so passes that
mishandle it show up. (Passes that change the cache's layout: same_cache_layout=False, see below.)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..backends import reference
from ..backends.layout import StepLayout
from ..backends.reference import run
from ..errors import GraphError
from ..ir import Graph, Sym, Value
from ..ir.printer import format_node
from ..formats.weights import WeightStore
from ..quantized import is_quantized
from .manager import PassFunction, PassManager, PassReport

MAX_TRIAL_TOKENS = 16      # enough rows to catch row mix-ups, few enough to keep the oracle fast
MAX_TRIAL_PAST = 32


def random_weights(graph: Graph, seed: int = 0) -> WeightStore:
    """Weights of the declared shapes, scaled so activations stay near unit size through deep graphs."""
    rng = np.random.default_rng(seed)
    store = WeightStore(source=f"<random weights for {graph.name}>")
    for name, value in graph.params.items():
        shape = value.type.concrete_shape()
        if len(shape) == 1:                                     # norm weights and biases
            array = 1 + 0.1 * rng.standard_normal(shape)
        else:
            array = rng.standard_normal(shape) / np.sqrt(shape[-1])
        store.add(name, array.astype(np.float32))
    return store


def check_equivalent(before: Graph, after: Graph, weights: Mapping[str, np.ndarray] | WeightStore | None = None,
                     *, trials: int = 2, rtol: float = 1e-5, atol: float = 1e-5, seed: int = 0,
                     same_cache_layout: bool = True) -> float:
    """Raise AssertionError (naming the output or cache and the largest difference) unless `after` computes
    what `before` does; return the largest absolute difference seen.

    Without `weights`, random ones are made for `before`'s params; params only `after` declares (packed by a
    pass) then cannot exist, so pass the weights the passes ran with (or use check_pass).

    By default each trial is one step over a cache with random past positions, comparing the outputs and the
    whole cache afterwards. A pass that changes how the cache stores keys and values (rope_pairs reorders
    them) cannot read a cache the other graph filled: with same_cache_layout=False each trial is a prefill
    from an empty cache and then a decode step, each graph filling its own cache, and only outputs compare.
    """
    _check_signatures(before, after)
    if weights is None:
        added = sorted(set(after.params) - set(before.params))
        if added:
            raise GraphError(f"`after` reads params `before` lacks ({', '.join(added[:3])}): a pass built them "
                             "from weights, so give check_equivalent the weights it ran with, or use "
                             "check_pass(graph, passes)")
        weights = random_weights(before, seed)
    rng = np.random.default_rng(seed)
    labels = [f"output {i} ({v.ref} in `before`)" for i, v in enumerate(before.outputs)]
    largest = 0.0
    for trial in range(trials):
        steps = _trial_steps(before, trial, rng, same_cache_layout)
        step_inputs = [{v.name: _random_input(v, bindings, rng) for v in before.inputs} for bindings in steps]
        state = {name: rng.standard_normal(v.type.concrete_shape()).astype(np.float32)
                 for name, v in before.states.items()}
        results = []
        for graph in (before, after):
            params, graph_state, compared = _params_of(graph, weights), _copy(state), {}
            for bindings, inputs in zip(steps, step_inputs):
                step = f"trial {trial} ({', '.join(f'{k}={v}' for k, v in bindings.items())})"
                outputs = run(graph, params, inputs, graph_state, bindings)
                compared |= {f"{label} on {step}": output for label, output in zip(labels, outputs)}
            if same_cache_layout:
                compared |= {f"KV state ${name} after {step}": array for name, array in graph_state.items()}
            results.append(compared)
        for label, expected in results[0].items():
            largest = max(largest, _compare(label, expected, results[1][label], rtol, atol))
    return largest


def check_pass(graph: Graph, passes: Sequence[str | PassFunction],
               weights: Mapping[str, np.ndarray] | WeightStore | None = None, *, kernels: bool = False,
               **tolerances: Any) -> tuple[Graph, PassReport]:
    """Run `passes` on a copy of `graph` (with random weights unless given) and check_equivalent the result;
    with kernels=True, also check_kernels the optimised graph (the NumPy kernels of the ops the passes made,
    a new op's included, against the reference backend's)."""
    weights = random_weights(graph) if weights is None else weights
    optimised, report = PassManager(passes).run(graph.copy(), weights)
    check_equivalent(graph, optimised, report.weights(weights), **tolerances)
    if kernels:
        check_kernels(optimised, report.weights(weights))
    return optimised, report


def check_kernels(graph: Graph, weights: Mapping[str, np.ndarray] | WeightStore | None = None, *,
                  rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0) -> float:
    """Run `graph` on the NumPy backend node by node, and give each node's reference kernel the very inputs the
    NumPy kernel got: the first node whose outputs differ raises AssertionError naming it (its text form, op
    and the source line that traced it) and the step. Returns the largest absolute difference seen.

    The steps, over one KV pool of random values: a prefill of one sequence (up to 16 new tokens after a
    random past), then a decode token of it (so both the many-row and the one-row kernels run), then, when
    the graph takes several sequences a step, two more rows of it with one decode row of a second sequence
    whose positions are scattered over the pool (the batched kernels' layout). Weights are random unless given
    (with a pass's derived params: `report.weights(base)`).
    """
    from ..backends import numpy as numpy_backend      # the backend under test; the reference is the oracle
    from .memory_plan import plan_memory

    weights = random_weights(graph, seed) if weights is None else weights
    rng = np.random.default_rng(seed)
    # every value its own buffer, so a kernel's output can be read after it ran and before the next overwrites it
    program = numpy_backend.compile(graph, plan_memory(graph, reuse=False), _params_of(graph, weights))
    state = {name: rng.standard_normal(v.type.concrete_shape()).astype(np.float32) for name, v in graph.states.items()}
    largest = 0.0
    for label, layout in _kernel_check_steps(graph, rng):
        bindings = {"S": layout.rows, "T": max(layout.totals), "R": layout.sequences}
        inputs = {v.name: _layout_positions(layout) if v.name == "positions" else _random_input(v, bindings, rng)
                  for v in graph.inputs}
        step = reference.Step(bindings, layout)
        for node, ins, outs, call in program.bound_nodes(inputs, state, layout):
            # a quantised weight reaches the reference kernel as its dequantised values, as in reference.run
            expected = reference.KERNELS[node.op]([a.dequantize() if is_quantized(a) else np.array(a)
                                                   for a in ins], node.attrs, step)
            expected = expected if isinstance(expected, tuple) else (expected,)
            if call is not None:
                call()
            where = (f"node {format_node(node)} (op {node.op!r}, traced at {node.meta.get('source', '?')}) on the "
                     f"{label} step (S={layout.rows}, T={list(layout.totals)}): NumPy kernel vs reference kernel, "
                     "same inputs")
            for index, (want, got) in enumerate(zip(expected, outs)):
                largest = max(largest, _compare(f"{where}, output {index}", np.asarray(want), got, rtol, atol))
    return largest


def _kernel_check_steps(graph: Graph, rng: np.random.Generator) -> list[tuple[str, StepLayout]]:
    symbols = _symbols(graph)
    new = min(symbols["S"].max, MAX_TRIAL_TOKENS) if "S" in symbols else 1
    past = int(rng.integers(0, max(min(symbols["T"].max - new - 3, MAX_TRIAL_PAST), 0) + 1)) if "T" in symbols else 0
    steps = [("prefill", StepLayout.single(new, past + new)), ("decode", StepLayout.single(1, past + new + 1))]
    slots = min((v.type.concrete_shape()[1] for v in graph.states.values() if v.type.rank == 3), default=0)
    first_total, second_total = past + new + 3, 5
    if symbols.get("R") is not None and symbols["R"].max >= 2 and symbols["S"].max >= 3 \
            and first_total + 2 * second_total <= slots and first_total <= symbols["T"].max:
        scattered = np.arange(first_total, first_total + 2 * second_total, 2)
        steps.append(("two-sequence", StepLayout.of([2, 1], [np.arange(first_total), scattered])))
    return steps


def _layout_positions(layout: StepLayout) -> np.ndarray:
    """Each row's position in its sequence: a sequence with n new rows and T positions has T-n..T-1."""
    return np.concatenate([np.arange(total - (stop - start), total) for start, stop, total in
                           zip(layout.row_starts, layout.row_stops, layout.totals)]).astype(np.int32)


def _check_signatures(before: Graph, after: Graph) -> None:
    """Both graphs must take the same inputs and state and give outputs of the same types."""
    def signature(graph: Graph) -> dict[str, Any]:
        return {"inputs": [(v.name, v.type) for v in graph.inputs],
                "KV state": sorted((name, v.type) for name, v in graph.states.items()),
                "output types": [v.type for v in graph.outputs]}

    for part, expected in signature(before).items():
        found = signature(after)[part]
        if found != expected:
            raise GraphError(f"`after` cannot replace `before`: {part} differ: {found} vs {expected}")


def _trial_steps(graph: Graph, trial: int, rng: np.random.Generator, same_cache_layout: bool
                 ) -> list[dict[str, int]]:
    """The bindings of each step of a trial. S (new tokens) is the most the oracle affords in trial 0, one (a
    decode step) in trial 1, random after. T (cached positions after the step) is a random past plus S; or,
    when each graph fills its own cache, S then S + 1 (a prefill from empty, then a decode step)."""
    symbols = _symbols(graph)
    most = min(symbols["S"].max, MAX_TRIAL_TOKENS) if "S" in symbols else 1
    new = (most, 1)[trial] if trial < 2 else int(rng.integers(1, most + 1))
    if same_cache_layout:
        past = int(rng.integers(0, min(symbols["T"].max - new, MAX_TRIAL_PAST) + 1)) if "T" in symbols else 0
        steps = [{"S": new, "T": past + new}]
    else:
        steps = [{"S": new, "T": new}, {"S": 1, "T": new + 1}]
    # R (sequences in the step) is 1: a trial step is one sequence whose positions fill the cache from slot 0.
    others = {name: 1 if name == "R" else int(rng.integers(1, sym.max + 1))
              for name, sym in symbols.items() if name not in ("S", "T")}
    return [{name: value for name, value in step.items() if name in symbols} | others for step in steps]


def _copy(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: array.copy() for name, array in state.items()}


def _symbols(graph: Graph) -> dict[str, Sym]:
    """Every symbol the graph mentions: in value types, and in attributes (kv_write's `total`)."""
    found = dict(graph.symbols)
    for value in graph.values():
        found.update((sym.name, sym) for sym in value.type.symbols)
    for node in graph.nodes:
        found.update((attr.name, attr) for attr in node.attrs.values() if isinstance(attr, Sym))
    return found


def _random_input(value: Value, bindings: Mapping[str, int], rng: np.random.Generator) -> np.ndarray:
    """Token ids within the table of the embedding that reads them; other integers are positions."""
    shape = value.type.concrete_shape(bindings)
    if value.type.dtype != "i32":
        return rng.standard_normal(shape).astype(value.type.np_dtype)
    tables = [user.inputs[1] for user in value.users if user.op == "embedding" and user.inputs[0] is value]
    if tables:
        return rng.integers(0, tables[0].type.shape[0], size=shape).astype(np.int32)
    new = shape[0] if shape else 1
    first = bindings.get("T", new) - new
    return np.arange(first, first + new, dtype=np.int32).reshape(shape)


def _params_of(graph: Graph, weights: Mapping[str, np.ndarray] | WeightStore) -> dict[str, np.ndarray]:
    params = {}
    for name, value in graph.params.items():
        if name not in weights:
            raise GraphError(f"{graph.name} reads param @{name}, which the weights given do not hold")
        array = weights[name]
        array = array if is_quantized(array) else np.asarray(array)
        if array.shape != value.type.concrete_shape():
            raise GraphError(f"weight {name!r} has shape {list(array.shape)}; {graph.name} declares {value.type}")
        params[name] = array
    return params


def _compare(label: str, expected: np.ndarray, found: np.ndarray, rtol: float, atol: float) -> float:
    if expected.shape != found.shape:
        raise AssertionError(f"{label} differs in shape: {found.shape} instead of {expected.shape}")
    difference = np.abs(expected.astype(np.float64) - found.astype(np.float64))
    nan_mismatch = np.isnan(expected) != np.isnan(found)
    difference = np.where(np.isnan(difference), 0.0, difference)
    bad = (difference > atol + rtol * np.abs(expected)) | nan_mismatch
    if bad.any():
        worst = np.where(nan_mismatch, np.inf, np.where(bad, difference, -1.0))
        index = np.unravel_index(np.argmax(worst), bad.shape)
        raise AssertionError(
            f"{label} differs: max |difference| {difference.max():.3g} (allowed {atol:g} + {rtol:g}·|value|); "
            f"at {tuple(int(i) for i in index)}: {float(found[index])} instead of {float(expected[index])}; "
            f"{int(bad.sum())} of {bad.size} elements out of tolerance")
    return float(difference.max(initial=0.0))
