"""Pattern rewriting: find a small op tree with variables, replace it with what a builder returns.

Rules are written as data (tinygrad's UPat, torch.fx's replace_pattern):

    x = P.var("x")                                            # any value; a name used twice means the same value
    RESIDUAL = P("add", P.var("residual"), P("matmul", x, P.var("w"), name="product"))

    def build(m: Match) -> Value | None:
        if m["residual"].type != m["product"].type:
            return m.decline("a broadcast bias, not an accumulator")
        return m.insert("matmul_add", m["x"], m["w"], m["residual"])

    result = rewrite(graph, RESIDUAL, build)                  # a PassResult, with a report in its notes

Operands of add and mul match in either order. A builder inserts nodes with `m.insert` (placed before the
matched root) and returns the Value that replaces the root, or declines by returning None (`m.decline`
records why). Matched nodes left without users are erased.

Safe by default, as ONNX Runtime's and ggml's fusions are: a matched intermediate whose result is read outside
the match, or is a graph output, or that has side effects (kv_write), blocks the match, because it would
have to be computed anyway (or must not disappear).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable, Iterator

from ..errors import GraphError
from ..ir import Graph, Node, Value, op_def
from .manager import PassResult

COMMUTATIVE_OPS = frozenset({"add", "mul"})
MAX_SWEEPS = 100


class Pattern:
    """One node of a rule: an op (or any of a set of ops) over input patterns, or a variable matching any value.

    An op pattern given no input patterns matches the op whatever its inputs. `name` binds the matched value
    for the builder; `attrs` must equal the node's attributes.
    """

    def __init__(self, op: str | Iterable[str] | None, *inputs: Pattern, name: str | None = None,
                 kind: str | None = None, **attrs: Any):
        self.ops = None if op is None else frozenset([op] if isinstance(op, str) else op)
        self.inputs = inputs
        self.name = name
        self.kind = kind
        self.attrs = attrs

    @classmethod
    def var(cls, name: str, kind: str | None = None) -> Pattern:
        """Any value (of `kind`, if given: "param", "input", "temp", ...)."""
        return cls(None, name=name, kind=kind)

    @classmethod
    def param(cls, name: str) -> Pattern:
        """A weight: a param value."""
        return cls.var(name, kind="param")

    def __repr__(self) -> str:
        if self.ops is None:
            return self.name + (f":{self.kind}" if self.kind else "")
        op = "|".join(sorted(self.ops))
        return f"{op}({', '.join(map(repr, self.inputs))})" if self.inputs else op


P = Pattern   # the short name rules are written with


class _Found:
    """A partial match: the named values so far and the matched nodes (root first). Copied when branching."""

    def __init__(self, values: dict[str, Value], nodes: list[Node]):
        self.values, self.nodes = values, nodes

    def bind(self, name: str | None, value: Value) -> _Found:
        return self if name is None else _Found({**self.values, name: value}, self.nodes)

    def add(self, node: Node) -> _Found:
        return self if any(n is node for n in self.nodes) else _Found(self.values, self.nodes + [node])


def _match(pattern: Pattern, value: Value, found: _Found) -> Iterator[_Found]:
    """Every way `pattern` matches `value`, extending `found`."""
    bound = found.values.get(pattern.name) if pattern.name else None
    if bound is not None and bound is not value:
        return
    if pattern.ops is None:
        if pattern.kind is None or value.kind == pattern.kind:
            yield found.bind(pattern.name, value)
        return
    node = value.producer
    if node is None or node.op not in pattern.ops:
        return
    if any(node.attrs.get(key) != expected for key, expected in pattern.attrs.items()):
        return
    found = found.bind(pattern.name, value).add(node)
    if not pattern.inputs:
        yield found
        return
    if len(node.inputs) != len(pattern.inputs):
        return
    orders = [node.inputs]
    if node.op in COMMUTATIVE_OPS and len(node.inputs) == 2:
        orders.append(node.inputs[::-1])
    for inputs in orders:
        partial = [found]
        for sub_pattern, input_value in zip(pattern.inputs, inputs):
            partial = [deeper for so_far in partial for deeper in _match(sub_pattern, input_value, so_far)]
        yield from partial


def _blocker(graph: Graph, found: _Found) -> str | None:
    """Why erasing this match's intermediates would be unsafe or gain nothing; None when it is fine."""
    inside = {id(n) for n in found.nodes}
    for node in found.nodes[1:]:
        if op_def(node.op).side_effect:
            return f"an intermediate {node.op} has side effects"
        for value in node.outputs:
            if value.kind == "output":
                return f"an intermediate {node.op} is a graph output"
            if any(id(user) not in inside for user in value.users):
                return f"an intermediate {node.op} has a user outside the pattern"
    return None


class Match:
    """One place a rule matched: its named values, its nodes, and what a builder uses to replace them."""

    def __init__(self, graph: Graph, found: _Found, root_value: Value):
        self.graph = graph
        self.root_value = root_value
        self.nodes = found.nodes
        self._values = found.values
        self._inserted: list[Node] = []
        self.reason: str | None = None

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def __getitem__(self, name: str) -> Value:
        if name not in self._values:
            raise GraphError(f"the pattern binds no value named {name!r}; it binds {sorted(self._values)}")
        return self._values[name]

    def node(self, name: str) -> Node:
        """The matched node that produced the value named `name`."""
        return self[name].producer

    def insert(self, op: str, *inputs: Value, **attrs: Any) -> Value:
        """Add a node just before the matched root; returns its output (a tuple for multi-output ops)."""
        meta = {k: v for k, v in self.root.meta.items() if k != "pass"}     # the running pass labels it anew
        meta["fused_from"] = tuple(n.op for n in self.nodes)
        node = self.graph.create_node(op, list(inputs), attrs, meta, before=self.root)
        self._inserted.append(node)
        return node.output if len(node.outputs) == 1 else tuple(node.outputs)

    def decline(self, reason: str) -> None:
        """Leave the graph as it was, counting `reason` in the pass's notes (returns None: `return m.decline(...)`)."""
        self.reason = reason

    def _undo(self) -> None:
        for node in reversed(self._inserted):
            self.graph.erase(node)

    def _replace(self, replacement: Value, pattern: Pattern) -> list[Node]:
        """Point the root's users at `replacement`; erase the matched nodes left unused, and return them."""
        if replacement is self.root_value:
            raise GraphError(f"rewrite {pattern!r}: the builder returned the matched value itself; "
                             "return None to decline")
        if replacement.type != self.root_value.type:
            raise GraphError(f"rewrite {pattern!r}: the builder returned {replacement.ref} : {replacement.type} "
                             f"to replace {self.root_value.ref} : {self.root_value.type}")
        self.graph.replace_all_uses(self.root_value, replacement)
        order = {id(n): i for i, n in enumerate(self.graph.nodes)}
        erased = []
        for node in sorted(self.nodes, key=lambda n: order[id(n)], reverse=True):     # users before producers
            if not any(v.users or v.kind == "output" for v in node.outputs) and not op_def(node.op).side_effect:
                self.graph.erase(node)
                erased.append(node)
        return erased


Builder = Callable[[Match], Value | None]


def rewrite(graph: Graph, pattern: Pattern, build: Builder) -> PassResult:
    """Replace every safe match of `pattern` by what `build` returns, sweeping until nothing changes.

    The notes count the rewrites and, for the matches left alone after the last sweep, why.
    """
    rewritten = 0
    for _ in range(MAX_SWEEPS):
        changed, left_alone = _sweep(graph, pattern, build)
        rewritten += changed
        if not changed:
            notes = {"rewritten": rewritten, "left alone": dict(left_alone)}
            return PassResult(graph, rewritten, notes)
    raise GraphError(f"rewrite {pattern!r} still changed the graph after {MAX_SWEEPS} sweeps: does the builder "
                     "produce what the pattern matches?")


def _sweep(graph: Graph, pattern: Pattern, build: Builder) -> tuple[int, Counter]:
    rewritten, left_alone = 0, Counter()
    erased: set[int] = set()
    for node in list(graph.nodes):
        if id(node) in erased:
            continue
        for value in node.outputs:
            gone, reason = _rewrite_at(graph, pattern, build, value)
            if gone is not None:
                rewritten += 1
                erased |= {id(n) for n in gone}
                break
            if reason:
                left_alone[reason] += 1
    return rewritten, left_alone


def _rewrite_at(graph: Graph, pattern: Pattern, build: Builder, value: Value) -> tuple[list[Node] | None, str]:
    """Try the pattern rooted at `value`: (the nodes erased, "") when rewritten, else (None, why not; "" when
    it does not match at all)."""
    first_reason = ""
    for found in _match(pattern, value, _Found({}, [])):
        reason = _blocker(graph, found)
        if reason is None:
            match = Match(graph, found, value)
            replacement = build(match)
            if replacement is not None:
                return match._replace(replacement, pattern), ""
            match._undo()
            reason = match.reason or "declined by the rule"
        first_reason = first_reason or reason
    return None, first_reason
