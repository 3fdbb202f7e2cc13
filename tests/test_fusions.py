"""The built-in passes: op counts before and after on the story and SmolLM2-sized graphs, numerical
equivalence (reference backend, 1e-5), and the cases where each must not fire."""

from collections import Counter

import pytest

from graph_builders import SMOLLM2_SIZED, S, T, smollm2_sized_graph, story_config, story_graph, story_weights, traced
from minitorch_infer.architectures import build_graph
from minitorch_infer.config import ModelConfig
from minitorch_infer.ir import Sym
from minitorch_infer.ir import functional as F
from minitorch_infer.passes import DEFAULT_PASSES, PassManager, check_pass, random_weights

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}

# What each pass does to the op counts of one Llama layer (it runs alone, on the traced graph).
PER_LAYER_CHANGE = {
    "fuse_qkv": {"matmul": -2, "slice_cols": +3},
    "fuse_gate_up": {"matmul": -1, "silu": -1, "mul": -1, "swiglu": +1},
    "fuse_residual": {"matmul": -2, "add": -2, "matmul_add": +2},
    "prune_rows": {},
    "tabulate_rope": {},
    "dce": {},
}
# ... and to the whole model: the one rope table becomes a lookup; the last layer works on its last row from
# attention's queries on, which takes last_row of q's input, the rope table and the residual (one was there).
PER_MODEL_CHANGE = {"tabulate_rope": {"rope_table": -1, "embedding": +1}, "prune_rows": {"last_row": +2}}


def traced_counts(layers: int) -> dict[str, int]:
    per_layer = {"rms_norm": 2, "matmul": 7, "reshape": 4, "rope": 2, "kv_write": 2, "attention": 1, "add": 2,
                 "silu": 1, "mul": 1}
    counts = {op: layers * n for op, n in per_layer.items()}
    counts["rms_norm"] += 1                                           # the final norm
    counts["matmul"] += 1                                             # the head
    return {"embedding": 1, "rope_table": 1, "last_row": 1, **counts}


def optimised_counts(layers: int) -> dict[str, int]:
    return {"embedding": 2, "last_row": 3, "rms_norm": 2 * layers + 1, "matmul": 2 * layers + 1,
            "slice_cols": 3 * layers, "reshape": 4 * layers, "rope": 2 * layers, "kv_write": 2 * layers,
            "attention": layers, "matmul_add": 2 * layers, "swiglu": layers}


def changed_counts(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    change = Counter(after)
    change.subtract(before)
    return {op: n for op, n in change.items() if n}


GRAPHS = {"story": (story_graph, 2), "smollm2-sized": (lambda: smollm2_sized_graph(128), 30)}


@pytest.mark.parametrize("graph_name", GRAPHS)
@pytest.mark.parametrize("pass_name", PER_LAYER_CHANGE)
def test_op_counts_after_each_pass(graph_name, pass_name):
    build, layers = GRAPHS[graph_name]
    graph = build()
    assert graph.op_counts() == traced_counts(layers)
    optimised, report = PassManager([pass_name]).run(graph.copy(), None)
    expected = {op: layers * n for op, n in PER_LAYER_CHANGE[pass_name].items()}
    expected.update(PER_MODEL_CHANGE.get(pass_name, {}))
    assert changed_counts(graph.op_counts(), optimised.op_counts()) == expected
    rewrites = {"fuse_qkv": layers, "fuse_gate_up": layers, "fuse_residual": 2 * layers, "tabulate_rope": 1,
                "prune_rows": 14, "dce": 0}[pass_name]
    assert report.stats[0].changed == rewrites


@pytest.mark.parametrize("graph_name", GRAPHS)
def test_op_counts_after_the_default_pipeline(graph_name):
    build, layers = GRAPHS[graph_name]
    optimised, report = PassManager(DEFAULT_PASSES).run(build(), None)
    assert optimised.op_counts() == optimised_counts(layers)
    assert [s.name for s in report.stats] == DEFAULT_PASSES
    dce = report.stats[-1]
    assert dce.notes == {"erased nodes": 0, "unused params": 5 * layers}       # q, k, v, gate, up: now packed
    assert f"layers.{layers - 1}.mlp.gate+up" in optimised.params and "layers.0.attn.q" not in optimised.params


@pytest.mark.parametrize("passes", [[name] for name in PER_LAYER_CHANGE] + [DEFAULT_PASSES], ids=lambda p: "+".join(p))
def test_story_outputs_and_cache_are_unchanged_by(passes):
    weights = story_weights()
    optimised, _ = check_pass(story_graph(), passes, weights, trials=3, **TOLERANCE)
    for name in optimised.params:
        assert weights[name].shape == optimised.params[name].type.concrete_shape()


def test_packing_reuses_the_weights_memory():
    weights = story_weights()
    held = weights.nbytes
    PassManager(DEFAULT_PASSES).run(story_graph(), weights)
    # q, k, v, gate, up are now views into the packed arrays; only the rope table is new
    assert weights.nbytes == held + weights["rope.table"].nbytes
    assert weights["layers.0.attn.k"].base is weights["layers.0.attn.q+k+v"]


CUT_DOWN = {"num_hidden_layers": 2, "vocab_size": 512}        # SmolLM2's widths, fewer layers and tokens


@pytest.mark.parametrize("variant", [{}, {"attention_bias": True, "mlp_bias": True},
                                     {"architectures": ["Qwen2ForCausalLM"]}], ids=["plain", "biases", "qwen2"])
def test_smollm2_sized_outputs_are_unchanged_by_the_default_pipeline(variant):
    config = ModelConfig.from_dict({**SMOLLM2_SIZED, **CUT_DOWN, **variant})
    for prefill_chunk in (1, 16):
        check_pass(build_graph(config, 64, prefill_chunk), DEFAULT_PASSES, **TOLERANCE)


def test_biases_are_packed_with_the_projections():
    config = ModelConfig.from_dict({**SMOLLM2_SIZED, **CUT_DOWN, "attention_bias": True, "mlp_bias": True})
    optimised, report = PassManager(DEFAULT_PASSES).run(build_graph(config, 64, 1), None)
    assert "layers.0.attn.q_bias+k_bias+v_bias" in optimised.params
    notes = {s.name: s.notes for s in report.stats}
    assert notes["fuse_qkv"]["rewritten"] == 2
    assert notes["fuse_gate_up"]["rewritten"] == 0               # with biases the gate is add(matmul, b): no match
    assert notes["fuse_residual"]["left alone"] == {
        "the other operand is broadcast (a bias), not an accumulator": 2 * (1 + 1 + 3)}   # qkv, o and down biases


# --- where each fusion must not fire ---------------------------------------------------------------

def mlp(x, gate_reader: bool = False, silu_reader: bool = False, up_output: bool = False):
    gate = F.matmul(x, F.param("layers.0.mlp.gate", (16, 8)))
    up = F.matmul(x, F.param("layers.0.mlp.up", (16, 8)))
    act = F.silu(gate)
    out = F.matmul(act * up, F.param("layers.0.mlp.down", (8, 16)))
    extra = [gate] if gate_reader else [act] if silu_reader else [up] if up_output else []
    return (out, *extra)


@pytest.mark.parametrize("case", ["gate_reader", "silu_reader", "up_output"])
def test_gate_up_is_not_fused_when_an_intermediate_is_needed_elsewhere(case):
    graph = traced(lambda x: mlp(x, **{case: True}), x=8)
    optimised, report = check_pass(graph, ["fuse_gate_up"], **TOLERANCE)
    assert optimised.op_counts() == graph.op_counts()
    assert report.stats[0].changed == 0 and report.stats[0].notes["left alone"]


def test_gate_up_fuses_and_stays_equivalent():
    graph = traced(mlp, x=8)
    optimised, _ = check_pass(graph, ["fuse_gate_up", "dce"], **TOLERANCE)
    assert optimised.op_counts() == {"matmul": 2, "swiglu": 1}
    assert optimised.params["layers.0.mlp.gate+up"].type.shape == (32, 8)


def test_gate_and_up_reading_different_inputs_do_not_match():
    def two_inputs(x, y):
        return F.silu(F.matmul(x, F.param("g", (16, 8)))) * F.matmul(y, F.param("u", (16, 8)))

    optimised, _ = check_pass(traced(two_inputs, x=8, y=8), ["fuse_gate_up"])
    assert "swiglu" not in optimised.op_counts()


def residual(x, r, order: str = "r+mm", product_output: bool = False, product_reader: bool = False):
    product = F.matmul(x, F.param("w", (16, 8)))
    total = r + product if order == "r+mm" else product + r
    extra = [product] if product_output else [F.silu(product)] if product_reader else []
    return (total, *extra)


@pytest.mark.parametrize("order", ["r+mm", "mm+r"])
def test_residual_fuses_in_either_operand_order(order):
    optimised, _ = check_pass(traced(lambda x, r: residual(x, r, order), x=8, r=16), ["fuse_residual"], **TOLERANCE)
    assert optimised.op_counts() == {"matmul_add": 1}


@pytest.mark.parametrize("case", ["product_output", "product_reader"])
def test_residual_is_not_fused_when_the_product_is_needed_elsewhere(case):
    graph = traced(lambda x, r: residual(x, r, **{case: True}), x=8, r=16)
    optimised, report = check_pass(graph, ["fuse_residual"])
    assert "matmul_add" not in optimised.op_counts() and report.stats[0].notes["left alone"]


def test_a_bias_add_is_not_a_residual():
    def biased(x):
        return F.matmul(x, F.param("w", (16, 8))) + F.param("b", (16,))

    optimised, report = check_pass(traced(biased, x=8), ["fuse_residual"])
    assert optimised.op_counts() == {"matmul": 1, "add": 1}
    assert report.stats[0].notes["left alone"] == {"the other operand is broadcast (a bias), not an accumulator": 1}


def attention_projections(x, parts=("q", "k", "v"), biases=(), v_output: bool = False):
    outs = []
    for part in parts:
        y = F.matmul(x, F.param(f"layers.0.attn.{part}", (16 if part == "q" else 8, 8)))
        if part in biases:
            y = y + F.param(f"layers.0.attn.{part}_bias", (y.shape[1],))
        outs.append(y)
    mixed = F.matmul(outs[0], F.param("mix", (8, 16)))
    rest = [F.matmul(o, F.param(f"mix_{i}", (8, 8))) for i, o in enumerate(outs[1:])]
    return (mixed, *rest, *([outs[-1]] if v_output else []))


@pytest.mark.parametrize("biases", [(), ("q", "k", "v"), ("q",)], ids=["none", "all", "q only"])
def test_qkv_fuses_with_or_without_biases(biases):
    graph = traced(lambda x: attention_projections(x, biases=biases), x=8)
    optimised, _ = check_pass(graph, ["fuse_qkv", "dce"], **TOLERANCE)
    counts = optimised.op_counts()
    assert counts["slice_cols"] == 3 and counts["matmul"] == 1 + 3
    assert counts.get("add", 0) == (1 if biases == ("q", "k", "v") else len(biases))


@pytest.mark.parametrize("case", [{"parts": ("q", "k")}, {"v_output": True}], ids=["no v", "v is an output"])
def test_qkv_is_not_fused(case):
    graph = traced(lambda x: attention_projections(x, **case), x=8)
    optimised, _ = check_pass(graph, ["fuse_qkv"])
    assert "slice_cols" not in optimised.op_counts()


def test_dce_erases_dead_chains_but_keeps_cache_writes():
    def with_dead_code(x):
        F.silu(F.matmul(x, F.param("unused", (8, 8))))                         # read by nobody
        F.kv_write(x.reshape(S, 2, 4), F.state("cache", (2, T.max, 4)), T)    # read by nobody, but fills the cache
        return F.silu(x)

    graph = traced(with_dead_code, x=8)
    optimised, report = check_pass(graph, ["dce"])
    assert optimised.op_counts() == {"reshape": 1, "kv_write": 1, "silu": 1}
    assert report.stats[0].notes == {"erased nodes": 2, "unused params": 1} and not optimised.params


@pytest.mark.parametrize("scaling", [{}, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 16}}],
                         ids=["default", "llama3"])
def test_rope_table_becomes_a_lookup_of_every_cached_position(scaling):
    graph = smollm2_sized_graph(8, context=48, num_hidden_layers=1, **scaling)
    optimised, report = check_pass(graph, ["tabulate_rope"], **TOLERANCE)
    assert report.stats[0].changed == 1 and "rope_table" not in optimised.op_counts()
    assert optimised.params["rope.table"].type.shape == (48, 64)      # one row per position the cache holds


def test_dynamic_ntk_rope_is_left_to_compute_per_step():
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}
    graph = smollm2_sized_graph(8, context=48, num_hidden_layers=1, rope_scaling=dynamic)
    optimised, report = check_pass(graph, ["tabulate_rope"], **TOLERANCE)
    assert optimised.op_counts()["rope_table"] == 1 and "rope.table" not in optimised.params
    assert report.stats[0].notes["left alone"] == {
        "dynamic NTK scaling: the frequencies change with the sequence length": 1}


@pytest.mark.parametrize("overrides", [{}, {"architectures": ["MistralForCausalLM"], "sliding_window": 3}],
                         ids=["full attention", "sliding window"])
def test_the_last_layer_computes_only_the_row_the_logits_need(overrides):
    graph = smollm2_sized_graph(8, context=24, num_hidden_layers=2, vocab_size=64, **overrides)
    optimised, _ = check_pass(graph, DEFAULT_PASSES, **TOLERANCE)
    last_layer = [n for n in optimised.nodes if n.meta.get("layer") == 1]
    attention = next(n for n in last_layer if n.op == "attention")
    one_per_sequence = Sym("R", 1)                               # R: the sequences in a step, one row each
    assert attention.inputs[0].type.shape[0] == one_per_sequence == attention.output.type.shape[0]
    assert attention.attrs["queries"] == "last"
    assert {n.op for n in last_layer if n.output.type.shape[0] == one_per_sequence} >= {"rope", "matmul_add",
                                                                                         "rms_norm", "swiglu"}
    first_layer = [n for n in optimised.nodes if n.meta.get("layer") == 0 and n.op == "attention"]
    assert first_layer[0].output.type.shape[0] != one_per_sequence   # earlier layers feed every row to the next
    assert first_layer[0].attrs["queries"] == "all"


def test_every_position_logits_keep_every_row():
    graph = build_graph(story_config(), 64, 8, all_logits=True)
    optimised, report = check_pass(graph, ["prune_rows"], **TOLERANCE)
    assert report.stats[0].changed == 0 and "last_row" not in optimised.op_counts()


def test_a_matmul_whose_second_operand_has_the_rows_axis_keeps_it_whole():
    def scores(x, y):                                  # x·yᵀ: row i of the result needs every row of y
        return F.last_row(F.matmul(x, y), Sym("R", 1))

    optimised, report = check_pass(traced(scores, x=8, y=8), ["prune_rows"], **TOLERANCE)
    matmul = next(n for n in optimised.nodes if n.op == "matmul")
    assert matmul.inputs[0].producer.op == "last_row" and matmul.inputs[1].kind == "input"


def test_a_table_made_for_another_context_is_not_reused():
    short, long = (smollm2_sized_graph(8, context=context, num_hidden_layers=1) for context in (16, 48))
    weights = random_weights(long)                     # the same params: only the cache length differs
    check_pass(short, ["tabulate_rope"], weights, **TOLERANCE)
    optimised, _ = check_pass(long, ["tabulate_rope"], weights, **TOLERANCE)
    assert weights["rope.table"].shape == (16, 64) and optimised.params["rope.table.1"].type.shape == (48, 64)
