"""rope_pairs: rotary embeddings as one complex multiplication, by reordering q/k weight rows.

HF stores q and k so that RoPE rotates dimension i with dimension i + D/2 (rotate-half), which costs seven
array operations. Reordering each head's rows to adjacent pairs (0, D/2, 1, D/2+1, ...) makes every
rotated pair two neighbouring floats: one complex64 multiply. q and k are reordered alike, so q·k, and
with it attention, is unchanged; v is untouched.

    before                                   after
    matmul(h, @q) ─ reshape ─ rope(cos, sin)  matmul(h, @q.pairs) ─ reshape ─ rope_pairs(rotation)
"""

from __future__ import annotations

import numpy as np

from ..ir import Graph, Node
from .manager import PassContext, PassResult, register_pass


@register_pass("rope_pairs")
def rope_pairs(graph: Graph, ctx: PassContext) -> PassResult:
    rotations: dict[tuple, Node] = {}
    changed = 0
    for node in graph:
        projection = _projection_of(node)
        if projection is None:
            continue
        matmul, bias_add = projection
        head_dim = node.inputs[0].shape[2]
        table = node.inputs[1].producer
        key = (id(table.inputs[0]), tuple(sorted(table.attrs.items(), key=lambda item: item[0])))
        if key not in rotations:
            rotations[key] = graph.create_node("rope_rotation", [table.inputs[0]], dict(table.attrs),
                                               meta=table.meta, before=table)
        for weighted in (matmul, bias_add):
            if weighted is not None:
                _use_paired_param(graph, ctx, weighted, 1, head_dim)
        paired = graph.create_node("rope_pairs", [node.inputs[0], rotations[key].output],
                                   meta={**node.meta, "fused_from": ["rope"]}, before=node)
        graph.replace_all_uses(node.output, paired.output)
        graph.erase(node)
        changed += 1
    for node in graph:
        if node.op == "rope_table" and not any(v.users for v in node.outputs):
            graph.erase(node)
    graph.prune_unused()
    return PassResult(graph, changed)


def _projection_of(rope: Node):
    """For rope(reshape(matmul(h, @W) [+ @b]), cos, sin) whose projection feeds only this rope: (matmul, add)."""
    if rope.op != "rope" or rope.inputs[1].producer is None or rope.inputs[1].producer.op != "rope_table":
        return None
    reshape = rope.inputs[0].producer
    if reshape is None or reshape.op != "reshape" or len(reshape.inputs[0].users) != 1:
        return None
    source = reshape.inputs[0].producer
    bias_add = None
    if source is not None and source.op == "add" and source.inputs[1].kind == "param":
        bias_add, source = source, source.inputs[0].producer
        if len(bias_add.inputs[0].users) != 1:
            return None
    if source is None or source.op != "matmul" or source.inputs[1].kind != "param":
        return None
    return source, bias_add


def _use_paired_param(graph: Graph, ctx: PassContext, node: Node, index: int, head_dim: int) -> None:
    """Point node's param input at a copy whose rows (per head) are in adjacent-pair order."""
    original = node.inputs[index]
    name = f"{original.name}.pairs"
    if name not in ctx.weights:
        ctx.weights.add(name, _pair_rows(ctx.weights[original.name], head_dim), origin=ctx.weights.origin(original.name))
    paired = graph.param(name, original.type)
    node.inputs[index] = paired
    original.users.remove(node)
    paired.users.append(node)


def _pair_rows(weight: np.ndarray, head_dim: int) -> np.ndarray:
    half = head_dim // 2
    within_head = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
    heads = weight.shape[0] // head_dim
    order = (np.arange(heads)[:, None] * head_dim + within_head[None, :]).reshape(-1)
    return np.ascontiguousarray(weight[order])
