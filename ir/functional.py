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
    return active_tracer().scope(name, layer)


def node(op: str, *inputs: Tensor, **attrs):
    """Record one node of any registered op (your own included, see ir.ops.register_op): its output Tensor,
    or a tuple of them for an op with several outputs. `F.node("gelu", x, approximate="tanh")` is `F.gelu(x,
    "tanh")`."""
    return active_tracer().record(op, list(inputs), attrs)


_record = node


def embedding(ids: Tensor, table: Tensor) -> Tensor:
    return _record("embedding", ids, table)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _record("rms_norm", x, weight, eps=float(eps))


def matmul(x: Tensor, weight: Tensor) -> Tensor:
    """x · weightᵀ: x [S, in], weight [out, in] (HF's layout) -> [S, out]."""
    return _record("matmul", x, weight)


def silu(x: Tensor) -> Tensor:
    return _record("silu", x)


def constant(value: float) -> Tensor:
    """A float32 scalar, broadcast by add, sub, mul and div (`x * 0.5` makes one for you)."""
    return _record("constant", value=float(value))


def exp(x: Tensor) -> Tensor:
    return _record("exp", x)


def tanh(x: Tensor) -> Tensor:
    return _record("tanh", x)


def softmax(x: Tensor) -> Tensor:
    """Softmax over the last axis."""
    return _record("softmax", x)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU: exact ("none", with erf) or the tanh form GPT-2 uses ("tanh")."""
    return _record("gelu", x, approximate=approximate)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return _record("layer_norm", x, weight, bias, eps=float(eps))


def transpose(x: Tensor, perm: tuple) -> Tensor:
    """x with its axes permuted, as numpy.transpose(x, perm); a copy, not a view."""
    return _record("transpose", x, perm=tuple(int(axis) for axis in perm))


def slice_cols(x: Tensor, start: int, stop: int) -> Tensor:
    """Columns start:stop of x [S, N], a view (no copy): splits a fused q|k|v product, as GPT-2's c_attn."""
    return _record("slice_cols", x, start=int(start), stop=int(stop))


def last_row(x: Tensor, rows: Sym) -> Tensor:
    """Each sequence's newest row: [S, ...] -> [R, ...] with `rows` = R, the sequences in a step."""
    return _record("last_row", x, rows=rows)


def rope_table(positions: Tensor, head_dim: int, theta: float, scaling: tuple = ()) -> Tensor:
    return _record("rope_table", positions, head_dim=head_dim, theta=float(theta), scaling=scaling)


def rope(x: Tensor, table: Tensor) -> Tensor:
    return _record("rope", x, table)


def kv_write(x: Tensor, cache: Tensor, total: Sym) -> Tensor:
    return _record("kv_write", x, cache, total=total)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int = 0) -> Tensor:
    return _record("attention", q, k, v, scale=float(scale), window=int(window), queries="all")
