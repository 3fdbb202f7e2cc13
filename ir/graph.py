"""The op graph: Values joined by Nodes, kept in execution order, with no autograd.

A Graph holds its inputs (token ids, positions), its params (weights, by name; the arrays live in a
WeightStore), its state (the KV cache, reached only through side-effecting ops), its nodes in topological
order and its outputs. Passes edit it in place, torch.fx style: create nodes, redirect uses, erase nodes.
"""

from __future__ import annotations

import copy as copy_module
from typing import Any, Iterable, Iterator

from ..errors import GraphError
from .types import Sym, TensorType

VALUE_KINDS = ("input", "param", "state", "temp", "output")
SIGILS = {"param": "@", "state": "$"}


class Value:
    """One tensor in the graph: its type, its kind, the node that makes it and the nodes that use it."""

    def __init__(self, name: str, type: TensorType, kind: str, producer: Node | None = None):
        if kind not in VALUE_KINDS:
            raise GraphError(f"value {name!r}: unknown kind {kind!r}; known: {', '.join(VALUE_KINDS)}")
        self.name = name
        self.type = type
        self.kind = kind
        self.producer = producer
        self.users: list[Node] = []

    @property
    def shape(self):
        return self.type.shape

    @property
    def ref(self) -> str:
        """How the value is written in the text form: %temp, @param, $state."""
        return SIGILS.get(self.kind, "%") + self.name

    def __repr__(self) -> str:
        return f"{self.ref} : {self.type}"


class Node:
    """One op application: `op`, its input Values, its attributes and the Values it produces."""

    def __init__(self, op: str, inputs: list[Value], attrs: dict[str, Any], meta: dict[str, Any] | None = None):
        self.op = op
        self.inputs = list(inputs)
        self.attrs = dict(attrs)
        self.outputs: list[Value] = []
        self.meta = dict(meta or {})

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise GraphError(f"{self.op} has {len(self.outputs)} outputs; use .outputs")
        return self.outputs[0]

    @property
    def name(self) -> str:
        return self.outputs[0].name if self.outputs else f"<{self.op}>"

    def __repr__(self) -> str:
        from .printer import format_node

        return format_node(self)


class Graph:
    """Inputs, nodes in topological order, outputs; params (`@name`, arrays in the WeightStore) and states
    (`$name`, the KV cache) by name; symbols (S, T, R) with their upper bounds. Print it for the text form;
    walk `graph.nodes` with a for-loop; `to_networkx()` for analyses."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self.inputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self.states: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self.symbols: dict[str, Sym] = {}
        self._next_id = 0

    # --- building ------------------------------------------------------------------------------
    def symbol(self, name: str, max: int) -> Sym:
        existing = self.symbols.get(name)
        if existing is not None and existing.max != max:
            raise GraphError(f"symbol {name} declared twice, with bounds {existing.max} and {max}")
        self.symbols[name] = Sym(name, max)
        return self.symbols[name]

    def add_input(self, name: str, type: TensorType) -> Value:
        value = Value(name, type, "input")
        self.inputs.append(value)
        return value

    def param(self, name: str, type: TensorType) -> Value:
        """The param called `name`, declared on first use; a second use must agree on the type."""
        return self._named_value(self.params, name, type, "param")

    def state(self, name: str, type: TensorType) -> Value:
        return self._named_value(self.states, name, type, "state")

    def _named_value(self, table: dict[str, Value], name: str, type: TensorType, kind: str) -> Value:
        if name in table:
            if table[name].type != type:
                raise GraphError(f"{kind} {name!r} used as {type} but declared {table[name].type}")
            return table[name]
        table[name] = Value(name, type, kind)
        return table[name]

    def fresh_name(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def create_node(self, op: str, inputs: list[Value], attrs: dict[str, Any] | None = None,
                    meta: dict[str, Any] | None = None, before: Node | None = None) -> Node:
        """Make a node, infer its output types from the op registry, and insert it (at the end, or before `before`)."""
        from .ops import infer_types

        node = Node(op, inputs, attrs or {}, meta)
        for value in node.inputs:
            if not isinstance(value, Value):
                raise GraphError(f"{op}: input {value!r} is not a graph Value")
        for out_type, kind in infer_types(node):
            node.outputs.append(Value(self.fresh_name(), out_type, kind, producer=node))
        index = len(self.nodes) if before is None else self.nodes.index(before)
        self.nodes.insert(index, node)
        for value in node.inputs:
            value.users.append(node)
        return node

    def set_outputs(self, values: Iterable[Value]) -> None:
        for value in self.outputs:
            value.kind = "temp"
        self.outputs = list(values)
        for value in self.outputs:
            if value.kind != "temp":
                raise GraphError(f"graph output {value.ref} must be computed by a node, not be a {value.kind}")
            value.kind = "output"

    # --- editing ---------------------------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Point every user of `old` (and the graph outputs) at `new`."""
        if old.type != new.type:
            raise GraphError(f"cannot replace {old.ref} : {old.type} with {new.ref} : {new.type}")
        for user in old.users:
            user.inputs = [new if v is old else v for v in user.inputs]
            if user not in new.users:
                new.users.append(user)
        old.users = []
        if old in self.outputs:
            self.set_outputs(new if v is old else v for v in self.outputs)

    def erase(self, node: Node) -> None:
        """Remove a node whose outputs nobody uses."""
        for value in node.outputs:
            if value.users or value in self.outputs:
                raise GraphError(f"cannot erase {node.op} -> {value.ref}: still used")
        self.nodes.remove(node)
        for value in node.inputs:
            if node in value.users:
                value.users.remove(node)

    def prune_unused(self) -> None:
        """Forget params and states no node uses any more (after a pass replaced them)."""
        self.params = {n: v for n, v in self.params.items() if v.users}
        self.states = {n: v for n, v in self.states.items() if v.users}

    # --- reading ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        return iter(list(self.nodes))

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.params.values()
        yield from self.states.values()
        for node in self.nodes:
            yield from node.outputs

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts

    def copy(self) -> Graph:
        return copy_module.deepcopy(self)

    def to_networkx(self):
        """A networkx DiGraph over node indices (edge u -> v when v reads an output of u), for analysis."""
        import networkx as nx

        index = {id(n): i for i, n in enumerate(self.nodes)}
        digraph = nx.DiGraph()
        for i, node in enumerate(self.nodes):
            digraph.add_node(i, op=node.op, node=node)
            for value in node.inputs:
                if value.producer is not None:
                    digraph.add_edge(index[id(value.producer)], i, value=value.name)
        return digraph

    def __str__(self) -> str:
        from .printer import format_graph

        return format_graph(self)
