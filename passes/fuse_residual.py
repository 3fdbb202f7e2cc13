"""fuse_residual: a matmul and the residual add after it become one `matmul_add` (C = A·Bᵀ + C).

    before                                  after

     x        residual                       x       residual
     │           │                           │          │
     ▼           │                           ▼          │
   matmul(x, @w) │                      matmul_add(x, @w, residual)  accumulates into residual's
     │           │                           │                      buffer when residual dies here
     └──► add ◄──┘                           ▼                      (BLAS gemm with beta = 1)
           │                                out
           ▼
          out

The product never needs a buffer of its own in the graph, and the add is in place. Either operand order
of the add matches; an add of a broadcast bias ([N] over [S, N]) is left alone, since it is no accumulator.
"""

from __future__ import annotations

from ..ir import Graph, Value
from .manager import PassContext, PassResult, register_pass
from .pattern import Match, P, rewrite

RESIDUAL = P("add", P.var("residual"), P("matmul", P.var("x"), P.var("w"), name="product"))


@register_pass("fuse_residual")
def fuse_residual(graph: Graph, ctx: PassContext) -> PassResult:
    def build(m: Match) -> Value | None:
        if m["residual"].type != m["product"].type:
            return m.decline("the other operand is broadcast (a bias), not an accumulator")
        return m.insert("matmul_add", m["x"], m["w"], m["residual"])

    return rewrite(graph, RESIDUAL, build)
