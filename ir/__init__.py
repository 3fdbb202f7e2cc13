"""The op-graph IR: types with symbolic dims, Graph/Node/Value, the op registry, tracing, checks and printing."""

from . import functional
from .graph import Graph, Node, Value
from .ops import OPS, OpDef, op_def, register_op
from .tracer import Tensor, Tracer, trace
from .types import Sym, TensorType
from .verify import verify

__all__ = ["Graph", "Node", "Value", "OPS", "OpDef", "op_def", "register_op", "Tensor", "Tracer", "trace",
           "Sym", "TensorType", "verify", "functional"]
