"""The IR on its own: tracing, the text form, the verifier, and compile-time errors."""

import numpy as np
import pytest

from minitorch_infer.architectures import build_graph
from minitorch_infer.backends import numpy as numpy_backend
from minitorch_infer.config import ModelConfig
from minitorch_infer.errors import GraphError, TraceError
from minitorch_infer.ir import Graph, Sym, TensorType, functional as F, trace, verify
from minitorch_infer.passes.memory_plan import plan_memory

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 50}


@pytest.fixture
def graph():
    return build_graph(ModelConfig.from_dict(TINY), context=64, prefill_chunk=8)


def test_text_form_reads_like_the_design(graph):
    text = str(graph)
    assert "%tokens : i32[S]" in text
    assert "= matmul(%" in text and "@layers.0.attn.q) : f32[S, 32]" in text
    assert "= kv_write(%" in text and "$kv.1.v, total=T) : f32[2, T, 8]" in text
    assert "reshape(%" in text and "shape=(S, 4, 8)) : f32[S, 4, 8]" in text
    assert text.count("# layer") == 2


def test_traced_graph_verifies_and_counts_ops(graph):
    verify(graph)
    counts = graph.op_counts()
    assert counts["matmul"] == 2 * 7 + 1
    assert counts["attention"] == counts["rope"] // 2 == 2
    assert set(graph.states) == {"kv.0.k", "kv.0.v", "kv.1.k", "kv.1.v"}
    assert graph.nodes[5].meta["layer"] == 0 and graph.nodes[5].meta["source"].startswith("llama.py:")


def test_branching_on_a_traced_value_is_a_trace_error():
    def branchy(x):
        if F.silu(x):
            return x
        return x

    with pytest.raises(TraceError, match="cannot drive Python control flow"):
        trace(branchy, {"x": TensorType((Sym("S", 4), 8))})


def test_an_array_where_a_tensor_belongs_is_a_trace_error_but_a_number_is_a_constant():
    with pytest.raises(TraceError, match="not a traced tensor .* an array must be a param"):
        trace(lambda x: x + np.ones(4, np.float32), {"x": TensorType((4,))})
    graph = trace(lambda x: x + 1.0, {"x": TensorType((4,))})
    assert [n.op for n in graph.nodes] == ["constant", "add"] and graph.nodes[0].attrs == {"value": 1.0}


def test_shape_errors_name_the_op_and_types():
    with pytest.raises(GraphError, match=r"matmul: inner dimensions differ \(inputs: f32\[4, 8\], f32\[3, 5\]\)"):
        trace(lambda x: F.matmul(x, F.param("w", (3, 5))), {"x": TensorType((4, 8))})


def test_verifier_catches_a_dropped_edge(graph):
    node = next(n for n in graph.nodes if n.op == "silu")
    node.inputs[0].users.remove(node)
    with pytest.raises(GraphError, match="does not list this node among its users"):
        verify(graph)


def test_verifier_catches_a_changed_shape(graph):
    node = next(n for n in graph.nodes if n.op == "matmul")
    node.output.type = TensorType((node.output.shape[0], 999))
    with pytest.raises(GraphError, match="stored output types .* differ from inferred"):
        verify(graph)


def test_verifier_catches_use_before_definition(graph):
    graph.nodes.insert(0, graph.nodes.pop(10))
    with pytest.raises(GraphError, match="is not defined before use"):
        verify(graph)


def test_an_op_without_a_kernel_fails_at_compile_time(graph, monkeypatch):
    monkeypatch.delitem(numpy_backend.KERNELS, "silu")
    with pytest.raises(GraphError, match="numpy backend has no kernel for op 'silu'"):
        numpy_backend.compile(graph, plan_memory(graph), {n: np.zeros(v.type.concrete_shape(), np.float32)
                                                          for n, v in graph.params.items()})


def test_editing_helpers_keep_users_consistent(graph):
    silu = next(n for n in graph.nodes if n.op == "silu")
    replacement = graph.create_node("silu", silu.inputs, before=silu)
    graph.replace_all_uses(silu.output, replacement.output)
    graph.erase(silu)
    verify(graph)
    with pytest.raises(GraphError, match="still used"):
        graph.erase(replacement)


def test_networkx_view_is_acyclic(graph):
    import networkx as nx

    digraph = graph.to_networkx()
    assert nx.is_directed_acyclic_graph(digraph)
    assert digraph.number_of_nodes() == len(graph.nodes)


def test_symbol_bounds_are_enforced():
    assert TensorType((Sym("S", 4), 3)).concrete_shape({"S": 2}) == (2, 3)
    with pytest.raises(GraphError, match="S = 5 exceeds its planned upper bound 4"):
        TensorType((Sym("S", 4), 3)).concrete_shape({"S": 5})
    assert isinstance(Graph().symbol("S", 4), Sym)
