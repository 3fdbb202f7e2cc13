"""quantize_weights: give every param the weight type asked for, converting the stored weights to it.

    @layers.0.mlp.down : f32[576, 1536]     ->     @layers.0.mlp.down : q4_1[576, 1536]

`quantize_weights("q8_0")` (or q4_0, q4_1) quantises the weights the graph multiplies by (matmul and
matmul_add's weight operand, and so a tied embedding table) with ggml's rounding; "f32" dequantises
whatever is stored quantised; "native" (the registered `quantize_weights`) converts nothing and gives each
param the type of its stored weight, as a GGUF file holds it. Params read by ops that take only float32,
and matrices whose rows are not whole blocks of 32, stay float32 (counted in the notes as left alone).

The pass is lossy by design, so `check_pass` compares the quantised graph with the float graph running on
the dequantised weights (the reference backend reads a quantised weight as its dequantised values).
Model.compile runs it first, whatever the other passes: the graph must declare the types the weights have.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..errors import MinitorchError
from ..ir import Graph, TensorType
from ..quantized import BLOCK_TYPES, WEIGHT_TYPES, quantize, weight_type
from .manager import PassContext, PassFunction, PassResult, register_pass

TARGETS = (*WEIGHT_TYPES, "native")
# The ops that read a quantised weight directly, and at which input.
QUANTIZED_INPUTS = {("matmul", 1), ("matmul_add", 1), ("embedding", 1)}
MULTIPLIED = {("matmul", 1), ("matmul_add", 1)}


def quantize_weights(target: str) -> PassFunction:
    """The pass converting weights to `target`: "f32", "q8_0", "q4_0", "q4_1" or "native" (keep stored types)."""
    if target not in TARGETS:
        raise MinitorchError(f"unknown weight type {target!r}; known: {', '.join(TARGETS)}")

    def run(graph: Graph, ctx: PassContext) -> PassResult:
        converted, typed, left_alone = Counter(), Counter(), Counter()
        for name, param in graph.params.items():
            stored = ctx.weights[name] if ctx.weights is not None and name in ctx.weights else None
            uses = {(user.op, i) for user in param.users for i, v in enumerate(user.inputs) if v is param}
            wanted, reason = _wanted_type(target, param.type, None if stored is None else weight_type(stored), uses)
            if reason:
                left_alone[reason] += 1
            if stored is not None and weight_type(stored) != wanted:
                _store(ctx.weights, name, _convert(stored, wanted))
                converted[f"{weight_type(stored)} -> {wanted}"] += 1
            if param.type.dtype != wanted:
                param.type = TensorType(param.type.shape, wanted)
                typed[wanted] += 1
        notes = {"converted": dict(converted), "typed": dict(typed), "left alone": dict(left_alone)}
        return PassResult(graph, sum(typed.values()), notes)

    run.pass_name = "quantize_weights" if target == "native" else f"quantize_weights({target})"
    return run


def _wanted_type(target: str, declared: TensorType, stored: str | None, uses: set[tuple[str, int]]
                 ) -> tuple[str, str]:
    """The type a param should have, and why it is not the one asked for ("" when it is). `stored` is the
    stored weight's type; None without weights (planning a synthetic graph), when the declared type stands."""
    current = stored or declared.dtype
    if not uses:
        return current, ""
    if not uses <= QUANTIZED_INPUTS:                 # norms, biases, ...: float32, dequantised if need be
        return "f32", "read by an op that takes float32" if current in BLOCK_TYPES else ""
    if target == "native" or (target != "f32" and not uses & MULTIPLIED):
        return current, ""                           # as stored: natively, or a table only looked up
    if target == "f32":
        return "f32", ""
    if declared.shape[1] % 32:
        return "f32", f"rows of {declared.shape[1]} values are not whole blocks of 32"
    return target, ""


def _convert(weight: Any, wanted: str) -> Any:
    if wanted == "f32":
        return weight.dequantize()
    return quantize(weight, wanted)            # a quantised weight is widened a few rows at a time


def _store(weights: Any, name: str, weight: Any) -> None:
    if hasattr(weights, "replace"):
        weights.replace(name, weight)          # a WeightStore: same name, checked shape
    else:
        weights[name] = weight


register_pass("quantize_weights")(quantize_weights("native"))
