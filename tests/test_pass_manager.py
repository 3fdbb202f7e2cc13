"""The pass API: the PassManager names a pass that breaks the graph, reports per-pass stats, and passes are
chosen by name; check_equivalent catches a pass that changes what the graph computes."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_model
from graph_builders import S, T, story_graph, story_weights, traced
from minitorch_infer.errors import GraphError, MinitorchError
from minitorch_infer.ir import TensorType
from minitorch_infer.ir import functional as F
from minitorch_infer.passes import (DEFAULT_PASSES, PassManager, PassResult, check_equivalent, check_pass,
                                    default_passes, register_pass)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def drop_an_edge(graph, ctx):
    """Forgets that the first matmul reads its weight."""
    matmul = next(n for n in graph.nodes if n.op == "matmul")
    matmul.inputs = matmul.inputs[:1]
    return PassResult(graph, 1)


def change_a_shape(graph, ctx):
    """Claims the first matmul makes a wider result than it does."""
    value = next(n for n in graph.nodes if n.op == "matmul").output
    value.type = TensorType((value.type.shape[0], 999))
    return PassResult(graph, 1)


def use_before_definition(graph, ctx):
    graph.nodes.insert(0, graph.nodes.pop(5))
    return PassResult(graph, 1)


@pytest.mark.parametrize("broken, message", [
    (drop_an_edge, "matmul takes 2 inputs, got 1"),
    (change_a_shape, r"stored output types f32\[S, 999\] \(temp\) differ from inferred f32\[S, 256\]"),   # q|k|v
    (use_before_definition, "is not defined before use"),
], ids=["dropped edge", "changed shape", "moved node"])
def test_a_pass_that_breaks_the_graph_is_named(broken, message):
    with pytest.raises(GraphError, match=rf"pass '{broken.__name__}' produced an invalid graph: node \d+ .*{message}"):
        PassManager(["fuse_qkv", broken, "dce"]).run(story_graph(), None)


def test_a_pass_that_raises_or_returns_the_wrong_thing_is_named():
    def raises(graph, ctx):
        graph.erase(graph.nodes[0])          # still used: GraphError
        return PassResult(graph)

    with pytest.raises(GraphError, match="pass 'raises' failed: GraphError: cannot erase embedding"):
        PassManager([raises]).run(story_graph(), None)

    def looks_up_a_missing_weight(graph, ctx):
        return {}["layers.0.attn.q"]

    with pytest.raises(GraphError, match="pass 'looks_up_a_missing_weight' failed: KeyError: 'layers.0.attn.q'"):
        PassManager([looks_up_a_missing_weight]).run(story_graph(), None)

    def returns_graph(graph, ctx):
        return graph

    with pytest.raises(GraphError, match="pass 'returns_graph' returned Graph, not a PassResult"):
        PassManager([returns_graph]).run(story_graph(), None)


def test_the_report_has_one_row_per_pass_with_counts_and_notes():
    graph, report = PassManager(DEFAULT_PASSES).run(story_graph(), None)
    assert [(s.name, s.changed, s.nodes_before, s.nodes_after) for s in report.stats] == [
        ("fuse_qkv", 2, 49, 51), ("fuse_gate_up", 2, 51, 47), ("fuse_residual", 4, 47, 43), ("prune_rows", 10, 43, 45),
        ("tabulate_rope", 1, 45, 45), ("dce", 10, 45, 45)]
    assert all(s.seconds >= 0 for s in report.stats)
    lines = str(report).splitlines()
    assert lines[0].split() == ["pass", "changed", "nodes", "ms", "notes"] and lines[1].split()[:5] == ["fuse_qkv", "2", "49",
                                                                                                "->", "51"]


def test_the_report_aligns_long_names_and_says_what_dce_removed_and_what_was_left_alone():
    @register_pass("a_pass_with_a_rather_long_name")
    def declines(graph, ctx):
        return PassResult(graph, 0, {"rewritten": 0, "left alone": {"the weights differ": 3}})

    _, report = PassManager(["fuse_qkv", "a_pass_with_a_rather_long_name", "dce"]).run(story_graph(), None)
    lines = str(report).splitlines()
    assert len({line.index(" -> ") for line in lines[1:]}) == 1            # the nodes column lines up
    assert "3 x the weights differ" in lines[2]
    assert "erased nodes: 0, unused params: 6" in lines[3]


def test_passes_are_chosen_by_name():
    assert default_passes(disable=["fuse_qkv"]) == ["fuse_gate_up", "fuse_residual", "prune_rows", "tabulate_rope",
                                                    "dce"]
    with pytest.raises(MinitorchError, match="cannot disable fuse_everything: not a default pass"):
        default_passes(disable=["fuse_everything"])
    with pytest.raises(MinitorchError, match="unknown pass 'fuse_everything'; available: .*fuse_qkv"):
        PassManager(["fuse_everything"])


def test_a_registered_pass_runs_by_name_and_names_must_be_unique():
    @register_pass("test_noop")
    def noop(graph, ctx):
        return PassResult(graph)

    _, report = PassManager(["test_noop"]).run(story_graph(), None)
    assert report.stats[0].name == "test_noop"
    with pytest.raises(GraphError, match="a pass named 'test_noop' is already registered"):
        register_pass("test_noop")(lambda graph, ctx: PassResult(graph))


# --- check_equivalent --------------------------------------------------------------------------------

def loosen_the_norm(graph, ctx):
    """Valid graph, wrong numbers: a different epsilon."""
    node = next(n for n in graph.nodes if n.op == "rms_norm")
    node.attrs["eps"] = 1.0
    return PassResult(graph, 1)


def test_check_equivalent_names_the_output_and_the_difference():
    message = r"output 0 \(%\d+ in `before`\) on trial 0 \(S=16, T=\d+, R=1\) differs: max \|difference\| [\d.]+ \(allowed"
    with pytest.raises(AssertionError, match=message):
        check_pass(story_graph(), [loosen_the_norm])


def cache_and_output(x):
    y = F.silu(x)
    F.kv_write(x.reshape(S, 2, 4), F.state("cache", (2, T.max, 4)), T)
    return y


def write_the_wrong_keys(graph, ctx):
    """Same output, wrong cache: writes silu(x) instead of x."""
    silu = next(n for n in graph.nodes if n.op == "silu")
    write = next(n for n in graph.nodes if n.op == "kv_write")
    wrong = graph.create_node("reshape", [silu.output], {"shape": (S, 2, 4)}, before=write).output
    graph.create_node("kv_write", [wrong, write.inputs[1]], dict(write.attrs), before=write)
    graph.erase(write)
    return PassResult(graph, 1)


def test_check_equivalent_compares_the_kv_cache_too():
    with pytest.raises(AssertionError, match=r"KV state \$cache after trial 0 \(S=4, T=\d+\) differs"):
        check_pass(traced(cache_and_output, x=8), [write_the_wrong_keys, "dce"])


def negate_queries_and_keys(graph, ctx):
    """(-q)·(-k) = q·k: attention is unchanged, but the cache now holds -k, a different layout."""
    for node in list(graph.nodes):
        weight = node.inputs[1] if node.op == "matmul" and len(node.inputs) == 2 else None
        if weight is not None and weight.kind == "param" and weight.name.endswith((".q", ".k")):
            negated = graph.param(weight.name + ".negated", weight.type)
            ctx.weights.add(negated.name, -ctx.weights[weight.name])
            node.inputs[1] = negated
            weight.users.remove(node)
            negated.users.append(node)
    graph.prune_unused()
    return PassResult(graph, 1)


def test_a_pass_that_changes_the_cache_layout_is_checked_from_an_empty_cache():
    with pytest.raises(AssertionError, match="differs"):
        check_pass(story_graph(), [negate_queries_and_keys], story_weights())
    check_pass(story_graph(), [negate_queries_and_keys], story_weights(), same_cache_layout=False)


def test_check_equivalent_needs_the_weights_a_pass_packed():
    packed, _ = PassManager(["fuse_qkv"]).run(story_graph(), None)
    with pytest.raises(GraphError, match=r"`after` reads params `before` lacks \(layers.0.attn.q\+k\+v, .*check_pass"):
        check_equivalent(story_graph(), packed)


def test_check_equivalent_refuses_graphs_with_different_signatures():
    with pytest.raises(GraphError, match="`after` cannot replace `before`: inputs differ"):
        check_equivalent(traced(cache_and_output, x=8), story_graph())


def test_the_custom_pass_example_runs():
    require_model("story")
    result = subprocess.run([sys.executable, str(EXAMPLES / "custom_pass.py")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "hoist_last_row" in result.stdout and "equivalent to the traced graph" in result.stdout


def test_fused_nodes_are_labelled_with_the_pass_that_made_them():
    graph, _ = PassManager(DEFAULT_PASSES).run(story_graph(), None)
    made_by = {}
    for node in graph.nodes:
        made_by.setdefault(node.op, set()).add(node.meta.get("pass"))
    # prune_rows rebuilds the last layer's fused ops on one row: they stay the fusions they were
    assert made_by["matmul_add"] == {"fuse_residual"} and made_by["swiglu"] == {"fuse_gate_up"}
    assert made_by["matmul"] == {"fuse_qkv", "fuse_gate_up", None}                  # None: the head
    assert made_by["embedding"] == {"tabulate_rope", None} and made_by["last_row"] == {None}
