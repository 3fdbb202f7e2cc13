"""Weights a pass makes: one param holding several stacked along their first axis (`pack_params`), or any
param computed from others (`derive_param`), built once at compile time.

`WeightStore.pack` makes the originals views into the packed array, so a fused matmul costs no extra memory.
A derived param is kept in the pass context (`ctx.derived`), not in the model's WeightStore: the compiled
program holds it, and a check_pass on the model's weights leaves them as they were.
Without weights (planning or counting ops on a synthetic graph) only the param's type is declared.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any, Callable

import numpy as np

from ..errors import GraphError
from ..ir import Graph, TensorType, Value
from ..formats.weights import stack_rows
from .manager import PassContext


def packed_name(names: list[str]) -> str:
    """`layers.0.attn.q`, `layers.0.attn.k`, `layers.0.attn.v` -> `layers.0.attn.q+k+v`."""
    prefix = os.path.commonprefix(names)
    prefix = prefix[:prefix.rfind(".") + 1]          # cut at a dot, so "gate"/"up" do not share a letter
    return prefix + "+".join(name[len(prefix):] for name in names)


def pack_params(graph: Graph, weights: Any, params: list[Value]) -> Value:
    """The param stacking `params` along axis 0 (declared in `graph`, and built in `weights` unless None)."""
    shapes = [p.type.shape for p in params]
    if (any(p.kind != "param" for p in params) or len({shape[1:] for shape in shapes}) != 1
            or len({p.type.dtype for p in params}) != 1):
        shown = ", ".join(f"{p.ref} : {p.type}" for p in params)
        raise GraphError(f"cannot pack {shown}: all must be params of one type that differ only in their first axis")
    names = [p.name for p in params]
    name = packed_name(names)
    rows = sum(shape[0] for shape in shapes)
    packed = graph.param(name, TensorType((rows, *shapes[0][1:]), params[0].type.dtype))
    if hasattr(weights, "pack"):
        weights.pack(name, names)
    elif isinstance(weights, MutableMapping) and name not in weights:
        weights[name] = stack_rows([weights[n] for n in names])
    return packed


def derive_param(graph: Graph, ctx: PassContext, name: str, shape: tuple[int, ...],
                 compute: Callable[[Any], np.ndarray]) -> Value:
    """Declare the param `name` : f32[shape] in `graph`, computed as `compute(weights)` from the weights the
    pass runs with (a WeightStore, a plain dict, or None on a synthetic graph, when nothing is computed).

    The array goes into `ctx.derived`, which the PassManager hands on to whoever compiles the graph
    (`PassReport.weights(base)`), never into the model's store: a derived weight lives exactly as long as the
    program that reads it. `compute` gets a read-only view of the weights that also sees what earlier
    passes derived. E.g. folding RMSNorm's gain g into the next matmul's weight W [N, K]:

        folded = derive_param(graph, ctx, f"{w.name}*{g.name}", w.type.shape,
                              lambda weights: weights[w.name] * weights[g.name])
    """
    if name in graph.params:
        existing = graph.params[name]
        if existing.type.shape != tuple(shape):
            raise GraphError(f"derive_param: @{name} already exists as {existing.type}, not f32{list(shape)}")
        return existing
    if ctx.weights is not None and name not in ctx.derived:
        array = np.asarray(compute(ctx.all_weights), dtype=np.float32)
        if array.shape != tuple(shape):
            raise GraphError(f"derive_param: computing @{name} gave shape {list(array.shape)}, "
                             f"declared {list(shape)}")
        ctx.derived[name] = array
    return graph.param(name, TensorType(tuple(shape), "f32"))
