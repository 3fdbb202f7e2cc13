"""fuse_gate_up: SwiGLU as one matmul on packed [gate; up] weights and one `swiglu` op.

    before                                  after

            h                                       h
       ┌────┴────┐                                  │
       ▼         ▼                        matmul(h, @mlp.gate+up)     [S, 2F]
    matmul     matmul                               │
    @gate       @up                                 ▼
       │         │                              swiglu              silu(left half) * right half
       ▼         │                                  │
     silu        │                                  ▼
       └──► mul ◄┘                                 out                [S, F]
             │
             ▼
            out

One matrix product instead of two, and the silu and product in one pass over memory with no [S, F]
temporaries for the gate and up halves.
"""

from __future__ import annotations

from ..ir import Graph, Value
from .manager import PassContext, PassResult, register_pass
from .packing import pack_params
from .pattern import Match, P, rewrite

h = P.var("h")
SWIGLU = P("mul", P("silu", P("matmul", h, P.param("gate"))), P("matmul", h, P.param("up")))


@register_pass("fuse_gate_up")
def fuse_gate_up(graph: Graph, ctx: PassContext) -> PassResult:
    def build(m: Match) -> Value | None:
        # mul needs equal shapes and both matmuls read h, so the two weights stack into one if of one type.
        if m["gate"].type.dtype != m["up"].type.dtype:
            return m.decline("gate and up weights are of different types")
        gate_up = m.insert("matmul", m["h"], pack_params(graph, ctx.weights, [m["gate"], m["up"]]))
        return m.insert("swiglu", gate_up)

    return rewrite(graph, SWIGLU, build)
