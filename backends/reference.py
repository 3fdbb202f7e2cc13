"""The reference backend: a plain interpreter that allocates freely. It is the oracle the fast backend and
every pass are checked against, so each kernel is written for clarity, not speed.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np

from ..errors import GraphError
from ..ir import Graph
from ..quantized import is_quantized
from .layout import StepLayout
from .rope import rope_frequencies

KERNELS: dict[str, Callable] = {}


def kernel(op: str):
    def register(fn):
        KERNELS[op] = fn
        return fn

    return register


class Step:
    """What a kernel may need beyond its inputs: the symbols' values and where each row's sequence keeps its cache."""

    def __init__(self, bindings: Mapping[str, int], layout: StepLayout):
        self.bindings = bindings
        self.layout = layout


def run(graph: Graph, params: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray], bindings: Mapping[str, int], layout: StepLayout | None = None
        ) -> list[np.ndarray]:
    """Evaluate the graph node by node. `state` arrays (the KV pool) are updated in place.

    Without a layout, the step is one sequence of S rows whose T positions fill slots 0..T-1 (bindings give
    S and T); R, the sequences in the step, is bound from the layout.
    """
    if layout is None:
        layout = StepLayout.single(bindings["S"], bindings.get("T", bindings["S"]))
    bindings = {**bindings, "R": len(layout.totals)}
    step = Step(bindings, layout)
    env: dict[int, np.ndarray] = {}
    for value in graph.inputs:
        env[id(value)] = np.asarray(inputs[value.name])
    for name, value in graph.params.items():
        weight = params[name]
        # A quantised weight means its dequantised values: what the fast kernels must reproduce; a weight in
        # panels, the plain matrix.
        env[id(value)] = weight.dequantize() if is_quantized(weight) else np.asarray(weight)
    for name, value in graph.states.items():
        env[id(value)] = state[name]
    for node in graph.nodes:
        if node.op not in KERNELS:
            raise GraphError(f"reference backend has no kernel for op {node.op!r}")
        results = KERNELS[node.op]([env[id(v)] for v in node.inputs], node.attrs, step)
        results = results if isinstance(results, tuple) else (results,)
        for value, result in zip(node.outputs, results):
            env[id(value)] = result
    return [env[id(v)] for v in graph.outputs]


@kernel("embedding")
def _embedding(args, attrs, step):
    ids, table = args
    return table[ids]


@kernel("rms_norm")
def _rms_norm(args, attrs, step):
    x, weight = args
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(variance + np.float32(attrs["eps"])) * weight).astype(np.float32)


@kernel("matmul")
def _matmul(args, attrs, step):
    x, w = args
    return x @ w.T


@kernel("matmul_add")
def _matmul_add(args, attrs, step):
    x, w, c = args
    return x @ w.T + c


@kernel("add")
def _add(args, attrs, step):
    return args[0] + args[1]


@kernel("mul")
def _mul(args, attrs, step):
    return args[0] * args[1]


@kernel("sub")
def _sub(args, attrs, step):
    return args[0] - args[1]


@kernel("div")
def _div(args, attrs, step):
    return args[0] / args[1]


@kernel("constant")
def _constant(args, attrs, step):
    return np.array(attrs["value"], dtype=np.float32)


@kernel("exp")
def _exp(args, attrs, step):
    return np.exp(args[0])


@kernel("tanh")
def _tanh(args, attrs, step):
    return np.tanh(args[0])


@kernel("softmax")
def _softmax(args, attrs, step):
    shifted = np.exp(args[0] - args[0].max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


_ERF = np.frompyfunc(math.erf, 1, 1)


@kernel("gelu")
def _gelu(args, attrs, step):
    x = args[0].astype(np.float64)
    if attrs["approximate"] == "tanh":
        y = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    else:
        y = 0.5 * x * (1 + _ERF(x / math.sqrt(2)).astype(np.float64))
    return y.astype(np.float32)


@kernel("layer_norm")
def _layer_norm(args, attrs, step):
    x, weight, bias = args
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(variance + np.float32(attrs["eps"])) * weight + bias).astype(np.float32)


@kernel("transpose")
def _transpose(args, attrs, step):
    return np.ascontiguousarray(args[0].transpose(attrs["perm"]))


def _silu_values(x):
    return x / (np.float32(1) + np.exp(-x))


@kernel("silu")
def _silu(args, attrs, step):
    return _silu_values(args[0])


@kernel("swiglu")
def _swiglu(args, attrs, step):
    gate, up = np.split(args[0], 2, axis=-1)
    return _silu_values(gate) * up


@kernel("reshape")
def _reshape(args, attrs, step):
    shape = tuple(d if isinstance(d, int) else step.bindings[d.name] for d in attrs["shape"])
    return args[0].reshape(shape)


@kernel("slice_cols")
def _slice_cols(args, attrs, step):
    return args[0][:, attrs["start"]:attrs["stop"]]


@kernel("last_row")
def _last_row(args, attrs, step):
    return args[0][step.layout.last_rows]


@kernel("rope_table")
def _rope_table(args, attrs, step):
    (positions,) = args
    seq_len = int(positions.max()) + 1 if positions.size else 0
    inv_freq = rope_frequencies(attrs["head_dim"], attrs["theta"], attrs["scaling"], seq_len)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1).reshape(len(positions), -1).astype(np.float32)


@kernel("rope")
def _rope(args, attrs, step):
    x, table = args
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = table[:, None, 0::2], table[:, None, 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


@kernel("kv_write")
def _kv_write(args, attrs, step):
    x, cache = args
    layout = step.layout
    for i, (first, stop, total) in enumerate(zip(layout.row_starts, layout.row_stops, layout.totals)):
        new_positions = layout.positions_of(i)[total - (stop - first):]
        cache[:, new_positions, :] = x[first:stop].transpose(1, 0, 2)
    return cache


@kernel("attention")
def _attention(args, attrs, step):
    q, k_pool, v_pool = args
    layout = step.layout
    out = np.empty_like(q)
    for i, (first, stop, total) in enumerate(zip(layout.row_starts, layout.row_stops, layout.totals)):
        rows = slice(first, stop) if attrs["queries"] == "all" else slice(i, i + 1)
        positions = layout.positions_of(i)
        out[rows] = _causal_attention(q[rows], k_pool[:, positions], v_pool[:, positions], attrs)
    return out


def _causal_attention(q, k, v, attrs):
    """q [n, Hq, D] are the newest n positions of a sequence whose keys and values are k, v [Hkv, T, D]."""
    seq, heads, head_dim = q.shape
    kv_heads, total, _ = k.shape
    group = heads // kv_heads
    query_pos = np.arange(total - seq, total)[:, None]
    key_pos = np.arange(total)[None, :]
    visible = key_pos <= query_pos
    if attrs["window"] > 0:
        visible &= key_pos > query_pos - attrs["window"]
    out = np.empty_like(q)
    for h in range(heads):
        scores = (q[:, h, :] @ k[h // group].T) * np.float32(attrs["scale"])
        scores = np.where(visible, scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[:, h, :] = (scores / scores.sum(axis=-1, keepdims=True)) @ v[h // group]
    return out
