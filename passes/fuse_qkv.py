"""fuse_qkv: the query, key and value projections as one matmul on packed weights, then column views.

    before                                  after

             h                                         h
       ┌─────┼─────┐                                   │
       ▼     ▼     ▼                          matmul(h, @attn.q+k+v)
    matmul matmul matmul                               │
     @q    @k    @v                   add(@attn.q_bias+k_bias+v_bias)  (when all three have a bias)
       │     │     │                         ┌─────────┼─────────┐
       │     │     │                         ▼         ▼         ▼
       │     │     │                    slice_cols slice_cols slice_cols   (views, no copies)
       ▼     ▼     ▼                         │         │         │
       q     k     v   (+ bias)              q         k         v

One matrix product instead of three (one BLAS call, reading h once). The projections are found by their canonical
weight names (`<prefix>.q`, `<prefix>.k`, `<prefix>.v`, all reading the same value); bias adds are packed
too when all three have one.
"""

from __future__ import annotations

from collections import Counter

from ..ir import Graph, Node, Value
from .manager import PassContext, PassResult, register_pass
from .packing import pack_params

PROJECTIONS = ("q", "k", "v")


@register_pass("fuse_qkv")
def fuse_qkv(graph: Graph, ctx: PassContext) -> PassResult:
    fused, left_alone = 0, Counter()
    for node in graph:
        projections = _projection_siblings(node)
        if projections is None:
            continue
        if any(p.output.kind == "output" for p in projections):
            left_alone["a projection is a graph output"] += 1
            continue
        if len({p.inputs[1].type.dtype for p in projections}) != 1:
            left_alone["q, k and v weights are of different types"] += 1
            continue
        _fuse(graph, ctx, projections)
        fused += 1
    return PassResult(graph, fused, {"rewritten": fused, "left alone": dict(left_alone)})


def _projection_siblings(node: Node) -> list[Node] | None:
    """For the q projection `matmul(h, @<prefix>.q)`: it and its k and v siblings reading `h`, else None."""
    if node.op != "matmul" or node.inputs[1].kind != "param" or not node.inputs[1].name.endswith(".q"):
        return None
    prefix = node.inputs[1].name[:-len("q")]
    siblings = {user.inputs[1].name: user for user in node.inputs[0].users
                if user.op == "matmul" and user.inputs[0] is node.inputs[0]}
    found = [siblings.get(prefix + part) for part in PROJECTIONS]
    return found if all(found) else None


def _bias_add(projection: Node) -> Node | None:
    """The `add(projection, @bias[N])` that is the projection's only reader, if there is one."""
    users = projection.output.users
    if len(users) != 1 or users[0].op != "add" or users[0].inputs[0] is not projection.output:
        return None
    bias = users[0].inputs[1]
    is_bias = bias.kind == "param" and bias.type.shape == projection.output.type.shape[1:]
    return users[0] if is_bias and users[0].output.kind != "output" else None


def _fuse(graph: Graph, ctx: PassContext, projections: list[Node]) -> None:
    first = min(projections, key=graph.nodes.index)     # h is defined before all three
    meta = {**first.meta, "fused_from": ("matmul",) * len(projections)}

    def insert(op: str, inputs: list[Value], **attrs) -> Value:
        return graph.create_node(op, inputs, attrs, meta, before=first).output

    weight = pack_params(graph, ctx.weights, [p.inputs[1] for p in projections])
    packed = insert("matmul", [first.inputs[0], weight])
    bias_adds = [_bias_add(p) for p in projections]
    results = [p.output for p in projections]
    if all(bias_adds):
        packed = insert("add", [packed, pack_params(graph, ctx.weights, [a.inputs[1] for a in bias_adds])])
        results = [a.output for a in bias_adds]
    start = 0
    for result in results:
        stop = start + result.type.shape[1]
        graph.replace_all_uses(result, insert("slice_cols", [packed], start=start, stop=stop))
        start = stop
    for node in (bias_adds if all(bias_adds) else []) + projections:
        graph.erase(node)
