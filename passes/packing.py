"""Packing weights: one param holding several stacked along their first axis, built once at compile time.

`WeightStore.pack` makes the originals views into the packed array, so a fused matmul costs no extra memory.
Without weights (planning or counting ops on a synthetic graph) only the param's type is declared.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

from ..errors import GraphError
from ..ir import Graph, TensorType, Value
from ..formats.weights import stack_rows


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
