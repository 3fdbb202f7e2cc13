"""The readable text form of a graph, one node a line:

    %12 = matmul(%11, @layers.0.attn.q) : f32[S, 576]

A quantised param carries its block type: `@layers.0.attn.q:q8_0`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .graph import Graph, Node


def format_attr(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(format_attr(v) for v in value) + ")"
    return str(value)


def format_operand(value) -> str:
    return f"{value.ref}:{value.type.dtype}" if value.type.is_quantized else value.ref


def format_node(node: Node) -> str:
    results = ", ".join(v.ref for v in node.outputs)
    args = [format_operand(v) for v in node.inputs]
    args += [f"{k}={format_attr(v)}" for k, v in node.attrs.items()]
    types = ", ".join(str(v.type) for v in node.outputs)
    return f"{results} = {node.op}({', '.join(args)}) : {types}"


def format_graph(graph: Graph) -> str:
    lines = [f"graph {graph.name}("]
    lines += [f"    {v.ref} : {v.type}," for v in graph.inputs]
    lines.append(") {")
    layer = None
    for node in graph.nodes:
        if node.meta.get("layer") != layer:
            layer = node.meta.get("layer")
            if layer is not None:
                lines.append(f"  # layer {layer}")
        lines.append(f"  {format_node(node)}")
    lines.append(f"  return {', '.join(v.ref for v in graph.outputs)}")
    lines.append("}")
    return "\n".join(lines)
