"""prune_rows: compute only the rows the logits need.

While generating, only the newest position's logits are sampled, so the graph takes `last_row` of the final
hidden states. From the last layer's attention queries on, everything works row by row, so it can run on
the last row alone: this pass moves `last_row` up through such ops until it meets one that mixes rows or
whose every row is needed elsewhere (the last layer's norm and q/k/v product feed the KV writes, which need
all rows).

    before (last layer, 128-token prefill)        after

    attention(q, K, V)          [128, H, D]       attention(last_row(q), K, V)   [R, H, D]
    o projection + residual     [128, hidden]     o projection + residual        [R, hidden]
    norm, gate/up, swiglu, down [128, ·]          norm, gate/up, swiglu, down    [R, ·]
    last_row                    [R, hidden]

R is the number of sequences in the step (one for a single stream): last_row keeps each one's newest row.
llama.cpp does the same with its output ids. Attention qualifies because each sequence's queries are its
newest positions, aligned to the end of its cache; rebuilt on the last rows it is told so
(queries="last"). The keys and values keep every row, since the KV cache needs them all.
`examples/custom_pass.py` is this pass's first half (row-wise ops only), written as a user would.
"""

from __future__ import annotations

from ..ir import Graph, Sym, Value
from .manager import PassContext, PassResult, register_pass
from .pattern import Match, P, rewrite

# Row i of these ops' result depends only on row i of their inputs that have the rows axis; other inputs
# (weights, the KV cache) pass through unchanged. For attention, row i is query i, placed at the end.
ROW_WISE = {"matmul", "matmul_add", "add", "mul", "silu", "swiglu", "rms_norm", "rope", "slice_cols", "attention",
            "reshape"}
# Where only some inputs carry rows: a weight's first axis is not the rows axis even when it has the same size.
ROW_INPUTS = {"matmul": (0,), "matmul_add": (0, 2), "attention": (0,)}
LAST_ROW_OF_ROW_WISE = P("last_row", P(ROW_WISE, name="rows"))
LOCATION_META = ("layer", "scope", "source")


@register_pass("prune_rows")
def prune_rows(graph: Graph, ctx: PassContext) -> PassResult:
    def build(m: Match) -> Value | None:
        node = m.node("rows")
        rows = node.output.shape[0]
        kept_rows = m.root.attrs["rows"]            # R: one row per sequence in the step
        if not isinstance(rows, Sym):
            return m.decline(f"{node.op} has a fixed number of rows")
        if node.op in ROW_INPUTS:
            row_inputs = ROW_INPUTS[node.op]
            if any(node.inputs[i].shape[0] != rows for i in row_inputs):
                return m.decline(f"{node.op} reads its rows from an input without them")
        else:
            row_inputs = [i for i, v in enumerate(node.inputs) if v.type.rank and v.shape[0] == rows]
        attrs = dict(node.attrs)
        if node.op == "reshape":
            if node.inputs[0].shape[0] != rows:
                return m.decline("a reshape that moves rows across the first axis")
            attrs["shape"] = (kept_rows, *attrs["shape"][1:])
        if node.op == "attention":
            attrs["queries"] = "last"

        def insert(op: str, *inputs: Value, meta: dict, **attrs) -> Value:
            value = m.insert(op, *inputs, **attrs)
            value.producer.meta = dict(meta)
            return value

        # The rebuilt op is the same op on fewer rows (and the same fusion, if it was one); the last_rows
        # only take the place they are put in.
        where = {k: node.meta[k] for k in LOCATION_META if k in node.meta}
        inputs = [insert("last_row", v, meta=where, rows=kept_rows) if i in row_inputs else v
                  for i, v in enumerate(node.inputs)]
        return insert(node.op, *inputs, meta=node.meta, **attrs)

    rewritten = merged = 0
    while True:
        merged_now = _merge_duplicate_last_rows(graph)
        result = rewrite(graph, LAST_ROW_OF_ROW_WISE, build)
        rewritten += result.changed
        merged += merged_now
        if not merged_now and not result.changed:
            notes = {"rewritten": rewritten, "merged last_rows": merged, "left alone": result.notes["left alone"]}
            return PassResult(graph, rewritten, notes)


def _merge_duplicate_last_rows(graph: Graph) -> int:
    """Make every last_row of one value a single node. Hoisting through a value read twice (a residual that
    feeds both the norm and the add) leaves two; merged, the value has one reader and the hoist goes on."""
    first: dict[int, Value] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "last_row":
            continue
        source = id(node.inputs[0])
        if source not in first:
            first[source] = node.output
        elif node.output.kind != "output":
            graph.replace_all_uses(node.output, first[source])
            graph.erase(node)
            merged += 1
    return merged
