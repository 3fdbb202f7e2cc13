"""Graph ops as plain functions, for architecture code: `x = F.matmul(F.rms_norm(x, w, eps), wq)`.

Each call records one node in the active trace (see ir.tracer) and returns Tensor handles.
"""

from __future__ import annotations

from .tracer import Tensor, active_tracer
from .types import Sym


def param(name: str, shape: tuple, dtype: str = "f32") -> Tensor:
    """A weight, by its canonical name; the array itself lives in the WeightStore."""
    return active_tracer().param(name, shape, dtype)


def state(name: str, shape: tuple) -> Tensor:
    """Persistent memory owned outside the graph (the KV cache)."""
    return active_tracer().state(name, shape)


def scope(name: str, layer: int | None = None):
    """`with F.scope("layers.3", layer=3):` labels the nodes recorded inside (their meta, the dot drawing's
    clusters, --fold-layers)."""
    return active_tracer().scope(name, layer)


def node(op: str, *inputs: Tensor, **attrs):
    """Record one node of any registered op (your own included, see ir.ops.register_op): its output Tensor,
    or a tuple of them for an op with several outputs. `F.node("gelu", x, approximate="tanh")` is `F.gelu(x,
    "tanh")`."""
    return active_tracer().record(op, list(inputs), attrs)


def embedding(ids: Tensor, table: Tensor) -> Tensor:
    """Rows of table [V, D] picked by ids i32[S] -> [S, D] (token embeddings; GPT-2's learned positions too)."""
    return node("embedding", ids, table)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x², last axis) + eps) * weight; x [..., D], weight [D]."""
    return node("rms_norm", x, weight, eps=float(eps))


def matmul(x: Tensor, weight: Tensor) -> Tensor:
    """x · weightᵀ: x [S, in], weight [out, in] (HF's layout) -> [S, out]."""
    return node("matmul", x, weight)


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x), elementwise."""
    return node("silu", x)


def constant(value: float) -> Tensor:
    """A float32 scalar, broadcast by add, sub, mul and div (`x * 0.5` makes one for you)."""
    return node("constant", value=float(value))


def exp(x: Tensor) -> Tensor:
    """e to the power x, elementwise."""
    return node("exp", x)


def tanh(x: Tensor) -> Tensor:
    """tanh(x), elementwise."""
    return node("tanh", x)


def softmax(x: Tensor) -> Tensor:
    """Softmax over the last axis."""
    return node("softmax", x)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU: exact ("none", with erf) or the tanh form GPT-2 uses ("tanh")."""
    return node("gelu", x, approximate=approximate)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis; x [..., D], weight and bias [D]."""
    return node("layer_norm", x, weight, bias, eps=float(eps))


def transpose(x: Tensor, perm: tuple) -> Tensor:
    """x with its axes permuted, as numpy.transpose(x, perm); a copy, not a view."""
    return node("transpose", x, perm=tuple(int(axis) for axis in perm))


def slice_cols(x: Tensor, start: int, stop: int) -> Tensor:
    """Columns start:stop of x [S, N], a view (no copy): splits a fused q|k|v product, as GPT-2's c_attn."""
    return node("slice_cols", x, start=int(start), stop=int(stop))


def last_row(x: Tensor, rows: Sym) -> Tensor:
    """Each sequence's newest row: [S, ...] -> [R, ...] with `rows` = R, the sequences in a step."""
    return node("last_row", x, rows=rows)


def rope_table(positions: Tensor, head_dim: int, theta: float, scaling: tuple = ()) -> Tensor:
    """Each position's rotary (cos, sin) pairs [S, head_dim], shared by every layer's `rope`; `scaling` is
    ModelConfig.rope_scaling."""
    return node("rope_table", positions, head_dim=head_dim, theta=float(theta), scaling=scaling)


def rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate each adjacent pair of x [S, H, head_dim] by its position's angle from `rope_table` (weights'
    rows in pair order: architectures.llama.rope_pair_order)."""
    return node("rope", x, table)


def kv_write(x: Tensor, cache: Tensor, total: Sym) -> Tensor:
    """Store the step's keys or values x [S, Hkv, hd] into the KV pool `cache` (an F.state [Hkv, slots, hd]);
    the result stands for each sequence's keys or values [Hkv, T, hd], what `attention` reads. total = T."""
    return node("kv_write", x, cache, total=total)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int = 0) -> Tensor:
    """Causal softmax(q·kᵀ·scale)·v: q [S, Hq, hd] over each sequence's k, v [Hkv, T, hd] from kv_write
    (grouped-query when Hq > Hkv) -> [S, Hq, hd]; window > 0 sees only the last `window` positions."""
    return node("attention", q, k, v, scale=float(scale), window=int(window), queries="all")
