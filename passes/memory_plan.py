"""The activation memory planner: every temp value gets an offset in one arena.

1. Buffers: each temp value, plus each node's scratch workspace. Views (reshape, slices) share their base's
   buffer and keep it alive while they are read; an op that may run in place takes over its input's buffer
   when that input dies at the node and covers the whole buffer in the same layout.
2. Lifetimes: from the producing node to the last reading node (a graph output, or a view of a temp that is
   one, lives to the end), at the symbolic dims' upper bounds.
3. Placement: greedy by size, largest first, each into the best-fitting gap among the buffers already
   placed whose lifetimes overlap its own (as ONNX Runtime's and TVM's planners do).

Params, the KV state, graph inputs and graph outputs are never placed: they live outside the arena.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import Graph, Node, Value, op_def

ALIGNMENT = 64


@dataclass(frozen=True)
class Buffer:
    """One region of the arena: the values (and workspaces) stored in it, and when it is alive."""

    key: str
    size: int
    start: int
    end: int
    members: tuple[str, ...]


@dataclass
class MemoryPlan:
    offsets: dict[str, int]          # value name or "<node>#workspace" -> byte offset in the arena
    buffers: list[Buffer]
    arena_bytes: int
    naive_bytes: int                 # every temp and workspace in its own allocation, no in-place reuse
    lower_bound_bytes: int           # the most bytes alive at one node: no placement of these buffers does better
    inplace: dict[str, str] = field(default_factory=dict)   # value -> the input whose buffer it took over

    def summary(self) -> str:
        mib = 1024 * 1024
        return (f"activations: arena {self.arena_bytes / mib:.2f} MiB, naive {self.naive_bytes / mib:.2f} MiB, "
                f"lower bound {self.lower_bound_bytes / mib:.2f} MiB, {len(self.inplace)} in place")

    def table(self) -> str:
        """One line per buffer, by offset: where it sits, its size, the nodes it is alive over, what it holds."""
        lines = [f"{'offset':>12} {'bytes':>12} {'alive':>11}  values"]
        for buffer in sorted(self.buffers, key=lambda b: (self.offsets[b.key], b.start)):
            alive = f"{buffer.start}..{buffer.end}"
            lines.append(f"{self.offsets[buffer.key]:>12} {buffer.size:>12} {alive:>11}  {', '.join(buffer.members)}")
        return "\n".join(lines)


def workspace_key(node: Node) -> str:
    return f"{node.name}#workspace"


def plan_memory(graph: Graph, reuse: bool = True) -> MemoryPlan:
    """Plan the arena. With reuse=False every buffer gets its own region (the naive layout, for comparison)."""
    buffers, inplace = _collect_buffers(graph, allow_inplace=reuse)
    offsets_by_buffer = _place_greedy(buffers) if reuse else _place_sequential(buffers)
    offsets = {member: offsets_by_buffer[b.key] for b in buffers for member in b.members}
    arena = max((offsets_by_buffer[b.key] + b.size for b in buffers), default=0)
    return MemoryPlan(offsets, buffers, arena, _naive_bytes(graph), _lower_bound(buffers, len(graph.nodes)), inplace)


@dataclass
class _Storage:
    """A buffer while it is being collected: its lifetime grows as views and in-place results join it."""

    key: str
    size: int
    start: int
    end: int
    members: list[str]


def _collect_buffers(graph: Graph, allow_inplace: bool) -> tuple[list[Buffer], dict[str, str]]:
    """Group values that share storage (views, in-place results) and find each group's lifetime."""
    position = {id(node): i for i, node in enumerate(graph.nodes)}
    final = len(graph.nodes) - 1

    def last_use(value: Value) -> int:
        if value.kind == "output":
            return final                 # read by the caller after the last node
        return max((position[id(u)] for u in value.users), default=position[id(value.producer)])

    storage: dict[int, _Storage] = {}    # value id -> the buffer it lives in (temps and views of temps)
    # Values that are their buffer, whole and in its layout (the owner, or a reshape of such a value): only
    # these may be overwritten in place, since the result is written from the buffer's first byte on.
    whole: set[int] = set()
    inplace: dict[str, str] = {}
    workspaces: list[Buffer] = []
    for index, node in enumerate(graph.nodes):
        spec = op_def(node.op)
        for value in node.outputs:
            if spec.view_of is not None:
                base = storage.get(id(node.inputs[spec.view_of]))
                if base is None:
                    continue             # a view of an input, param or state: nothing to place
                base.end = max(base.end, last_use(value))
                storage[id(value)] = base
                if value.kind == "temp":
                    base.members.append(value.name)
                if node.op == "reshape" and id(node.inputs[spec.view_of]) in whole:
                    whole.add(id(value))
                continue
            if value.kind != "temp":
                continue
            donor = node.inputs[spec.inplace] if allow_inplace and spec.inplace is not None else None
            donated = storage.get(id(donor)) if donor is not None else None
            if (donated is not None and id(donor) in whole and donated.end == index
                    and donor.type.nbytes() == value.type.nbytes()):
                donated.end = max(donated.end, last_use(value))
                donated.members.append(value.name)
                storage[id(value)] = donated
                inplace[value.name] = donor.name
            else:
                storage[id(value)] = _Storage(value.name, _aligned(value.type.nbytes()), index, last_use(value),
                                              [value.name])
            whole.add(id(value))
        if spec.workspace is not None and _workspace_bytes(node):
            key = workspace_key(node)
            workspaces.append(Buffer(key, _aligned(_workspace_bytes(node)), index, index, (key,)))
    distinct = {id(s): s for s in storage.values()}.values()
    buffers = [Buffer(s.key, s.size, s.start, s.end, tuple(s.members)) for s in distinct]
    return buffers + workspaces, inplace


def _workspace_bytes(node: Node) -> int:
    return 4 * op_def(node.op).workspace([v.type for v in node.inputs], node.attrs)   # float32 elements


def _naive_bytes(graph: Graph) -> int:
    """What allocating every temp and workspace separately costs: the figure the arena is measured against."""
    total = 0
    for node in graph.nodes:
        spec = op_def(node.op)
        if spec.view_of is None:
            total += sum(_aligned(v.type.nbytes()) for v in node.outputs if v.kind == "temp")
        if spec.workspace is not None:
            total += _aligned(_workspace_bytes(node))
    return total


def _aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def _place_sequential(buffers: list[Buffer]) -> dict[str, int]:
    offsets, cursor = {}, 0
    for buffer in buffers:
        offsets[buffer.key] = cursor
        cursor += buffer.size
    return offsets


def _place_greedy(buffers: list[Buffer]) -> dict[str, int]:
    offsets: dict[str, int] = {}
    placed: list[Buffer] = []
    for buffer in sorted(buffers, key=lambda b: (-b.size, b.start)):
        busy = sorted((offsets[p.key], offsets[p.key] + p.size) for p in placed
                      if p.start <= buffer.end and buffer.start <= p.end)
        best, best_waste, cursor = None, None, 0
        for busy_start, busy_end in busy:
            gap = busy_start - cursor
            if gap >= buffer.size and (best_waste is None or gap - buffer.size < best_waste):
                best, best_waste = cursor, gap - buffer.size
            cursor = max(cursor, busy_end)
        offsets[buffer.key] = cursor if best is None else best
        placed.append(buffer)
    return offsets


def _lower_bound(buffers: list[Buffer], n_nodes: int) -> int:
    live = [0] * (n_nodes + 1)
    for buffer in buffers:
        for index in range(buffer.start, buffer.end + 1):
            live[index] += buffer.size
    return max(live, default=0)
