"""Graphviz pictures: checks on the .dot text, and that the `dot` program accepts it."""

import difflib
import os
import re
import shutil
import subprocess

import pytest

from minitorch_infer.architectures import build_graph
from minitorch_infer.config import ModelConfig
from minitorch_infer.ir import Graph, TensorType, verify
from minitorch_infer.ir import dot
from minitorch_infer.ir.dot import SLOT_PALETTE, render_hint, to_dot, write_dot
from minitorch_infer.passes.memory_plan import plan_memory, workspace_key

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 50}
NODE_LINE = re.compile(r'^\s*"(?P<id>[^"]+)" \[(?P<attrs>.*)\];$')
EDGE_LINE = re.compile(r'^\s*"(?P<tail>[^"]+)" -> "(?P<head>[^"]+)"(?P<dashed> \[style=dashed\])?;$')


def tiny_graph(layers: int = 2, **extra) -> Graph:
    return build_graph(ModelConfig.from_dict({**TINY, "num_hidden_layers": layers, **extra}), context=64,
                       prefill_chunk=8)


def boxes(text: str) -> dict[str, str]:
    """Node id -> its attribute list."""
    return {m["id"]: m["attrs"] for line in text.splitlines() if (m := NODE_LINE.match(line))}


def edges(text: str) -> dict[tuple[str, str], bool]:
    """(tail, head) -> whether the edge is dashed."""
    return {(m["tail"], m["head"]): bool(m["dashed"]) for line in text.splitlines() if (m := EDGE_LINE.match(line))}


def fill(attrs: str) -> str:
    return re.search(r"fillcolor=(\"[^\"]+\"|\w+)", attrs)[1].strip('"')


def by_op(graph: Graph, op: str):
    return [n for n in graph.nodes if n.op == op]


def require_dot() -> None:
    if shutil.which("dot") is None:
        if os.environ.get("MINITORCH_REQUIRE_MODELS") == "1":
            pytest.fail("the Graphviz `dot` program is required (MINITORCH_REQUIRE_MODELS=1) but not installed")
        pytest.skip("Graphviz's `dot` program is not installed (a system package: apt install graphviz); "
                    "the .dot text is tested without it")


# --- layout and ids ---------------------------------------------------------------------------------

def test_one_cluster_per_layer_holding_that_layers_nodes():
    graph = tiny_graph(layers=3)
    text = to_dot(graph)
    assert "rankdir=TB" in text
    for layer in range(3):
        assert f"subgraph cluster_layer_{layer} {{" in text
        assert f'label="layer {layer}"' in text
    cluster_1 = text.split("subgraph cluster_layer_1 {")[1].split("\n  }")[0]
    layer_1_ids = {n.outputs[0].ref for n in graph.nodes if n.meta.get("layer") == 1}
    assert layer_1_ids == set(boxes(cluster_1)) - {"$kv.1.k", "$kv.1.v"}
    assert "embedding" not in cluster_1


def test_ids_are_value_refs_and_an_edit_changes_only_its_own_line():
    graph = tiny_graph()
    before = to_dot(graph)
    assert before == to_dot(graph)
    ids = set(boxes(before))
    assert {"%tokens", "%positions", "$kv.0.k"} <= ids
    assert {n.outputs[0].ref for n in graph.nodes} <= ids
    after = graph.copy()
    by_op(after, "silu")[0].meta["fused_from"] = ("silu", "mul")
    changed = [line for line in difflib.unified_diff(before.splitlines(), to_dot(after).splitlines(), lineterm="")
               if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert len(changed) == 2 and all('"%' in line and "silu" in line for line in changed)


def test_labels_show_op_output_type_and_short_attrs():
    graph = tiny_graph()
    text = to_dot(graph)
    norm = by_op(graph, "rms_norm")[0]
    label = boxes(text)[norm.output.ref]
    assert "<B>rms_norm</B> @attn_norm" in label            # hidden params still name the weight
    assert f"{norm.output.ref} : f32[S, 32]" in label and "eps=1e-06" in label
    reshape = boxes(text)[by_op(graph, "reshape")[0].output.ref]
    assert "shape=" not in reshape                          # it is the output type, already shown


def test_long_attributes_are_cut_short():
    graph = tiny_graph(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    table = boxes(to_dot(graph))[by_op(graph, "rope_table")[0].outputs[0].ref]
    assert "scaling=((" in table and "…" in table and "8192" not in table


def test_names_and_titles_are_escaped():
    graph = Graph('odd "name"')
    x = graph.add_input('x<&>"', TensorType((graph.symbol("S", 4), 8)))
    graph.set_outputs([graph.create_node("silu", [x]).output])
    text = to_dot(graph, title='a "quoted" title')
    assert 'digraph "odd \\"name\\"" {' in text and 'label="a \\"quoted\\" title\\n' in text
    assert '"%x<&>\\"" [' in text                                    # a quoted id
    assert "<B>%x&lt;&amp;&gt;&quot;</B>" in text                   # inside an HTML-like label


# --- colours and styles -----------------------------------------------------------------------------

def test_inputs_outputs_state_views_and_fused_ops_are_told_apart():
    graph = tiny_graph()
    graph.nodes[5].meta["fused_from"] = ("matmul", "matmul", "matmul")
    text = to_dot(graph)
    drawn, lines = boxes(text), edges(text)
    assert fill(drawn["%tokens"]) == fill(drawn["%positions"]) == "lightblue"
    assert fill(drawn[graph.outputs[0].ref]) == "powderblue"
    assert "cylinder" in drawn["$kv.0.k"] and fill(drawn["$kv.0.k"]) == "lightgrey"
    kv_write = by_op(graph, "kv_write")[0]
    assert fill(drawn[kv_write.output.ref]) == "lightgrey"
    assert lines[("$kv.0.k", kv_write.output.ref)] is True                              # into the state
    assert lines[(kv_write.output.ref, by_op(graph, "attention")[0].output.ref)] is True  # out of it
    assert lines[("%tokens", by_op(graph, "embedding")[0].output.ref)] is False
    assert "dashed" in drawn[by_op(graph, "reshape")[0].output.ref]           # views are dashed
    assert "dashed" not in drawn[by_op(graph, "matmul")[0].output.ref]
    assert fill(drawn[graph.nodes[5].output.ref]) == "orange"
    assert fill(drawn[graph.nodes[6].output.ref]) == "white"


def test_fused_ops_are_orange():
    graph = Graph("fused")
    seq = graph.symbol("S", 4)
    x = graph.add_input("x", TensorType((seq, 8)))
    swiglu = graph.create_node("swiglu", [x])
    graph.set_outputs([graph.create_node("silu", [swiglu.output]).output])
    assert fill(boxes(to_dot(graph))[swiglu.output.ref]) == "orange"


def test_params_are_hidden_unless_asked_for():
    graph = tiny_graph(tie_word_embeddings=True)
    q = next(n for n in graph.nodes if any(v.name == "layers.0.attn.q" for v in n.inputs))
    hidden, shown = to_dot(graph), to_dot(graph, show_params=True)
    assert "@layers.0.attn.q" not in hidden and not any(t.startswith("@") for t, _ in edges(hidden))
    assert fill(boxes(shown)["@layers.0.attn.q"]) == "#fff59d"
    assert ("@layers.0.attn.q", q.output.ref) in edges(shown)
    assert ("@embed", graph.outputs[0].ref) in edges(shown)                       # tied head: one box, two users
    cluster_0 = shown.split("subgraph cluster_layer_0 {")[1].split("\n  }")[0]
    assert '"@layers.0.attn.q" [' in cluster_0 and '"@embed" [' not in cluster_0


# --- folding ------------------------------------------------------------------------------------

def test_thirty_identical_layers_fold_into_one_block():
    graph = tiny_graph(layers=30)
    text = to_dot(graph, fold_layers=True)
    assert text.count("subgraph cluster_") == 1 and "subgraph cluster_layer_0 {" in text
    assert 'label="layers 0–29 (×30, identical)"' in text
    layer_0 = [n for n in graph.nodes if n.meta.get("layer") == 0]
    outside = [n for n in graph.nodes if n.meta.get("layer") is None]
    drawn, lines = boxes(text), edges(text)
    assert {n.outputs[0].ref for n in layer_0 + outside} | {"%tokens", "%positions", "$kv.0.k", "$kv.0.v"} == set(drawn)
    assert all(tail in drawn and head in drawn for tail, head in lines)
    # The block's last node stands for layer 29's, so the edge into what follows the layers still leaves it.
    assert (layer_0[-1].output.ref, by_op(graph, "last_row")[0].output.ref) in lines


def test_folding_keeps_layers_that_differ_apart():
    # Qwen2 with sliding windows from layer 2 on: the attention attrs differ, so two runs.
    graph = tiny_graph(layers=6, architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
                       sliding_window=16, max_window_layers=2)
    text = to_dot(graph, fold_layers=True)
    assert 'label="layers 0–1 (×2, identical)"' in text and 'label="layers 2–5 (×4, identical)"' in text
    assert "subgraph cluster_layer_0 {" in text and "subgraph cluster_layer_2 {" in text
    assert to_dot(tiny_graph(), fold_layers=False).count("subgraph cluster_") == 2


def test_folding_tells_apart_layers_reading_different_shared_values():
    graph = tiny_graph(layers=30)
    table = by_op(graph, "rope_table")[0]
    other = graph.create_node("rope_table", list(table.inputs), dict(table.attrs), before=table)
    for rope in (n for n in by_op(graph, "rope") if n.meta["layer"] == 5):    # layer 5 reads another rope table
        for slot, value in enumerate(rope.inputs):
            if value in table.outputs:
                rope.inputs[slot] = other.outputs[table.outputs.index(value)]
                value.users.remove(rope)
                rope.inputs[slot].users.append(rope)
    verify(graph)
    labels = re.findall(r'subgraph cluster_layer_\d+ {\n    graph \[label="([^"]+)"', to_dot(graph, fold_layers=True))
    assert labels == ["layers 0–4 (×5, identical)", "layer 5", "layers 6–29 (×24, identical)"]


# --- memory plan ------------------------------------------------------------------------------------

def test_plan_overlay_shows_offsets_sizes_and_a_colour_per_slot():
    graph = tiny_graph()
    plan = plan_memory(graph)
    text = to_dot(graph, plan=plan)
    assert plan.summary() in text and "@offset +size in KiB" in text
    drawn = boxes(text)
    colour_of_offset = {}
    for node in graph.nodes:
        value = node.outputs[0]
        if len(node.outputs) == 1 and value.name in plan.offsets:
            offset = plan.offsets[value.name]
            assert f"@{offset / 1024:g}K +{value.type.nbytes() / 1024:g}K" in drawn[value.ref]
            colour_of_offset.setdefault(offset, set()).add(fill(drawn[value.ref]))
    assert all(len(colours) == 1 for colours in colour_of_offset.values())     # one slot, one colour
    assert len(colour_of_offset) <= len(SLOT_PALETTE)
    assert len({c for colours in colour_of_offset.values() for c in colours}) == len(colour_of_offset)
    attention = by_op(graph, "attention")[0]
    assert workspace_key(attention) in plan.offsets and "scratch @" in drawn[attention.output.ref]
    assert fill(drawn[graph.outputs[0].ref]) == "powderblue"                   # outputs live outside the arena


def test_plan_overlay_outlines_fused_ops_in_orange():
    graph = tiny_graph()
    graph.nodes[5].meta["fused_from"] = ("matmul",)
    attrs = boxes(to_dot(graph, plan=plan_memory(graph)))[graph.nodes[5].output.ref]
    assert "color=\"orange\"" in attrs and fill(attrs) != "orange"


# --- writing and rendering ----------------------------------------------------------------------------

def test_write_dot_without_the_dot_program_writes_the_dot_and_a_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(dot, "dot_available", lambda: False)
    graph = tiny_graph()
    path = tmp_path / "graph.dot"
    assert write_dot(graph, path, render="svg") == [path]
    assert path.read_text() == to_dot(graph)
    assert [p.name for p in tmp_path.iterdir()] == ["graph.dot"]                # no temporary files left
    hint = render_hint(path)
    assert "apt-get install graphviz" in hint and f"dot -Tsvg {path} -o {tmp_path / 'graph.svg'}" in hint


def test_write_dot_makes_missing_directories(tmp_path):
    path = tmp_path / "passes" / "00_traced.dot"
    assert write_dot(tiny_graph(), path) == [path] and path.exists()


def test_write_dot_rejects_unknown_formats(tmp_path):
    with pytest.raises(ValueError, match="svg, png"):
        write_dot(tiny_graph(), tmp_path / "graph.dot", render="jpeg")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt, magic", [("svg", b"<?xml"), ("png", b"\x89PNG")])
def test_write_dot_renders_with_the_dot_program(tmp_path, fmt, magic):
    require_dot()
    path = tmp_path / "story.dot"
    assert write_dot(tiny_graph(), path, render=fmt) == [path, tmp_path / f"story.{fmt}"]
    assert (tmp_path / f"story.{fmt}").read_bytes().startswith(magic)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["story.dot", f"story.{fmt}"])


@pytest.mark.parametrize("options", [{}, {"show_params": True}, {"plan": True}, {"fold_layers": True, "plan": True},
                                     {"title": 'quotes " and <brackets> & {braces} | bars \\'}])
def test_dot_accepts_the_output(options):
    require_dot()
    graph = tiny_graph(layers=4)
    if options.pop("plan", False):
        options["plan"] = plan_memory(graph)
    result = subprocess.run(["dot", "-Tsvg"], input=to_dot(graph, **options), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "<svg" in result.stdout and not result.stderr
