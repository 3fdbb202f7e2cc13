"""The activation memory planner: known optima on small graphs, the invariants on real and random graphs,
and the SmolLM2-sized arena against the naive sum."""

import pytest
from hypothesis import HealthCheck, given, settings

from graph_builders import (S, assert_plan_invariants, random_graphs, smollm2_sized_graph, story_graph, traced)
from minitorch_infer.ir import functional as F
from minitorch_infer.ir.tracer import active_tracer
from minitorch_infer.passes import DEFAULT_PASSES, PassManager, plan_memory

ROW_BYTES = 4 * 16          # one f32 row of width 16: [S, 16] at S = 4 is 256 bytes, a multiple of the alignment
BLOCK = S.max * ROW_BYTES
WORKSPACE = 2 * BLOCK       # a [16, 16] matmul's room for xᵀ and the product's transpose (the few-rows path)


def matmul_chain(x):
    for i in range(4):
        x = F.matmul(x, F.param(f"w{i}", (16, 16)))
    return x


def add_chain(x):
    bias = F.param("b", (16,))
    for _ in range(4):
        x = x + bias
    return F.matmul(x, F.param("w", (16, 16)))


def test_a_chain_of_matmuls_needs_two_buffers_and_one_workspace():
    plan = plan_memory(traced(matmul_chain, x=16))
    assert plan.arena_bytes == plan.lower_bound_bytes == 2 * BLOCK + WORKSPACE   # the input and output of one
    assert plan.naive_bytes == 3 * BLOCK + 4 * WORKSPACE and not plan.inplace   # the last writes the graph output


def test_elementwise_ops_run_in_place_when_their_input_dies():
    graph = traced(add_chain, x=16)
    plan = plan_memory(graph)
    adds = [n.output.name for n in graph.nodes if n.op == "add"]
    assert plan.inplace == {later: earlier for earlier, later in zip(adds, adds[1:])}
    assert plan.arena_bytes == BLOCK + WORKSPACE and plan.naive_bytes == 4 * BLOCK + WORKSPACE


def test_no_in_place_while_the_input_is_still_read():
    def kept(x):
        y = F.silu(F.matmul(x, F.param("w", (16, 16))))
        z = y + F.param("b", (16,))                           # y is read again below: z needs its own buffer
        return F.matmul(z * y, F.param("w2", (16, 16)))

    graph = traced(kept, x=16)
    plan = plan_memory(graph)
    assert list(plan.inplace.values()) == [next(n for n in graph.nodes if n.op == "add").output.name]
    assert_plan_invariants(graph, plan)


def test_no_in_place_into_a_column_slice():
    def sliced(x):
        both = F.matmul(x, F.param("w", (32, 16)))             # [S, 32]
        left = active_tracer().record("slice_cols", [both], {"start": 16, "stop": 32})
        return F.matmul(left + F.param("b", (16,)), F.param("w2", (16, 16)))

    graph = traced(sliced, x=16)
    plan = plan_memory(graph)
    assert not plan.inplace          # the sum starts at the buffer's first byte, the slice at column 16
    assert_plan_invariants(graph, plan)


def test_a_view_returned_as_output_keeps_its_base_alive_to_the_end():
    def view_out(x):
        y = F.matmul(x, F.param("w", (16, 16)))
        shown = y.reshape(S, 2, 8)
        later = F.matmul(F.matmul(x, F.param("w2", (16, 16))), F.param("w3", (16, 16)))
        return shown, later

    graph = traced(view_out, x=16)
    plan = plan_memory(graph)
    base = next(b for b in plan.buffers if b.key == graph.nodes[0].output.name)
    assert base.end == len(graph.nodes) - 1
    assert_plan_invariants(graph, plan)


def test_views_of_inputs_take_no_arena_space():
    def view_in(x):
        return F.matmul(x.reshape(S, 16), F.param("w", (16, 16)))

    graph = traced(view_in, x=16)
    plan = plan_memory(graph)
    assert graph.nodes[0].op == "reshape" and graph.nodes[0].output.name not in plan.offsets
    assert plan.arena_bytes == WORKSPACE                  # the matmul's workspace alone


def test_without_reuse_the_arena_is_the_naive_sum():
    graph = story_graph()
    plan = plan_memory(graph, reuse=False)
    assert plan.arena_bytes == plan.naive_bytes and not plan.inplace
    assert_plan_invariants(graph, plan)


def test_the_table_lists_every_buffer_by_offset():
    graph = traced(add_chain, x=16)
    plan = plan_memory(graph)
    lines = plan.table().splitlines()
    assert len(lines) == 1 + len(plan.buffers)
    assert all(n.output.name in plan.table() for n in graph.nodes if n.op == "add")


@pytest.mark.parametrize("optimised", [False, True], ids=["traced", "optimised"])
def test_invariants_on_the_story_graph(optimised):
    graph = story_graph()
    if optimised:
        graph, _ = PassManager(DEFAULT_PASSES).run(graph, None)
    assert_plan_invariants(graph, plan_memory(graph))


@pytest.mark.parametrize("prefill_chunk", [1, 128], ids=["decode", "prefill-128"])
def test_smollm2_sized_arena_is_at_most_40_percent_of_naive(prefill_chunk):
    traced_graph = smollm2_sized_graph(prefill_chunk)
    optimised, _ = PassManager(DEFAULT_PASSES).run(smollm2_sized_graph(prefill_chunk), None)
    for label, graph in (("traced", traced_graph), ("optimised", optimised)):
        plan = plan_memory(graph)
        assert_plan_invariants(graph, plan)
        print(f"SmolLM2-sized, S <= {prefill_chunk}, T <= 2048, {label}: naive {plan.naive_bytes:,} B, "
              f"lower bound {plan.lower_bound_bytes:,} B, arena {plan.arena_bytes:,} B "
              f"({plan.arena_bytes / plan.naive_bytes:.1%} of naive), {len(plan.inplace)} in place")
        assert plan.arena_bytes <= 0.4 * plan.naive_bytes


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_invariants_on_random_graphs(graph):
    assert_plan_invariants(graph, plan_memory(graph))
    assert_plan_invariants(graph, plan_memory(graph, reuse=False))
