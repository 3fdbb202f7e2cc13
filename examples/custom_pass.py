"""A pass written through the public API: compute only the row the logits need.

While generating, the graph takes `last_row` of the final hidden states, because only the newest position's
logits are sampled. The row-wise ops before it (matmuls, norms, adds, swiglu) still computed every one of
the S rows, S-1 of them for nothing. This pass moves `last_row` up through row-wise ops, so during a
128-token prefill the tail of the last layer works on 1 row instead of 128. (The built-in `prune_rows` goes
further, through attention's queries; it is turned off here so that this pass has work to do.)

    python examples/custom_pass.py
"""

import minitorch_infer
from minitorch_infer.passes import P, PassManager, check_equivalent, default_passes, register_pass, rewrite

# Row i of these ops' result depends only on row i of their [S, ·] inputs (params pass through unchanged).
ROW_WISE = {"matmul", "matmul_add", "add", "mul", "silu", "swiglu", "rms_norm"}
LAST_ROW_OF_ROW_WISE = P("last_row", P(ROW_WISE, name="rows"))


@register_pass("hoist_last_row")
def hoist_last_row(graph, ctx):
    """last_row(f(x, w)) -> f(last_row(x), w), repeated until last_row meets an op that mixes rows."""

    def build(m):
        node = m.node("rows")
        seq = node.output.shape[0]
        rows = m.root.attrs["rows"]          # R: one row per sequence in the step
        inputs = [m.insert("last_row", v, rows=rows) if v.type.rank == 2 and v.shape[0] == seq else v
                  for v in node.inputs]
        return m.insert(node.op, *inputs, **node.attrs)

    # The matcher refuses by itself when the row-wise result has another reader (then all rows are needed).
    return rewrite(graph, LAST_ROW_OF_ROW_WISE, build)


def main() -> None:
    model = minitorch_infer.load("story")
    defaults = default_passes(disable=["prune_rows"])
    pipeline = [*defaults, "hoist_last_row"]

    traced = model.trace()
    optimised, report = PassManager(pipeline).run(model.trace(), model.weights)
    print(report, end="\n\n")
    largest = check_equivalent(traced, optimised, model.weights)
    print(f"equivalent to the traced graph: largest difference {largest:.2g}\n")

    with_defaults, _ = PassManager(defaults).run(model.trace(), model.weights)
    columns = {"traced": traced, "defaults": with_defaults, "+ hoist": optimised}
    counts = {label: graph.op_counts() for label, graph in columns.items()}
    print(f"{'op':<12}" + "".join(f"{label:>10}" for label in columns))
    for op in sorted(set().union(*counts.values())):
        print(f"{op:<12}" + "".join(f"{counts[label].get(op, 0):>10}" for label in columns))
    print("\nthe graph's tail:\n" + "\n".join(str(optimised).splitlines()[-10:]))

    model.compile(passes=pipeline)
    print("\n" + model.generate("Once upon a time", max_new_tokens=24, greedy=True).text)


if __name__ == "__main__":
    main()
