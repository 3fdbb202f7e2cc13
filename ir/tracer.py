"""Tracing: run a plain Python architecture function on Tensor handles and record the ops it calls.

Python control flow runs at trace time (layer loops unroll); anything that would need a tensor's *value*
(`if x:`, `len(x)`, `float(x)`, iterating) raises TraceError, because a graph cannot branch on data.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

from ..errors import TraceError
from .graph import Graph, Value
from .types import TensorType

_IR_DIR = os.path.dirname(os.path.abspath(__file__))
_active: ContextVar[Tracer | None] = ContextVar("active_tracer", default=None)


class Tensor:
    """A handle on a graph Value while tracing; arithmetic on it records nodes."""

    __slots__ = ("value", "tracer")

    def __init__(self, value: Value, tracer: Tracer):
        self.value = value
        self.tracer = tracer

    @property
    def shape(self):
        return self.value.type.shape

    @property
    def dtype(self) -> str:
        return self.value.type.dtype

    def reshape(self, *shape) -> Tensor:
        return self.tracer.record("reshape", [self], {"shape": tuple(shape)})

    def __add__(self, other: Tensor | float) -> Tensor:
        return self.tracer.record("add", [self, self._operand(other)])

    def __mul__(self, other: Tensor | float) -> Tensor:
        return self.tracer.record("mul", [self, self._operand(other)])

    def __sub__(self, other: Tensor | float) -> Tensor:
        return self.tracer.record("sub", [self, self._operand(other)])

    def __truediv__(self, other: Tensor | float) -> Tensor:
        return self.tracer.record("div", [self, self._operand(other)])

    # A number on the left: 0.5 * x and 1 + x are x * 0.5 and x + 1 (the broadcast operand goes second).
    __radd__ = __add__
    __rmul__ = __mul__

    def _operand(self, other: Tensor | float) -> Tensor:
        """A Python number becomes a float32 constant node."""
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return self.tracer.record("constant", [], {"value": float(other)})
        return other

    def _data_dependent(self, *_args, **_kwargs):
        raise TraceError(
            f"{self.value.ref} : {self.value.type} is a traced tensor; its value is unknown while tracing, so it "
            "cannot drive Python control flow (if/while/len/iteration/float). Use graph ops instead."
        )

    __bool__ = __len__ = __iter__ = __int__ = __float__ = __index__ = __array__ = _data_dependent

    def __repr__(self) -> str:
        return f"Tensor({self.value.ref} : {self.value.type})"


class Tracer:
    def __init__(self, name: str = "graph"):
        self.graph = Graph(name)
        self._scope: list[str] = []
        self._layer: int | None = None

    def __enter__(self) -> Tracer:
        self._token = _active.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.reset(self._token)

    def input(self, name: str, type: TensorType) -> Tensor:
        for sym in type.symbols:
            self.graph.symbol(sym.name, sym.max)
        return Tensor(self.graph.add_input(name, type), self)

    def param(self, name: str, shape: tuple, dtype: str = "f32") -> Tensor:
        return Tensor(self.graph.param(name, TensorType(tuple(shape), dtype)), self)

    def state(self, name: str, shape: tuple, dtype: str = "f32") -> Tensor:
        return Tensor(self.graph.state(name, TensorType(tuple(shape), dtype)), self)

    @contextmanager
    def scope(self, name: str, layer: int | None = None) -> Iterator[None]:
        """Label the nodes recorded inside: meta["scope"] (e.g. "layers.3.mlp") and meta["layer"]."""
        outer_layer = self._layer
        self._scope.append(name)
        if layer is not None:
            self._layer = layer
        try:
            yield
        finally:
            self._scope.pop()
            self._layer = outer_layer

    def record(self, op: str, inputs: list[Tensor], attrs: dict[str, Any] | None = None):
        values = []
        for item in inputs:
            if not isinstance(item, Tensor):
                raise TraceError(f"{op}: argument {item!r} is not a traced tensor (a Python number becomes a "
                                 "constant; an array must be a param)")
            values.append(item.value)
        meta = {"scope": ".".join(self._scope), "source": _caller_line()}
        if self._layer is not None:
            meta["layer"] = self._layer
        node = self.graph.create_node(op, values, attrs or {}, meta)
        handles = tuple(Tensor(v, self) for v in node.outputs)
        return handles[0] if len(handles) == 1 else handles


def active_tracer() -> Tracer:
    tracer = _active.get()
    if tracer is None:
        raise TraceError("no active trace: call graph ops inside ir.trace(...)")
    return tracer


def trace(fn: Callable[..., Any], inputs: dict[str, TensorType], name: str = "graph", **kwargs) -> Graph:
    """Call fn(**input_tensors, **kwargs) under a tracer; its return value(s) become the graph outputs."""
    with Tracer(name) as tracer:
        handles = {input_name: tracer.input(input_name, type) for input_name, type in inputs.items()}
        result = fn(**handles, **kwargs)
    results = result if isinstance(result, (tuple, list)) else [result]
    for item in results:
        if not isinstance(item, Tensor):
            raise TraceError(f"{getattr(fn, '__name__', fn)} returned {item!r}, not a traced tensor")
    tracer.graph.set_outputs(item.value for item in results)
    return tracer.graph


def _caller_line() -> str:
    """file:line of the architecture code that recorded the op (the first frame outside ir/)."""
    frame = sys._getframe(2)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _IR_DIR:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
