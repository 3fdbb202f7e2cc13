"""Graphs for the pass and planner tests: the real story graph, SmolLM2-sized synthetic graphs, small traced
graphs, random DAGs (a hypothesis strategy), and an independent check of a memory plan's invariants."""

from __future__ import annotations

from typing import Callable

from conftest import require_model
from hypothesis import strategies as st

from minitorch_infer.architectures import build_graph
from minitorch_infer.config import ModelConfig
from minitorch_infer.ir import Graph, Sym, TensorType, Value, op_def, trace
from minitorch_infer.passes import MemoryPlan
from minitorch_infer.passes.memory_plan import workspace_key
from minitorch_infer.formats.weights import WeightStore, load_safetensors_dir

# SmolLM2-135M's shape: 30 layers, hidden 576, intermediate 1536, 9 query / 3 KV heads of 64, vocab 49152.
SMOLLM2_SIZED = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                 "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 2048,
                 "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "bos_token_id": 1, "eos_token_id": 2}


def smollm2_sized_graph(prefill_chunk: int, context: int = 2048, **overrides) -> Graph:
    config = ModelConfig.from_dict({**SMOLLM2_SIZED, **overrides}, source="<SmolLM2-sized>")
    return build_graph(config, context, prefill_chunk)


def story_config() -> ModelConfig:
    return ModelConfig.from_file(require_model("story") / "config.json")


def story_weights() -> WeightStore:
    weights = load_safetensors_dir(require_model("story"))
    weights.tie_embeddings()
    return weights


def story_graph(prefill_chunk: int = 128, context: int = 512) -> Graph:
    return build_graph(story_config(), context, prefill_chunk)


# --- small traced graphs --------------------------------------------------------------------------

S = Sym("S", 4)
T = Sym("T", 8)


def traced(fn: Callable, **input_widths: int) -> Graph:
    """Trace fn over [S, width] float inputs, named by the keyword arguments."""
    return trace(fn, {name: TensorType((S, width)) for name, width in input_widths.items()}, name=fn.__name__)


# --- random DAGs ------------------------------------------------------------------------------------

WIDTHS = (4, 8, 16)


@st.composite
def random_graphs(draw) -> Graph:
    """A random DAG of registered ops over [S, N] values: chains, diamonds, views, in-place ops, KV writes,
    attention and workspaces, with random graph outputs (views among them)."""
    graph = Graph("random")
    seq = graph.symbol("S", draw(st.integers(1, 6)))
    total = graph.symbol("T", 8)
    pool: list[Value] = [graph.add_input("x", TensorType((seq, 8)))]
    counter = iter(range(1000))

    def param(shape: tuple) -> Value:
        return graph.param(f"w{next(counter)}", TensorType(shape))

    def pick(condition: Callable[[Value], bool]) -> Value | None:
        choices = [v for v in pool if condition(v)]
        return draw(st.sampled_from(choices)) if choices else None

    def rank(n: int) -> Callable[[Value], bool]:
        return lambda v: v.type.rank == n and v.kind != "state"

    for _ in range(draw(st.integers(1, 24))):
        op = draw(st.sampled_from(["matmul", "matmul_add", "add", "mul", "silu", "rms_norm", "reshape",
                                   "slice_cols", "last_row", "swiglu", "kv_write", "attention"]))
        a = pick(rank(2)) if op not in ("kv_write", "attention") else pick(rank(3))
        inputs, attrs = None, {}
        if a is None:
            continue
        width = a.type.shape[-1]
        if op == "matmul":
            inputs = [a, param((draw(st.sampled_from(WIDTHS)), width))]
        elif op == "matmul_add":
            c = pick(lambda v: rank(2)(v) and v.type.shape[0] == a.type.shape[0])
            inputs = [a, param((c.type.shape[1], width)), c]
        elif op in ("add", "mul"):
            b = pick(lambda v: v.type == a.type and v.kind != "state")
            inputs = [a, b if draw(st.booleans()) else param((width,))]
        elif op == "silu":
            inputs = [a]
        elif op == "rms_norm":
            inputs, attrs = [a, param((width,))], {"eps": 1e-5}
        elif op == "reshape" and width % 2 == 0:
            inputs, attrs = [a], {"shape": (a.type.shape[0], 2, width // 2)}
        elif op == "slice_cols" and width > 1:
            start = draw(st.integers(0, width - 2))
            inputs, attrs = [a], {"start": start, "stop": draw(st.integers(start + 1, width))}
        elif op == "last_row":
            inputs, attrs = [a], {"rows": Sym("R", 1)}
        elif op == "swiglu" and width % 2 == 0:
            inputs = [a]
        elif op == "kv_write":
            heads, head_dim = a.type.shape[1:]
            cache = graph.state(f"cache{next(counter)}", TensorType((heads, total.max, head_dim)))
            inputs, attrs = [a, cache], {"total": total}
        elif op == "attention":
            kv = pick(lambda v: v.kind == "state" and v.type.shape[0] == a.type.shape[1]
                      and v.type.shape[2] == a.type.shape[2])
            inputs = [a, kv, kv] if kv is not None else None
            attrs = {"scale": 0.5, "window": 0, "queries": "all"}
        if inputs is None:
            continue
        node = graph.create_node(op, inputs, attrs)
        pool.extend(node.outputs)
    computed = [v for v in pool if v.producer is not None and v.kind == "temp"]
    if not computed:
        computed = [graph.create_node("silu", [pool[0]]).output]
    count = draw(st.integers(1, min(3, len(computed))))
    graph.set_outputs(draw(st.lists(st.sampled_from(computed), min_size=count, max_size=count, unique_by=id)))
    return graph


# --- the planner's invariants, checked from the graph alone ------------------------------------------

def _storage_root(value: Value) -> Value:
    """The value whose buffer `value` is (following views to their base)."""
    while value.producer is not None and op_def(value.producer.op).view_of is not None:
        value = value.producer.inputs[op_def(value.producer.op).view_of]
    return value


def _workspace_bytes(node) -> int:
    spec = op_def(node.op)
    return 0 if spec.workspace is None else 4 * spec.workspace([v.type for v in node.inputs], node.attrs)


def assert_plan_invariants(graph: Graph, plan: MemoryPlan) -> None:
    """Values alive at the same node never share bytes (except an in-place result and the input that dies
    where it is made); only temps and workspaces are placed; lower bound <= arena <= naive."""
    position = {id(node): i for i, node in enumerate(graph.nodes)}
    final = len(graph.nodes) - 1
    placeable = {v.name for node in graph.nodes for v in node.outputs if v.kind == "temp"}
    placeable |= {workspace_key(n) for n in graph.nodes if _workspace_bytes(n)}
    assert set(plan.offsets) <= placeable, f"placed non-temps: {set(plan.offsets) - placeable}"
    assert all(v.name not in plan.offsets for v in graph.outputs), "a graph output was placed in the arena"

    # Each buffer-owning temp (or workspace): its bytes and the nodes it must survive.
    regions: dict[str, tuple[int, int, int, int]] = {}          # name -> (offset, end byte, first node, last node)
    for node in graph.nodes:
        index = position[id(node)]
        for value in node.outputs:
            if value.kind == "temp" and op_def(node.op).view_of is None:
                assert value.name in plan.offsets, f"{value.ref} was not placed"
                offset = plan.offsets[value.name]
                regions[value.name] = (offset, offset + value.type.nbytes(), index, index)
        size = _workspace_bytes(node)
        if size:                                    # a matmul with a float32 weight needs none
            key = workspace_key(node)
            regions[key] = (plan.offsets[key], plan.offsets[key] + size, index, index)
    for value in graph.values():
        root = _storage_root(value)
        if root.name not in regions or root.kind != "temp" or value.producer is None:
            continue
        last = final if value.kind == "output" else max((position[id(u)] for u in value.users), default=-1)
        offset, end, first, alive_to = regions[root.name]
        regions[root.name] = (offset, end, first, max(alive_to, last))

    for name, (offset, end, first, last) in regions.items():
        assert 0 <= offset and end <= plan.arena_bytes, f"{name} lies outside the arena"

    values = {v.name: v for v in graph.values()}
    donors = {result: _storage_root(values[donor]).name for result, donor in plan.inplace.items()}
    for result, donor in donors.items():
        made_at = position[id(values[result].producer)]
        assert regions[donor][3] == made_at, f"{result} took over {donor}, which is still read after node {made_at}"
        given = values[plan.inplace[result]]
        assert given.type.nbytes() == values[result].type.nbytes()
        while given.producer is not None and given.producer.op == "reshape":
            given = given.producer.inputs[0]
        assert given.name == donor, f"{result} was written over {plan.inplace[result]}, a strided part of {donor}"

    ordered = sorted(regions.items(), key=lambda item: item[1][0])
    for i, (name, (offset, end, first, last)) in enumerate(ordered):
        for other, (other_offset, other_end, other_first, other_last) in ordered[i + 1:]:
            if other_offset >= end:
                break
            if other_first > last or first > other_last:
                continue                                     # never alive together
            handover = (donors.get(other) == name and other_first == last) or \
                       (donors.get(name) == other and first == other_last)
            assert handover, (f"{name} [{offset}, {end}) alive {first}..{last} overlaps {other} "
                              f"[{other_offset}, {other_end}) alive {other_first}..{other_last}")

    assert plan.lower_bound_bytes <= plan.arena_bytes <= plan.naive_bytes
