"""Passes and the PassManager that runs them.

A pass is a function `(graph, ctx) -> PassResult` registered under a name. It may edit the graph in place
and returns it with a count of the rewrites it made. The PassManager runs a pipeline, verifies the graph
after every pass (naming the pass that broke it), times each pass and keeps per-pass statistics.
"""

from __future__ import annotations

import time
from collections import ChainMap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import GraphError, MinitorchError
from ..ir import Graph, verify


@dataclass
class PassContext:
    """What a pass may use besides the graph: the weights (a WeightStore, a plain dict, or None for a graph
    without weights), to build packed params once at compile time, and `derived`, the params passes of this
    run computed (see passes.packing.derive_param): kept here, not written into `weights`."""

    weights: Any
    derived: dict[str, Any] = field(default_factory=dict)

    @property
    def all_weights(self):
        """The weights with this run's derived params in front (read-only use)."""
        return ChainMap(self.derived, self.weights)


@dataclass
class PassResult:
    graph: Graph
    changed: int = 0                               # how many rewrites the pass made
    notes: dict[str, Any] = field(default_factory=dict)


PassFunction = Callable[[Graph, PassContext], PassResult]
PASSES: dict[str, PassFunction] = {}


def register_pass(name: str):
    """Decorator: make a pass available by name (to Model.compile(passes=[...]) and the CLI's --passes)."""

    def register(fn: PassFunction) -> PassFunction:
        if name in PASSES and PASSES[name] is not fn:
            raise GraphError(f"a pass named {name!r} is already registered")
        PASSES[name] = fn
        fn.pass_name = name
        return fn

    return register


@dataclass
class PassStats:
    name: str
    seconds: float
    changed: int
    nodes_before: int
    nodes_after: int
    notes: dict[str, Any]


@dataclass
class PassReport:
    stats: list[PassStats] = field(default_factory=list)
    derived: dict[str, Any] = field(default_factory=dict)     # params the passes computed (derive_param)

    def weights(self, base: Any):
        """What to compile the optimised graph with: `base` (the weights the passes ran with) and the params
        they derived, which only the compiled program holds."""
        return ChainMap(self.derived, base) if self.derived else base

    def __str__(self) -> str:
        """One row per pass, columns aligned however long the names: what it changed, the node count before ->
        after, its time, and its notes (what dce erased and forgot; the matches a rewrite left alone, and why)."""
        if not self.stats:
            return "no passes run"
        width = max(len("pass"), *(len(s.name) for s in self.stats))
        lines = [f"{'pass':<{width}} {'changed':>7} {'nodes':>13} {'ms':>8}  notes"]
        for s in self.stats:
            row = f"{s.name:<{width}} {s.changed:>7} {s.nodes_before:>5} -> {s.nodes_after:<5} {s.seconds * 1e3:>8.2f}"
            lines.append(f"{row}  {format_notes(s.notes)}".rstrip())
        return "\n".join(lines)


def format_notes(notes: dict[str, Any]) -> str:
    """A pass's notes on one line: `left alone` (reason -> count) as `left alone: 2 x reason`; "rewritten"
    is the changed column already."""
    parts = []
    for key, value in notes.items():
        if key == "rewritten":
            continue
        if isinstance(value, dict):
            if value:
                parts.append(f"{key}: " + "; ".join(f"{count} x {reason}" for reason, count in value.items()))
        else:
            parts.append(f"{key}: {value}")
    return ", ".join(parts)


def resolve_pass(item: str | PassFunction) -> tuple[str, PassFunction]:
    if callable(item):
        return getattr(item, "pass_name", getattr(item, "__name__", "pass")), item
    if item not in PASSES:
        raise MinitorchError(f"unknown pass {item!r}; available: {', '.join(sorted(PASSES))} (a pass registered "
                             "in a module of your own: import it first, or --plugin MODULE on the command line)")
    return item, PASSES[item]


class PassManager:
    """Runs a pipeline of passes (names or functions) over a graph: verifies after each (naming the pass that
    broke the graph), times each, and can write the graph as dot after each (`dump_dot_dir`)."""

    def __init__(self, passes: Sequence[str | PassFunction], verify_each: bool = True,
                 dump_dot_dir: str | Path | None = None):
        self.passes = [resolve_pass(p) for p in passes]
        self.verify_each = verify_each
        self.dump_dot_dir = Path(dump_dot_dir) if dump_dot_dir else None

    def run(self, graph: Graph, weights: Any) -> tuple[Graph, PassReport]:
        """Run the pipeline on `graph` (edited in place; pass a copy to keep it) with `weights` (a WeightStore,
        a plain dict, or None); returns the optimised graph and the report, whose `weights(base)` adds the
        params the passes derived, for compiling."""
        context = PassContext(weights)
        report = PassReport(derived=context.derived)
        self._dump(graph, 0, "traced")
        for index, (name, fn) in enumerate(self.passes, start=1):
            nodes_before = len(graph.nodes)
            existing = set(graph.nodes)
            began = time.perf_counter()
            try:
                result = fn(graph, context)
            except Exception as error:   # a user's pass may fail any way: say which pass it was
                raise GraphError(f"pass {name!r} failed: {type(error).__name__}: {error}") from error
            if not isinstance(result, PassResult):
                raise GraphError(f"pass {name!r} returned {type(result).__name__}, not a PassResult")
            seconds = time.perf_counter() - began
            graph = result.graph
            if self.verify_each:
                try:
                    verify(graph)
                except GraphError as error:
                    raise GraphError(f"pass {name!r} produced an invalid graph: {error}") from None
            for node in graph.nodes:         # a node this pass made by fusing others remembers it (bench --profile)
                if node not in existing and "fused_from" in node.meta:
                    node.meta.setdefault("pass", name)       # kept when a pass rebuilds an earlier fusion
            report.stats.append(PassStats(name, seconds, result.changed, nodes_before, len(graph.nodes), result.notes))
            self._dump(graph, index, name)
        return graph, report

    def _dump(self, graph: Graph, index: int, label: str) -> None:
        if self.dump_dot_dir is None:
            return
        from ..ir.dot import write_dot

        self.dump_dot_dir.mkdir(parents=True, exist_ok=True)
        write_dot(graph, self.dump_dot_dir / f"{index:02d}_{label}.dot")
