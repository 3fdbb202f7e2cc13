"""Pattern rewriting: matching (variables, commutative operands, op sets, attributes, kinds), the safety
rules, declining, and the fixed point."""

import pytest

from graph_builders import S, T, traced
from minitorch_infer.errors import GraphError
from minitorch_infer.ir import functional as F
from minitorch_infer.ir import verify
from minitorch_infer.passes import P, rewrite

SILU_TIMES = P("mul", P("silu", P.var("a")), P.var("b"))


def toy_rule(m):
    """mul(silu(a), b) -> add(a, b): not an optimisation, only something structurally different to look for."""
    return m.insert("add", m["a"], m["b"])


def gated(x, y):
    return F.silu(x) * y


def gated_swapped(x, y):
    return y * F.silu(x)


@pytest.mark.parametrize("fn", [gated, gated_swapped])
def test_add_and_mul_match_in_either_operand_order(fn):
    graph = traced(fn, x=8, y=8)
    result = rewrite(graph, SILU_TIMES, toy_rule)
    verify(graph)
    assert result.changed == 1 and result.notes == {"rewritten": 1, "left alone": {}}
    (added,) = graph.nodes
    assert added.op == "add" and added.inputs == graph.inputs and added.meta["fused_from"] == ("mul", "silu")


def test_a_variable_named_twice_must_bind_the_same_value():
    same_x = P("mul", P("silu", P.var("x")), P.var("x"))

    def square_gate(x, y):
        return F.silu(x) * x, F.silu(x) * y

    graph = traced(square_gate, x=8, y=8)
    result = rewrite(graph, same_x, lambda m: m.insert("add", m["x"], m["x"]))
    assert result.changed == 1                        # only silu(x) * x, not silu(x) * y


def test_kind_op_set_and_attribute_constraints():
    def norms(x, y):
        def norm(eps):
            return F.rms_norm(x, F.param("g", (8,)), eps)

        w = F.param("w", (8, 8))
        return F.matmul(norm(1e-5), w), F.matmul(norm(1e-6), w), F.matmul(norm(1e-5), y)

    graph = traced(norms, x=8, y=8)
    seen = []

    def record(m):
        seen.append(m.root.op)
        return None

    rewrite(graph, P({"matmul", "mul"}, P("rms_norm", P.var("x"), P.param("g"), eps=1e-5), P.param("w")), record)
    assert seen == ["matmul"]                          # the eps=1e-6 norm and the non-param weight do not match
    assert repr(P("add", P.var("r"), P({"matmul", "mul"}, P.param("w")))) == "add(r, matmul|mul(w:param))"


def test_an_intermediate_with_another_user_blocks_the_match():
    def shared(x, y):
        s = F.silu(x)
        return s * y, s + y

    graph = traced(shared, x=8, y=8)
    before = str(graph)
    result = rewrite(graph, SILU_TIMES, toy_rule)
    assert result.changed == 0 and str(graph) == before
    assert result.notes["left alone"] == {"an intermediate silu has a user outside the pattern": 1}


def test_an_intermediate_that_is_a_graph_output_blocks_the_match():
    def exposed(x, y):
        s = F.silu(x)
        return s * y, s

    result = rewrite(traced(exposed, x=8, y=8), SILU_TIMES, toy_rule)
    assert result.notes["left alone"] == {"an intermediate silu is a graph output": 1}


def test_a_declining_builder_leaves_no_trace():
    graph = traced(gated, x=8, y=8)
    before = str(graph)

    def half_built(m):
        m.insert("silu", m["a"])                       # inserted, then the rule changes its mind
        return m.decline("not today")

    result = rewrite(graph, SILU_TIMES, half_built)
    assert str(graph) == before and result.notes["left alone"] == {"not today": 1}
    assert rewrite(graph, SILU_TIMES, lambda m: None).notes["left alone"] == {"declined by the rule": 1}


def test_a_builder_returning_the_wrong_type_is_an_error_naming_the_rule():
    graph = traced(gated, x=8, y=8)
    with pytest.raises(GraphError, match=r"rewrite mul\(silu\(a\), b\): the builder returned .* f32\[S, 4\]"):
        rewrite(graph, SILU_TIMES, lambda m: m.insert("swiglu", m["a"]))
    with pytest.raises(GraphError, match="the matched value itself"):
        rewrite(traced(gated, x=8, y=8), SILU_TIMES, lambda m: m.root_value)
    with pytest.raises(GraphError, match="binds no value named 'c'"):
        rewrite(traced(gated, x=8, y=8), SILU_TIMES, lambda m: m["c"])


def test_rewriting_runs_to_a_fixed_point():
    def chain(x):
        return F.silu(F.silu(F.silu(x))) * x

    graph = traced(chain, x=8)
    # mul(silu(a), b) -> mul(a, b): each rewrite exposes the next silu.
    result = rewrite(graph, SILU_TIMES, lambda m: m.insert("mul", m["a"], m["b"]))
    verify(graph)
    assert result.changed == 3 and graph.op_counts() == {"mul": 1}


def test_a_rule_that_never_settles_is_reported():
    graph = traced(gated, x=8, y=8)
    with pytest.raises(GraphError, match="still changed the graph after 100 sweeps"):
        rewrite(graph, SILU_TIMES, lambda m: m.insert("mul", m.insert("silu", m["a"]), m["b"]))


def test_a_side_effecting_intermediate_blocks_the_match():
    def attend(x):
        q = x.reshape(S, 2, 4)
        keys = F.kv_write(q, F.state("k", (2, T.max, 4)), T)
        values = F.kv_write(q, F.state("v", (2, T.max, 4)), T)
        return F.attention(q, keys, values, scale=0.5)

    pattern = P("attention", P.var("q"), P("kv_write", P.var("x"), P.var("cache")), P.var("v"))
    result = rewrite(traced(attend, x=8), pattern, lambda m: m.decline("never reached"))
    assert result.notes["left alone"] == {"an intermediate kv_write has side effects": 1}
