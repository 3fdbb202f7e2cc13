"""Mixtral (a sparse mixture of experts) as a plugin, written only with minitorch-infer's public API.

    minitorch-infer generate --plugin examples/architectures/mixtral.py \
        -m tests/fixtures/extensions/mixtral_tiny -p "Hi"

Attention is Mistral's (the llama module's attention_block, reused). The MLP is replaced by N SwiGLU
experts and a router: each token goes to its top-k experts (Mixtral: k = 2), and their outputs are summed,
weighted by the router's softmax renormalised over the chosen k. Three new ops make the routing a visible
part of the graph, each with a reference and a NumPy kernel:

    router = matmul(h, @layers.i.moe.router)               [S, E]     router logits
    weights, experts = moe_route(router, k=2)             [S, k] f32, [S, k] i32
    gate = matmul_id(h, @layers.i.moe.gate, experts)       [S, k, F]  row (s, j) = h[s] · gate[experts[s, j]]ᵀ
    up   = matmul_id(h, @layers.i.moe.up, experts)         [S, k, F]
    down = matmul_id(silu(gate) * up, @layers.i.moe.down, experts)   [S, k, D]
    out  = moe_combine(down, weights)                     [S, D]     Σ_j weights[s, j] · down[s, j]

matmul_id (llama.cpp's mul_mat_id) computes only the rows routed to each expert: a decode step reads the
weights of its k experts and no others. The pass `fuse_expert_gate_up` (in this plugin's default pipeline)
is fuse_gate_up inside the experts: one matmul_id on [gate; up] packed per expert (a derived param) and one
swiglu. Expert weights are stacked at load: gate and up [E, F, D], down [E, D, F].
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from minitorch_infer.architectures import llama, register_architecture
from minitorch_infer.backends import numpy as numpy_backend, reference
from minitorch_infer.config import ModelConfig
from minitorch_infer.errors import GraphError, ModelFormatError
from minitorch_infer.formats.weights import canonical_name
from minitorch_infer.ir import TensorType, functional as F, register_op
from minitorch_infer.passes import DEFAULT_PASSES, P, derive_param, register_pass, rewrite

# --- the ops: schema and shape inference -----------------------------------------------------------------


@register_op("moe_route", attrs={"k": int}, n_inputs=1)
def _moe_route(ts, attrs):
    """Router logits [S, E] -> (weights f32[S, k], experts i32[S, k]): softmax over the E experts, the k most
    likely (best first), their probabilities renormalised to sum to 1."""
    (logits,) = ts
    if logits.rank != 2 or not 0 < attrs["k"] <= logits.shape[1]:
        raise GraphError(f"moe_route: needs logits [S, E] with 0 < k <= E, got {logits} and k={attrs['k']}")
    rows = logits.shape[0]
    return [TensorType((rows, attrs["k"]), "f32"), TensorType((rows, attrs["k"]), "i32")]


@register_op("matmul_id", n_inputs=3)
def _matmul_id(ts, attrs):
    """x [S, K] (the same row for each of the k slots) or [S, k, K], times the transpose of the expert each
    slot names: w [E, N, K], experts i32[S, k] -> [S, k, N]."""
    x, w, experts = ts
    if w.rank != 3 or experts.rank != 2 or experts.dtype != "i32" or x.shape[-1] != w.shape[2] \
            or x.shape[0] != experts.shape[0] or (x.rank == 3 and x.shape[1] != experts.shape[1]) \
            or x.rank not in (2, 3):
        raise GraphError(f"matmul_id: needs x [S, K] or [S, k, K], w [E, N, K], experts i32[S, k]; got {x}, {w}, "
                         f"{experts}")
    return [TensorType((x.shape[0], experts.shape[1], w.shape[1]), x.dtype)]


@register_op("moe_combine", n_inputs=2)
def _moe_combine(ts, attrs):
    """Each token's k expert outputs y [S, k, D] summed with its routing weights [S, k] -> [S, D]."""
    y, weights = ts
    if y.rank != 3 or weights.shape != y.shape[:2]:
        raise GraphError(f"moe_combine: needs y [S, k, D] and weights [S, k], got {y}, {weights}")
    return [TensorType((y.shape[0], y.shape[2]), y.dtype)]


# --- reference kernels: plain, allocating, obviously right ----------------------------------------------


@reference.kernel("moe_route")
def _moe_route_reference(args, attrs, step):
    (logits,) = args
    probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    experts = np.argsort(-probabilities, axis=-1, kind="stable")[:, :attrs["k"]]
    chosen = np.take_along_axis(probabilities, experts, axis=-1)
    return (chosen / chosen.sum(axis=-1, keepdims=True)).astype(np.float32), experts.astype(np.int32)


@reference.kernel("matmul_id")
def _matmul_id_reference(args, attrs, step):
    x, w, experts = args
    rows, k = experts.shape
    out = np.empty((rows, k, w.shape[1]), np.float32)
    for s in range(rows):
        for j in range(k):
            out[s, j] = w[experts[s, j]] @ (x[s] if x.ndim == 2 else x[s, j])
    return out


@reference.kernel("moe_combine")
def _moe_combine_reference(args, attrs, step):
    y, weights = args
    return (y * weights[:, :, None]).sum(axis=1).astype(np.float32)


# --- NumPy kernels: bound once to their buffers, writing with out= ---------------------------------------


@numpy_backend.kernel("moe_route")
def _moe_route_numpy(node, ins, outs, scratch, step):
    (logits,), (weights, experts) = ins, outs
    k = node.attrs["k"]
    rows = np.arange(logits.shape[0])[:, None]

    # softmax is monotonic: the top-k of the logits are the top-k of the probabilities, and the renormalised
    # weights are a softmax over the chosen logits alone
    def call():
        order = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        experts[...] = order
        np.subtract(logits[rows, order], logits[rows, order[:, :1]], out=weights)
        np.exp(weights, out=weights)
        np.divide(weights, weights.sum(axis=-1, keepdims=True), out=weights)

    if logits.shape[0] > 1:
        return call
    row, weight_row, expert_row = logits[0], weights[0], experts[0]

    def one_token():                    # decode: the same on one row, with half the NumPy calls' overhead
        order = (-row).argsort(kind="stable")[:k]
        expert_row[:] = order
        np.subtract(row[order], row[order[0]], out=weight_row)
        np.exp(weight_row, out=weight_row)
        np.divide(weight_row, weight_row.sum(), out=weight_row)
    return one_token


@numpy_backend.kernel("matmul_id")
def _matmul_id_numpy(node, ins, outs, scratch, step):
    x, w, experts = ins
    (y,) = outs
    rows, k = experts.shape
    if rows == 1:
        # decode: k matrix-vector products, reading only the chosen experts' weights
        rows_of_x = [x[0]] * k if x.ndim == 2 else [x[0, j] for j in range(k)]
        slots = [y[0, j] for j in range(k)]

        def one_token():
            for j in range(k):
                np.dot(w[experts[0, j]], rows_of_x[j], out=slots[j])
        return one_token
    y_rows = y.reshape(rows * k, -1)
    x_rows = x.reshape(rows * k, -1) if x.ndim == 3 else x

    def by_expert():
        # each expert once, on the rows routed to it (a gather, one product, a scatter)
        flat = experts.reshape(-1)
        for expert in np.unique(flat):
            slots = np.flatnonzero(flat == expert)
            y_rows[slots] = x_rows[slots if x.ndim == 3 else slots // k] @ w[expert].T
    return by_expert


@numpy_backend.kernel("moe_combine")
def _moe_combine_numpy(node, ins, outs, scratch, step):
    (y, weights), (out,) = ins, outs
    # [S, 1, k] · [S, k, D] -> [S, 1, D]: one batched product
    return lambda: np.matmul(weights[:, None, :], y, out=out[:, None, :])


# --- a fusion inside the experts --------------------------------------------------------------------------

h, experts = P.var("h"), P.var("experts")
EXPERT_SWIGLU = P("mul", P("silu", P("matmul_id", h, P.param("gate"), experts)),
                  P("matmul_id", h, P.param("up"), experts))


@register_pass("fuse_expert_gate_up")
def fuse_expert_gate_up(graph, ctx):
    """mul(silu(matmul_id(h, gate, e)), matmul_id(h, up, e)) -> swiglu(matmul_id(h, [gate; up], e)): one expert
    product instead of two. The packed [E, 2F, D] weight is derived (each expert's gate rows, then its up rows)."""
    def build(m):
        gate, up = m["gate"], m["up"]
        count, width, inner = gate.type.shape
        packed = derive_param(graph, ctx, f"{gate.name}+up", (count, 2 * width, inner),
                              lambda weights: np.concatenate([weights[gate.name], weights[up.name]], axis=1))
        return m.insert("swiglu", m.insert("matmul_id", m["h"], packed, m["experts"]))

    return rewrite(graph, EXPERT_SWIGLU, build)


# --- the architecture -------------------------------------------------------------------------------------


def mixtral_config(raw: dict, source: str) -> ModelConfig:
    """Mistral's fields (read by the built-in reader), with the expert counts kept in `raw`."""
    for key in ("num_local_experts", "num_experts_per_tok"):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelFormatError(f"{source}: field {key!r} = {value!r} must be a positive integer")
    if raw["num_experts_per_tok"] > raw["num_local_experts"]:
        raise ModelFormatError(f"{source}: num_experts_per_tok = {raw['num_experts_per_tok']} exceeds "
                               f"num_local_experts = {raw['num_local_experts']}")
    config = ModelConfig.from_dict({**raw, "architectures": ["MistralForCausalLM"]}, source)
    return replace(config, architecture="MixtralForCausalLM")


EXPERT_TENSOR = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.(?:gate|experts\.(\d+)\.(w[123]))\.weight")
EXPERT_PARTS = {"w1": "gate", "w3": "up", "w2": "down"}     # Mixtral's names for SwiGLU's three matrices


def mixtral_tensor_name(name: str) -> str | None:
    """Attention and norms as Llama's; block_sparse_moe.gate -> layers.i.moe.router; experts.e.w1 ->
    layers.i.moe.gate.e (stacked into layers.i.moe.gate by stack_experts)."""
    match = EXPERT_TENSOR.fullmatch(name)
    if not match:
        return canonical_name(name)
    layer, expert, part = match.groups()
    return f"layers.{layer}.moe.router" if expert is None else f"layers.{layer}.moe.{EXPERT_PARTS[part]}.{expert}"


def prepare_mixtral(config: ModelConfig, weights) -> None:
    """Stack each layer's experts into one [E, ...] param per matrix, then Llama's q/k row order for RoPE."""
    for i in range(config.num_layers):
        for part in EXPERT_PARTS.values():
            names = [f"layers.{i}.moe.{part}.{e}" for e in range(config.raw["num_local_experts"])]
            if all(name in weights for name in names):
                weights.add(f"layers.{i}.moe.{part}", np.stack([weights.remove(name) for name in names]))
    llama.rope_pair_order(config, weights)


@register_architecture("MixtralForCausalLM", config=mixtral_config, tensor_name=mixtral_tensor_name,
                       prepare_weights=prepare_mixtral, family="mixtral",
                       passes=(*DEFAULT_PASSES[:-1], "fuse_expert_gate_up", DEFAULT_PASSES[-1]))
def mixtral(tokens, positions, *, config, total, sequences, cache_slots, all_logits):
    c = config
    x = F.embedding(tokens, F.param("embed", (c.vocab_size, c.hidden_size)))                 # [S, D]
    rotation = F.rope_table(positions, c.head_dim, c.rope_theta, c.rope_scaling)
    for i in range(c.num_layers):
        with F.scope(f"layers.{i}", layer=i):
            x = x + llama.attention_block(x, rotation, c, i, total, cache_slots)
            x = x + moe_block(x, c, i)
    if not all_logits:
        x = F.last_row(x, sequences)
    x = F.rms_norm(x, F.param("norm", (c.hidden_size,)), c.rms_norm_eps)
    head = "embed" if c.tie_word_embeddings else "lm_head"
    return F.matmul(x, F.param(head, (c.vocab_size, c.hidden_size)))


def moe_block(x, c: ModelConfig, i: int):
    count, k = c.raw["num_local_experts"], c.raw["num_experts_per_tok"]
    width, hidden = c.intermediate_size, c.hidden_size
    with F.scope("moe"):
        h = F.rms_norm(x, F.param(f"layers.{i}.mlp_norm", (hidden,)), c.rms_norm_eps)
        router = F.matmul(h, F.param(f"layers.{i}.moe.router", (count, hidden)))                     # [S, E]
        weights, experts = F.node("moe_route", router, k=k)                                        # [S, k] each
        gate = F.node("matmul_id", h, F.param(f"layers.{i}.moe.gate", (count, width, hidden)), experts)   # [S, k, F]
        up = F.node("matmul_id", h, F.param(f"layers.{i}.moe.up", (count, width, hidden)), experts)
        down = F.node("matmul_id", F.silu(gate) * up, F.param(f"layers.{i}.moe.down", (count, hidden, width)),
                      experts)                                                                       # [S, k, D]
        return F.node("moe_combine", down, weights)                                                  # [S, D]
