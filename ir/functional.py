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


def _record(op: str, *inputs: Tensor, **attrs):
    return active_tracer().record(op, list(inputs), attrs)


def embedding(ids: Tensor, table: Tensor) -> Tensor:
    return _record("embedding", ids, table)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _record("rms_norm", x, weight, eps=float(eps))


def matmul(x: Tensor, weight: Tensor) -> Tensor:
    """x · weightᵀ: x [S, in], weight [out, in] (HF's layout) -> [S, out]."""
    return _record("matmul", x, weight)


def silu(x: Tensor) -> Tensor:
    return _record("silu", x)


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
