"""The activation memory planner: every temp value gets an offset in one arena.

1. Buffers: each temp value, plus each node's scratch workspace. Views (reshape, slices) share their base's
   buffer; an op that may run in place takes over its input's buffer when that input dies at the node.
2. Lifetimes: from the producing node to the last reading node, at the symbolic dims' upper bounds.
3. Placement: greedy by size, largest first, each into the best-fitting gap among the buffers already
   placed whose lifetimes overlap its own (as ONNX Runtime's and TVM's planners do).

Params, the KV state, graph inputs and graph outputs are never placed: they live outside the arena.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import Graph, Value, op_def

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
    naive_bytes: int                 # sum of every temp's size: what allocating each separately costs
    lower_bound_bytes: int           # the most bytes alive at one node: no plan can do better
    inplace: dict[str, str] = field(default_factory=dict)   # value -> the input whose buffer it took over

    def summary(self) -> str:
        mib = 1024 * 1024
        return (f"activations: arena {self.arena_bytes / mib:.2f} MiB, naive {self.naive_bytes / mib:.2f} MiB, "
                f"lower bound {self.lower_bound_bytes / mib:.2f} MiB, {len(self.inplace)} in place")


def workspace_key(node) -> str:
    return f"{node.name}#workspace"


def _aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def plan_memory(graph: Graph, reuse: bool = True) -> MemoryPlan:
    """Plan the arena. With reuse=False every buffer gets its own region (the naive layout, for comparison)."""
    buffers, inplace = _collect_buffers(graph, allow_inplace=reuse)
    naive = sum(b.size for b in buffers)
    offsets_by_buffer = _place_greedy(buffers) if reuse else _place_sequential(buffers)
    offsets = {member: offsets_by_buffer[b.key] for b in buffers for member in b.members}
    arena = max((offsets_by_buffer[b.key] + b.size for b in buffers), default=0)
    return MemoryPlan(offsets, buffers, arena, naive, _lower_bound(buffers, len(graph.nodes)), inplace)


def _collect_buffers(graph: Graph, allow_inplace: bool) -> tuple[list[Buffer], dict[str, str]]:
    """Group values that share storage (views, in-place results) and find each group's lifetime."""
    root: dict[int, Value] = {}          # value id -> the value whose buffer it uses
    size: dict[int, int] = {}
    start: dict[int, int] = {}
    end: dict[int, int] = {}
    members: dict[int, list[str]] = {}
    inplace: dict[str, str] = {}
    position = {id(node): i for i, node in enumerate(graph.nodes)}

    def last_use(value: Value) -> int:
        return max((position[id(u)] for u in value.users), default=position[id(value.producer)])

    extra: list[Buffer] = []
    for index, node in enumerate(graph.nodes):
        spec = op_def(node.op)
        for value in node.outputs:
            if value.kind != "temp":
                continue
            base = node.inputs[spec.view_of] if spec.view_of is not None else None
            if base is None and allow_inplace and spec.inplace is not None:
                candidate = node.inputs[spec.inplace]
                owner = root.get(id(candidate))
                if (owner is not None and end[id(owner)] == index and size[id(owner)] >= value.type.nbytes()
                        and candidate.type.nbytes() == value.type.nbytes()):
                    base = candidate
                    inplace[value.name] = candidate.name
            owner = root.get(id(base)) if base is not None else None
            if owner is None:
                root[id(value)] = value
                size[id(value)] = _aligned(value.type.nbytes())
                start[id(value)] = index
                end[id(value)] = last_use(value)
                members[id(value)] = [value.name]
            else:
                root[id(value)] = owner
                end[id(owner)] = max(end[id(owner)], last_use(value))
                members[id(owner)].append(value.name)
        if spec.workspace is not None:
            scratch_bytes = 4 * spec.workspace([v.type for v in node.inputs], node.attrs)
            extra.append(Buffer(workspace_key(node), _aligned(scratch_bytes), index, index, (workspace_key(node),)))
    buffers = [Buffer(owner.name, size[key], start[key], end[key], tuple(members[key]))
               for key, owner in {id(v): v for v in root.values()}.items()]
    return buffers + extra, inplace


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
