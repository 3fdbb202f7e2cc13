"""Graphviz pictures of a graph: a box per node, a cluster per layer, and optionally the memory plan.

The .dot text is written directly rather than through the graphviz package so that it is plain and
deterministic: every id is a value's ref (%17, @embed, $kv.0.k), so the .dot of a graph before and after a
pass differ only where the pass changed something. Rendering runs the `dot` program.
"""

from __future__ import annotations

import html
import os
import secrets
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import GraphError
from .graph import Graph, Node, Value
from .ops import op_def
from .printer import format_attr

if TYPE_CHECKING:
    from ..passes.memory_plan import MemoryPlan

RENDER_FORMATS = ("svg", "png")
FUSED_OPS = frozenset({"swiglu", "matmul_add"})
FILL = {"input": "lightblue", "output": "powderblue", "state": "lightgrey", "param": "#fff59d",
        "fused": "orange", "op": "white"}
# Arena slots, coloured by the rank of their byte offset; pastels, so black text stays readable.
SLOT_PALETTE = ("#b3e2cd", "#cbd5e8", "#f4cae4", "#e6f5c9", "#fbb4ae", "#decbe4", "#d9d9f3", "#ccebc5",
                "#fddaec", "#e5d8bd", "#b3cde3", "#c2e0d9")
ATTR_WIDTH = 28          # an attribute's text is cut to this many characters, so long tuples don't widen boxes
LEGEND = "light blue: input · powder blue: output · grey: KV cache · {fused} · dashed box: view"


def dot_available() -> bool:
    """Whether the Graphviz `dot` program is on PATH."""
    return shutil.which("dot") is not None


def render_hint(path: str | os.PathLike) -> str:
    """What to do to get a picture when `dot` is missing."""
    path = Path(path)
    return (f"install graphviz (apt-get install graphviz, or brew install graphviz) and run: "
            f"dot -Tsvg {shlex.quote(str(path))} -o {shlex.quote(str(path.with_suffix('.svg')))}")


def write_dot(graph: Graph, path: str | os.PathLike, plan: MemoryPlan | None = None, show_params: bool = False,
              fold_layers: bool = False, render: str | None = None, title: str | None = None) -> list[Path]:
    """Write the graph's .dot to `path`; with `render` ("svg"/"png") and `dot` installed, also PATH.svg/.png.

    Missing parent directories are made. Every file appears whole or not at all (written under a temporary
    name, then renamed). Returns the paths written: just the .dot when `dot` is missing (then tell the user
    `render_hint(path)`).
    """
    if render is not None and render not in RENDER_FORMATS:
        raise ValueError(f"render format {render!r}; choose one of {', '.join(RENDER_FORMATS)}")
    path = Path(path)
    text = to_dot(graph, plan=plan, show_params=show_params, fold_layers=fold_layers, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_beside(path)
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    written = [path]
    if render is not None and dot_available():
        written.append(_render(path, render))
    return written


def _temporary_beside(path: Path) -> Path:
    """An unused name in path's directory, so that renaming onto path is atomic.

    Not tempfile.mkstemp: its files are private (0600), and the picture should get the usual permissions.
    """
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _render(dot_path: Path, fmt: str) -> Path:
    target = dot_path.with_suffix(f".{fmt}")
    temporary = _temporary_beside(target)
    result = subprocess.run(["dot", f"-T{fmt}", str(dot_path), "-o", str(temporary)], capture_output=True, text=True)
    if result.returncode != 0:
        temporary.unlink(missing_ok=True)
        raise GraphError(f"dot -T{fmt} {dot_path} failed: {result.stderr.strip()}")
    os.replace(temporary, target)
    return target


def to_dot(graph: Graph, plan: MemoryPlan | None = None, show_params: bool = False, fold_layers: bool = False,
           title: str | None = None) -> str:
    """The graph as Graphviz dot text (see the module docstring)."""
    return _Drawing(graph, plan, show_params, fold_layers).text(title or graph.name)


class _Drawing:
    """Decides what is drawn where (clusters, folded layers, hidden params), then writes the dot text."""

    def __init__(self, graph: Graph, plan: MemoryPlan | None, show_params: bool, fold_layers: bool):
        self.graph, self.plan, self.show_params = graph, plan, show_params
        self.layers = _nodes_by_layer(graph)
        runs = _identical_runs(self.layers) if fold_layers else [[layer] for layer in self.layers]
        self.run_of = {layer: run for run in runs for layer in run}
        # A node of a folded-away layer is drawn as the same-position node of its run's first layer.
        self.stand_in: dict[int, Node] = {}
        for run in runs:
            for layer in run[1:]:
                for hidden, shown in zip(self.layers[layer], self.layers[run[0]]):
                    self.stand_in[id(hidden)] = shown
        self.ids = {id(node): _node_id(node, index) for index, node in enumerate(graph.nodes)}
        self.slot_colours = _slot_colours(plan) if plan is not None else {}

    # --- what is drawn, and where ------------------------------------------------------------------
    def drawn(self, node: Node) -> bool:
        return id(node) not in self.stand_in

    def shown(self, node: Node) -> Node:
        return self.stand_in.get(id(node), node)

    def cluster_of(self, node: Node) -> int | None:
        """The layer whose cluster holds the node: the first layer of its run."""
        layer = node.meta.get("layer")
        return None if layer is None else self.run_of[layer][0]

    def free_values(self) -> list[Value]:
        """Values no node produces that get a box of their own: inputs, KV state and (if asked) params."""
        values = list(self.graph.inputs) + list(self.graph.states.values())
        if self.show_params:
            values += list(self.graph.params.values())
        return [v for v in values if not v.users or any(self.drawn(u) for u in v.users)]

    def home_cluster(self, value: Value) -> int | None:
        """A param or state used in just one layer is drawn inside that layer's cluster."""
        clusters = {self.cluster_of(user) for user in value.users if self.drawn(user)}
        return clusters.pop() if len(clusters) == 1 and value.kind != "input" else None

    # --- the text ---------------------------------------------------------------------------------
    def text(self, title: str) -> str:
        if self.plan is None:
            label = [title, LEGEND.format(fused="orange: fused op")]
        else:
            label = [title, self.plan.summary(), "@offset +size in KiB; fill colour = arena slot",
                     LEGEND.format(fused="orange outline: fused op")]
        lines = [f"digraph {_quote(self.graph.name)} {{",
                 f'  graph [rankdir=TB, labelloc=t, fontname="Helvetica", fontsize=14, nodesep=0.3, ranksep=0.35, '
                 f'label={_quote_lines(label)}];',
                 '  node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica", fontsize=10, '
                 'margin="0.12,0.04"];',
                 '  edge [color="#555555", arrowsize=0.6];']
        by_cluster: dict[int | None, list[Value]] = {}
        for value in self.free_values():
            by_cluster.setdefault(self.home_cluster(value), []).append(value)
        lines += [f"  {self.value_box(v)}" for v in by_cluster.get(None, [])]
        clusters_done: set[int] = set()
        for node in self.graph.nodes:
            cluster = self.cluster_of(node)
            if cluster is None:
                lines.append(f"  {self.node_box(node)}")
            elif cluster not in clusters_done and self.drawn(node):
                clusters_done.add(cluster)
                lines += self.cluster(cluster, by_cluster.get(cluster, []))
        lines += self.edges()
        lines.append("}")
        return "\n".join(lines) + "\n"

    def cluster(self, layer: int, values: list[Value]) -> list[str]:
        run = self.run_of[layer]
        label = f"layer {layer}" if len(run) == 1 else f"layers {run[0]}–{run[-1]} (×{len(run)}, identical)"
        lines = [f"  subgraph cluster_layer_{layer} {{",
                 f'    graph [label={_quote(label)}, labeljust=l, style="rounded,filled", fillcolor="#f7f7f7", '
                 f'color="#bbbbbb", fontsize=12];']
        lines += [f"    {self.value_box(v)}" for v in values]
        lines += [f"    {self.node_box(n)}" for n in self.layers[layer]]
        lines.append("  }")
        return lines

    def value_box(self, value: Value) -> str:
        label = _rows([f"<B>{_html(value.ref)}</B>", _html(str(value.type))])
        shape = "cylinder" if value.kind == "state" else "box"
        return f"{_quote(value.ref)} [shape={shape}, fillcolor={_quote(FILL[value.kind])}, label=<{label}>];"

    def node_box(self, node: Node) -> str:
        attributes = {"fillcolor": _quote(self.fill(node)), "label": f"<{self.node_label(node)}>"}
        if op_def(node.op).view_of is not None:
            attributes["style"] = '"rounded,filled,dashed"'
        if self.plan is not None and _is_fused(node):
            attributes.update(color=_quote(FILL["fused"]), penwidth="2.5")    # the fill shows the arena slot instead
        return f"{_quote(self.ids[id(node)])} [{', '.join(f'{k}={v}' for k, v in attributes.items())}];"

    def fill(self, node: Node) -> str:
        kinds = {v.kind for v in node.outputs}
        if "output" in kinds:
            return FILL["output"]
        if "state" in kinds:
            return FILL["state"]
        if self.plan is not None:
            placed = [self.plan.offsets[v.name] for v in node.outputs if v.name in self.plan.offsets]
            if placed:
                return self.slot_colours[placed[0]]
        return FILL["fused"] if _is_fused(node) else FILL["op"]

    def node_label(self, node: Node) -> str:
        head = f"<B>{_html(node.op)}</B>"
        if not self.show_params:
            # The weights' names say which matmul this is (q, gate, down...): worth keeping without their boxes.
            params = [_without_layer_prefix(v.name) + (f":{v.type.dtype}" if v.type.is_quantized else "")
                      for v in node.inputs if v.kind == "param"]
            head += "".join(f" @{_html(p)}" for p in params)
        rows = [head]
        for value in node.outputs:
            rows.append(f"{_html(value.ref)} : {_html(str(value.type))}")
            if self.plan is not None and value.name in self.plan.offsets:
                rows.append(_plan_row(f"@{_kib(self.plan.offsets[value.name])} +{_kib(value.type.nbytes())}"))
        attrs = _short_attrs(node)
        if attrs:
            rows.append(f'<FONT COLOR="#555555">{_html(attrs)}</FONT>')
        if self.plan is not None:
            rows += self.scratch_rows(node)
        return _rows(rows)

    def scratch_rows(self, node: Node) -> list[str]:
        # Imported here, not at the top: passes build on the IR, and the IR should not need them to load.
        from ..passes.memory_plan import workspace_key

        key = workspace_key(node)
        if key not in self.plan.offsets:
            return []
        size = next(b.size for b in self.plan.buffers if b.key == key)
        return [_plan_row(f"scratch @{_kib(self.plan.offsets[key])} +{_kib(size)}")]

    def edges(self) -> list[str]:
        """One edge per (producer box, consumer box), into drawn nodes only; KV-state edges dashed."""
        lines, seen = [], set()
        for node in self.graph.nodes:
            if not self.drawn(node):
                continue
            for value in node.inputs:
                if value.producer is not None:
                    source = self.ids[id(self.shown(value.producer))]
                elif value.kind != "param" or self.show_params:
                    source = value.ref
                else:
                    continue
                edge = (source, self.ids[id(node)])
                if edge in seen:
                    continue
                seen.add(edge)
                style = " [style=dashed]" if value.kind == "state" else ""
                lines.append(f"  {_quote(edge[0])} -> {_quote(edge[1])}{style};")
        return lines


def _nodes_by_layer(graph: Graph) -> dict[int, list[Node]]:
    layers: dict[int, list[Node]] = {}
    for node in graph.nodes:
        if node.meta.get("layer") is not None:
            layers.setdefault(node.meta["layer"], []).append(node)
    return dict(sorted(layers.items()))


def _identical_runs(layers: dict[int, list[Node]]) -> list[list[int]]:
    """Consecutive layers with equal signatures, grouped: [[0, 1, ..., 29]] for a uniform 30-layer model."""
    runs: list[list[int]] = []
    previous = None
    for layer, nodes in layers.items():
        signature = _layer_signature(nodes)
        if runs and signature == previous and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
        previous = signature
    return runs


def _layer_signature(nodes: list[Node]) -> tuple:
    """What makes two layers the same picture: ops, attrs, types, fusion, and the wiring of their inputs.

    An input made inside the layer is named by its position there. One from outside that several layers read
    (the rope tables, a shared weight) is named by its ref, so layers reading different ones differ; any other
    (a per-layer weight, the previous layer's output) only by kind and type, as its name differs per layer.
    """
    position = {id(v): (i, k) for i, node in enumerate(nodes) for k, v in enumerate(node.outputs)}

    def name(value: Value) -> tuple:
        if id(value) in position:
            return position[id(value)]
        readers = {user.meta.get("layer") for user in value.users} - {None}
        return ("shared", value.ref) if len(readers) > 1 else (value.kind, str(value.type))

    return tuple((node.op, repr(sorted(node.attrs.items())), tuple((v.kind, str(v.type)) for v in node.outputs),
                  _is_fused(node), tuple(name(v) for v in node.inputs))
                 for node in nodes)


def _node_id(node: Node, index: int) -> str:
    """A node's dot id is its first output's ref, so ids survive passes that leave the node alone."""
    return node.outputs[0].ref if node.outputs else f"{node.op}#{index}"


def _is_fused(node: Node) -> bool:
    return node.op in FUSED_OPS or "fused_from" in node.meta


def _short_attrs(node: Node) -> str:
    """Attributes as `k=v`, long values cut short; a reshape's target shape is left out (it is the output type)."""
    output_shapes = {v.type.shape for v in node.outputs}
    parts = []
    for key, value in node.attrs.items():
        if isinstance(value, tuple) and value in output_shapes:
            continue
        text = f"{key}={format_attr(value)}"
        parts.append(text if len(text) <= ATTR_WIDTH else text[:ATTR_WIDTH - 1] + "…")
    return ", ".join(parts)


def _without_layer_prefix(name: str) -> str:
    """layers.3.attn.q -> attn.q: the cluster already says which layer."""
    parts = name.split(".")
    return ".".join(parts[2:]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else name


def _slot_colours(plan: MemoryPlan) -> dict[int, str]:
    """Arena offset -> colour: every buffer placed at one offset (one slot, reused over time) shares a colour."""
    offsets = sorted(set(plan.offsets.values()))
    return {offset: SLOT_PALETTE[rank % len(SLOT_PALETTE)] for rank, offset in enumerate(offsets)}


def _kib(nbytes: int) -> str:
    """Bytes in KiB, exact for the planner's 64-byte alignment (1/16 KiB): 2180K, 10.125K."""
    return f"{nbytes / 1024:.4f}".rstrip("0").rstrip(".") + "K"


def _plan_row(text: str) -> str:
    return f'<FONT POINT-SIZE="9" COLOR="#1f3a93">{_html(text)}</FONT>'


def _rows(rows: list[str]) -> str:
    """An HTML-like label with one row per entry (a table, not <BR/>: its rows leave room for descenders)."""
    cells = "".join(f"<TR><TD>{row}</TD></TR>" for row in rows)
    return f'<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">{cells}</TABLE>'


def _html(text: str) -> str:
    return html.escape(text, quote=True)


def _quote(text: str) -> str:
    return '"' + _escape(text) + '"'


def _quote_lines(lines: list[str]) -> str:
    """A plain (non-HTML) label with one centred line per entry."""
    return '"' + "\\n".join(_escape(line) for line in lines) + '"'


def _escape(text: str) -> str:
    """Inside a quoted dot string only backslashes and double quotes need escaping."""
    return text.replace("\\", "\\\\").replace('"', '\\"')
