"""Architecture functions, and tracing one into a Graph for a given context length and prefill chunk."""

from __future__ import annotations

from ..ir import Graph, Sym, TensorType, trace
from ..config import ARCHITECTURES, ModelConfig
from .llama import llama, rope_pair_order

__all__ = ["build_graph", "rope_pair_order", "ARCHITECTURE_FUNCTIONS"]

# Every supported HF architecture is a member of the Llama family; config fields select the variant.
ARCHITECTURE_FUNCTIONS = {family: llama for family in set(ARCHITECTURES.values())}


def build_graph(config: ModelConfig, context: int, prefill_chunk: int, all_logits: bool = False,
                cache_slots: int | None = None, max_sequences: int = 1) -> Graph:
    """Trace the model: inputs tokens and positions [S], output logits [S or R, vocab]; S <= prefill_chunk
    new tokens per step, T <= context positions per sequence, R <= max_sequences sequences per step, and a
    KV pool of cache_slots positions (default: one context's worth)."""
    new_tokens = Sym("S", prefill_chunk)
    total = Sym("T", context)
    sequences = Sym("R", min(max_sequences, prefill_chunk))
    inputs = {"tokens": TensorType((new_tokens,), "i32"), "positions": TensorType((new_tokens,), "i32")}
    function = ARCHITECTURE_FUNCTIONS[ARCHITECTURES[config.architecture]]
    name = f"{ARCHITECTURES[config.architecture]}_{'all' if all_logits else 'last'}_logits"
    return trace(function, inputs, name=name, config=config, total=total, sequences=sequences,
                 cache_slots=cache_slots or context, all_logits=all_logits)
