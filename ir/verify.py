"""verify(graph): the structural checks the PassManager runs after every pass.

Defined before use, users consistent with inputs, every op registered, stored types equal re-inferred
ones, params and states declared, outputs produced by nodes, no value without a purpose.
"""

from __future__ import annotations

from ..errors import GraphError
from .graph import Graph
from .ops import infer_types, op_def


def verify(graph: Graph) -> None:
    """Raise GraphError describing the first problem found, or return None for a valid graph."""
    defined = {id(v) for v in graph.inputs}
    defined |= {id(v) for v in graph.params.values()}
    defined |= {id(v) for v in graph.states.values()}
    for name, value in graph.params.items():
        if value.kind != "param" or value.name != name:
            raise GraphError(f"param table entry {name!r} holds {value.ref} of kind {value.kind}")
    producers = {}
    for index, node in enumerate(graph.nodes):
        where = f"node {index} ({node.op} -> {node.name})"
        op_def(node.op)
        for value in node.inputs:
            if id(value) not in defined:
                raise GraphError(f"{where}: input {value.ref} is not defined before use")
            if node not in value.users:
                raise GraphError(f"{where}: {value.ref} does not list this node among its users")
        try:
            expected = infer_types(node)
        except GraphError as error:
            raise GraphError(f"{where}: {error}") from None
        if [(v.type, v.kind if v.kind != "output" else "temp") for v in node.outputs] != expected:
            stored = ", ".join(f"{v.type} ({v.kind})" for v in node.outputs)
            inferred = ", ".join(f"{t} ({k})" for t, k in expected)
            raise GraphError(f"{where}: stored output types {stored} differ from inferred {inferred}")
        for value in node.outputs:
            if value.producer is not node:
                raise GraphError(f"{where}: output {value.ref} names another producer")
            if id(value) in defined:
                raise GraphError(f"{where}: {value.ref} is defined twice")
            defined.add(id(value))
            producers[id(value)] = node
    node_ids = {id(n) for n in graph.nodes}
    for value in graph.values():
        for user in value.users:
            if id(user) not in node_ids or value not in user.inputs:
                raise GraphError(f"{value.ref} lists a user ({user.op}) that is not in the graph or not reading it")
    if not graph.outputs:
        raise GraphError("graph has no outputs")
    for value in graph.outputs:
        if id(value) not in producers or value.kind != "output":
            raise GraphError(f"output {value.ref} is not produced by a node of this graph")
