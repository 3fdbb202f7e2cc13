"""The op registry: every op declared once, with its attributes, shape/dtype inference and memory behaviour.

Backends register one kernel per op name; the verifier re-runs `infer` to check stored types. An op's
`inplace` names the input whose buffer the output may take over when that input dies at this node;
`view_of` names the input whose buffer the output *is* (a view, no copy); `workspace` gives the float32 scratch
elements a kernel needs while it runs (at the symbols' upper bounds), so the memory planner can place it like any other buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import GraphError
from .types import Sym, TensorType, symbolic_numel


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: Callable[[list[TensorType], dict[str, Any]], list[TensorType]]
    attrs: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    n_inputs: int | None = None
    inplace: int | None = None
    view_of: int | None = None
    side_effect: bool = False
    output_kinds: tuple[str, ...] | None = None
    workspace: Callable[[list[TensorType], dict[str, Any]], int] | None = None
    doc: str = ""


OPS: dict[str, OpDef] = {}


def register_op(name: str, *, attrs=None, n_inputs=None, inplace=None, view_of=None, side_effect=False,
                output_kinds=None, workspace=None):
    """Decorator: register `infer(input_types, attrs) -> [output types]` as the op `name`."""

    def decorate(infer):
        if name in OPS:
            raise GraphError(f"op {name!r} registered twice")
        OPS[name] = OpDef(name, infer, dict(attrs or {}), n_inputs, inplace, view_of, side_effect,
                          output_kinds, workspace, (infer.__doc__ or "").strip())
        return infer

    return decorate


def op_def(op: str) -> OpDef:
    if op not in OPS:
        raise GraphError(f"unknown op {op!r}; registered ops: {', '.join(sorted(OPS))}")
    return OPS[op]


def infer_types(node) -> list[tuple[TensorType, str]]:
    """Check a node's inputs and attributes against its op, and return (type, kind) for each output."""
    spec = op_def(node.op)
    if spec.n_inputs is not None and len(node.inputs) != spec.n_inputs:
        raise GraphError(f"{node.op} takes {spec.n_inputs} inputs, got {len(node.inputs)}")
    for attr, expected in spec.attrs.items():
        if attr not in node.attrs:
            raise GraphError(f"{node.op}: missing attribute {attr!r}")
        if not isinstance(node.attrs[attr], expected):
            raise GraphError(f"{node.op}: attribute {attr}={node.attrs[attr]!r} should be {expected}")
    unknown = set(node.attrs) - set(spec.attrs)
    if unknown:
        raise GraphError(f"{node.op}: unknown attributes {sorted(unknown)}")
    types = spec.infer([v.type for v in node.inputs], node.attrs)
    kinds = spec.output_kinds or ("temp",) * len(types)
    return list(zip(types, kinds))


def _fail(op: str, message: str, *types: TensorType):
    shown = ", ".join(str(t) for t in types)
    raise GraphError(f"{op}: {message} (inputs: {shown})")


def _expect_rank(op: str, t: TensorType, rank: int, what: str):
    if t.rank != rank:
        _fail(op, f"{what} must have rank {rank}", t)


def _expect_dtype(op: str, t: TensorType, dtype: str, what: str):
    if t.dtype != dtype:
        _fail(op, f"{what} must be {dtype}", t)


# --- the ops --------------------------------------------------------------------------------------

@register_op("embedding", n_inputs=2)
def _embedding(ts, attrs):
    """Rows of `table` [V, D] picked by integer `ids` [S] -> [S, D] (float32, also from a quantised table)."""
    ids, table = ts
    _expect_dtype("embedding", ids, "i32", "ids")
    _expect_rank("embedding", ids, 1, "ids")
    _expect_rank("embedding", table, 2, "table")
    return [TensorType((ids.shape[0], table.shape[1]), "f32" if table.is_quantized else table.dtype)]


@register_op("rms_norm", attrs={"eps": float}, n_inputs=2, inplace=0)
def _rms_norm(ts, attrs):
    """x / sqrt(mean(x^2, last axis) + eps) * weight."""
    x, weight = ts
    if weight.shape != x.shape[-1:]:
        _fail("rms_norm", "weight must match the last axis of x", x, weight)
    return [x]


# A float product with at most this many rows may run transposed (yᵀ = W·xᵀ, which OpenBLAS does up to 4x
# faster for a few rows): its workspace then holds xᵀ and the product's transpose.
TRANSPOSED_PRODUCT_ROWS = 32


def _matmul_workspace(ts, attrs) -> int:
    """Room for a few rows' float product done transposed (a quantised weight's kernels need none)."""
    x, w = ts
    if w.is_quantized:
        return 0
    (rows, k), n = x.concrete_shape(), w.concrete_shape()[0]
    return (k + n) * min(rows, TRANSPOSED_PRODUCT_ROWS) if rows > 1 else 0


@register_op("matmul", n_inputs=2, workspace=_matmul_workspace)
def _matmul(ts, attrs):
    """x [S, K] times the transpose of w [N, K] (weights keep the HF [out, in] layout) -> [S, N].

    w may be float32 or quantised (q8_0, q4_0, q4_1: blocks of 32 along K); the product is float32."""
    x, w = ts
    _expect_rank("matmul", x, 2, "x")
    _expect_rank("matmul", w, 2, "w")
    if x.shape[1] != w.shape[1]:
        _fail("matmul", "inner dimensions differ", x, w)
    return [TensorType((x.shape[0], w.shape[0]), x.dtype)]


def _matmul_add_workspace(ts, attrs) -> int:
    """Room for the product [S, N], or for xᵀ [K, S] and the product's transpose [N, S] (a backend's choice,
    for a float weight; a quantised weight's kernels add into the output and need none)."""
    if ts[1].is_quantized:
        return 0
    (rows, k), n = ts[0].concrete_shape(), ts[2].concrete_shape()[1]
    return (k + n) * rows


@register_op("matmul_add", n_inputs=3, inplace=2, workspace=_matmul_add_workspace)
def _matmul_add(ts, attrs):
    """x [S, K] · w[N, K]ᵀ + c [S, N], written over c's buffer when c dies here (the residual stream)."""
    x, w, c = ts
    (product,) = _matmul([x, w], {})
    if product.shape != c.shape:
        _fail("matmul_add", "the accumulator must have the product's shape", x, w, c)
    return [c]


def _broadcast_ok(a: TensorType, b: TensorType) -> bool:
    """b may be a trailing slice of a's shape (a bias over the last axis) or equal to it."""
    return b.rank <= a.rank and a.shape[a.rank - b.rank:] == b.shape


def _elementwise(name: str, doc: str):
    def infer(ts, attrs):
        a, b = ts
        if not _broadcast_ok(a, b):
            _fail(name, "second operand must equal the first's shape or its trailing axes", a, b)
        if a.dtype != b.dtype:
            _fail(name, "dtypes differ", a, b)
        return [a]

    infer.__doc__ = doc
    register_op(name, n_inputs=2, inplace=0)(infer)


_elementwise("add", "a + b, b broadcast over a's leading axes.")
_elementwise("mul", "a * b, b broadcast over a's leading axes.")
_elementwise("sub", "a - b, b broadcast over a's leading axes.")
_elementwise("div", "a / b, b broadcast over a's leading axes.")


@register_op("constant", attrs={"value": float}, n_inputs=0)
def _constant(ts, attrs):
    """A float32 scalar f32[] (rank 0), which elementwise ops broadcast: `x * 0.5` traces mul(x, constant)."""
    return [TensorType((), "f32")]


def _unary(name: str, doc: str, attrs=None):
    def infer(ts, attrs):
        return [ts[0]]

    infer.__doc__ = doc
    register_op(name, attrs=attrs, n_inputs=1)(infer)


_unary("exp", "e to the power x, elementwise.")
_unary("tanh", "tanh(x), elementwise.")
_unary("softmax", "softmax over the last axis: exp(x - max) / sum.")
GELU_FORMS = ("none", "tanh")


@register_op("gelu", attrs={"approximate": str}, n_inputs=1)
def _gelu(ts, attrs):
    """x * Φ(x) (approximate="none", with erf) or GPT-2's 0.5x(1 + tanh(√(2/π)(x + 0.044715x³))) ("tanh")."""
    if attrs["approximate"] not in GELU_FORMS:
        raise GraphError(f"gelu: approximate={attrs['approximate']!r} should be one of {GELU_FORMS}")
    return [ts[0]]


@register_op("layer_norm", attrs={"eps": float}, n_inputs=3, inplace=0)
def _layer_norm(ts, attrs):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis of x [..., D]; weight, bias [D]."""
    x, weight, bias = ts
    if weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        _fail("layer_norm", "weight and bias must be [D], D the last axis of x", x, weight, bias)
    return [x]


@register_op("transpose", attrs={"perm": tuple}, n_inputs=1)
def _transpose(ts, attrs):
    """x with its axes permuted (perm as numpy.transpose takes it), into a buffer of its own."""
    (x,) = ts
    perm = attrs["perm"]
    if sorted(perm) != list(range(x.rank)):
        _fail("transpose", f"perm {perm} is not a permutation of the {x.rank} axes", x)
    return [TensorType(tuple(x.shape[axis] for axis in perm), x.dtype)]


@register_op("silu", n_inputs=1)
def _silu(ts, attrs):
    """x * sigmoid(x)."""
    return [ts[0]]


@register_op("swiglu", n_inputs=1)
def _swiglu(ts, attrs):
    """silu(gate) * up, from one [..., 2F] tensor holding [gate | up] on its last axis -> [..., F] (rows [S, 2F],
    or a mixture of experts' [S, k, 2F])."""
    (gate_up,) = ts
    if gate_up.rank < 2:
        _fail("swiglu", "gate_up must have rank 2 or more", gate_up)
    width = gate_up.shape[-1]
    if not isinstance(width, int) or width % 2:
        _fail("swiglu", "the last axis must be an even number", gate_up)
    return [TensorType((*gate_up.shape[:-1], width // 2), gate_up.dtype)]


@register_op("reshape", attrs={"shape": tuple}, n_inputs=1, view_of=0)
def _reshape(ts, attrs):
    """The same elements in a new shape (a view, never a copy)."""
    (x,) = ts
    target = TensorType(attrs["shape"], x.dtype)
    if symbolic_numel(x.shape) != symbolic_numel(target.shape):
        _fail("reshape", f"cannot view as {target}", x)
    return [target]


@register_op("slice_cols", attrs={"start": int, "stop": int}, n_inputs=1, view_of=0)
def _slice_cols(ts, attrs):
    """Columns start:stop of x [S, N] (a strided view: used to split a packed q/k/v product)."""
    (x,) = ts
    _expect_rank("slice_cols", x, 2, "x")
    start, stop = attrs["start"], attrs["stop"]
    if not (0 <= start < stop <= x.shape[1]):
        _fail("slice_cols", f"columns {start}:{stop} out of range", x)
    return [TensorType((x.shape[0], stop - start), x.dtype)]


@register_op("last_row", attrs={"rows": Sym}, n_inputs=1)
def _last_row(ts, attrs):
    """Each sequence's newest row of x [S, ...] -> [R, ...], R = sequences in the step (the StepLayout says
    which rows those are): while generating, only the newest position of each sequence needs logits."""
    (x,) = ts
    if x.rank < 1:
        _fail("last_row", "x needs a rows axis", x)
    return [TensorType((attrs["rows"], *x.shape[1:]), x.dtype)]


ROPE_ATTRS = {"head_dim": int, "theta": float, "scaling": tuple}


@register_op("rope_table", attrs=ROPE_ATTRS, n_inputs=1)
def _rope_table(ts, attrs):
    """Each position's rotation [S, head_dim] as (cos, sin) pairs: [cos θ0, sin θ0, cos θ1, sin θ1, ...].

    Computed once per step and shared by all layers. `scaling` is the config's rope_scaling as sorted
    (key, value) pairs; () means none.
    """
    (positions,) = ts
    _expect_dtype("rope_table", positions, "i32", "positions")
    _expect_rank("rope_table", positions, 1, "positions")
    return [TensorType((positions.shape[0], attrs["head_dim"]), "f32")]


@register_op("rope", n_inputs=2, inplace=0)
def _rope(ts, attrs):
    """Rotate each adjacent pair (x[2i], x[2i+1]) of x [S, H, D] by angle θi of its position (rope_table).

    Adjacent pairs are llama.cpp's layout; HF's checkpoints rotate dimension i with i + D/2 instead, so the
    loader reorders q/k weight rows into pairs (q·k, and so attention, is unchanged by a shared reordering).
    """
    x, table = ts
    _expect_rank("rope", x, 3, "x")
    if table.shape != (x.shape[0], x.shape[2]):
        _fail("rope", "the rotation table must be [S, head_dim]", x, table)
    return [x]


@register_op("kv_write", n_inputs=2, side_effect=True, output_kinds=("state",), attrs={"total": Sym})
def _kv_write(ts, attrs):
    """Store new keys or values x [S, H, D] into the KV pool [H, C, D] at the slots the StepLayout gives each row
    (its sequence's positions T-n..T-1); the result stands for each sequence's keys or values [H, T, D]."""
    x, cache = ts
    _expect_rank("kv_write", x, 3, "x")
    _expect_rank("kv_write", cache, 3, "cache")
    if (x.shape[1], x.shape[2]) != (cache.shape[0], cache.shape[2]):
        _fail("kv_write", "heads and head_dim must match the cache", x, cache)
    return [TensorType((cache.shape[0], attrs["total"], cache.shape[2]), cache.dtype)]


def _attention_workspace(ts, attrs) -> int:
    """Scores [Hq, S, T], the regrouped queries and output (head_dim each), each row's max and sum, and room to
    gather one sequence's keys and values [Hkv, T, D] when its blocks are not one run of the pool."""
    q, k, _ = ts
    seq, heads, head_dim = q.concrete_shape()
    kv_heads, total, _ = k.concrete_shape()
    return heads * (seq * total + seq * (2 * head_dim + 2)) + 2 * kv_heads * total * head_dim


ATTENTION_QUERIES = ("all", "last")


@register_op("attention", attrs={"scale": float, "window": int, "queries": str}, n_inputs=3,
             workspace=_attention_workspace)
def _attention(ts, attrs):
    """Causal softmax(q·kᵀ·scale)·v for q [S, Hq, D] over each sequence's cached k, v [Hkv, T, D]
    (grouped-query when Hq > Hkv).

    With queries="all", q holds every new row of the step, and a sequence's query i of n sits at position
    T-n+i; with queries="last" (after prune_rows), q [R, Hq, D] holds each sequence's newest row only. A query
    sees keys j <= its position; window > 0 also drops keys more than window-1 positions back (Mistral's
    sliding window).
    """
    if attrs["queries"] not in ATTENTION_QUERIES:
        raise GraphError(f"attention: queries={attrs['queries']!r} should be one of {ATTENTION_QUERIES}")
    q, k, v = ts
    for t, what in ((q, "q"), (k, "k"), (v, "v")):
        _expect_rank("attention", t, 3, what)
    if k.shape != v.shape:
        _fail("attention", "k and v must have the same shape", q, k, v)
    heads, kv_heads = q.shape[1], k.shape[0]
    if q.shape[2] != k.shape[2] or heads % kv_heads:
        _fail("attention", "head_dim must match and query heads be a multiple of kv heads", q, k, v)
    return [q]
