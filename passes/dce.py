"""dce: dead-code elimination. Erase nodes whose results nobody reads, then forget params no node reads.

Its `changed` counts both; the notes tell them apart (`erased nodes`, `unused params`): after the fusions,
the unfused q/k/v and gate/up weights are unused params, while their nodes were already replaced.

Side-effecting nodes stay whether or not their result is read: kv_write fills the KV cache, which the next
step reads. Walking the nodes backwards lets a whole dead chain go in one sweep.
"""

from __future__ import annotations

from ..ir import Graph, op_def
from .manager import PassContext, PassResult, register_pass


@register_pass("dce")
def dce(graph: Graph, ctx: PassContext) -> PassResult:
    erased = 0
    for node in reversed(graph.nodes.copy()):
        if op_def(node.op).side_effect or any(v.users or v.kind == "output" for v in node.outputs):
            continue
        graph.erase(node)
        erased += 1
    params_before = len(graph.params)
    graph.prune_unused()
    pruned = params_before - len(graph.params)
    return PassResult(graph, erased + pruned, {"erased nodes": erased, "unused params": pruned})
