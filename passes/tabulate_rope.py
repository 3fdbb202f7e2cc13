"""tabulate_rope: the rotary cos/sin table computed once for every position, then looked up per step.

    before                                  after

    positions                               positions
        │                                       │
    rope_table          cos/sin of       embedding(positions, @rope.table)    one row per position
        │               S × head_dim/2          │                             the cache can hold
        ▼               angles every step       ▼

Constant folding over an input's whole range: positions are below the cache length T, so the table holds
cache-length rows, made by the reference kernel itself (in float64, then rounded). A decode step then copies one
row instead of computing sines. The table costs context × head_dim floats (1 MiB for SmolLM2 at 4,096
positions). Dynamic-NTK scaling is left alone: its frequencies depend on how long the sequence is, so no
single table serves every step.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..backends import reference
from ..backends.rope import is_position_dependent
from ..ir import Graph, TensorType, Value
from .manager import PassContext, PassResult, register_pass
from .pattern import Match, P, rewrite

ROPE_TABLE = P("rope_table", P.var("positions"), name="table")


@register_pass("tabulate_rope")
def tabulate_rope(graph: Graph, ctx: PassContext) -> PassResult:
    tables: dict[str, Value] = {}              # one param per distinct rope_table (a model has one)

    def build(m: Match) -> Value | None:
        attrs = m.node("table").attrs
        if is_position_dependent(attrs["scaling"]):
            return m.decline("dynamic NTK scaling: the frequencies change with the sequence length")
        positions = _cache_length(graph)
        if positions is None:
            return m.decline("no KV cache bounds the positions")
        key = repr(sorted(attrs.items()))
        if key not in tables:
            tables[key] = _table_param(graph, ctx, attrs, positions)
        return m.insert("embedding", m["positions"], tables[key])

    return rewrite(graph, ROPE_TABLE, build)


def _cache_length(graph: Graph) -> int | None:
    """How many positions the KV cache holds (the bound of kv_write's `total`), or None without a cache."""
    bounds = {node.attrs["total"].max for node in graph.nodes if node.op == "kv_write"}
    return min(bounds) if bounds else None


def _table_param(graph: Graph, ctx: PassContext, attrs: dict, positions: int) -> Value:
    """The param [positions, head_dim] of every position's cos/sin pairs, added to the weights unless None.

    Named `rope.table`, or `rope.table.N` when that name is taken by another table: the weights outlive a
    compile, and a recompile with another context or rope must not pick up a stale table by its name.
    """
    rows = reference.KERNELS["rope_table"]([np.arange(positions)], attrs, {})
    weights = ctx.weights if ctx.weights is not None else {}
    for index in itertools.count():
        name = "rope.table" + (f".{index}" if index else "")
        if name in graph.params:
            continue
        if name not in weights:
            if ctx.weights is not None:
                _add(ctx.weights, name, rows)
            break
        if weights[name].shape == rows.shape and np.array_equal(weights[name], rows):
            break
    return graph.param(name, TensorType(rows.shape, "f32"))


def _add(weights, name: str, rows: np.ndarray) -> None:
    if hasattr(weights, "add"):
        weights.add(name, rows, origin="computed by tabulate_rope")
    else:
        weights[name] = rows
