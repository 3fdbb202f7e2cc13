"""Architectures: the registry of graph functions by HF architecture name, and tracing one into a Graph for a
given context length and prefill chunk.

The Llama family lives in the `llama` module (`from minitorch_infer.architectures import llama` is that
module); other families register themselves with `register_architecture` (see registry.py and
docs/extending.md).
"""

from __future__ import annotations

from ..config import ARCHITECTURES as LLAMA_FAMILY, ModelConfig
from ..ir import Graph, Sym, TensorType, trace
from . import llama
from .registry import ARCHITECTURES, Architecture, architecture, read_config, register_architecture

__all__ = ["build_graph", "register_architecture", "architecture", "read_config", "Architecture", "ARCHITECTURES",
           "llama"]

# Every built-in HF architecture is a member of the Llama family; config fields select the variant.
for _name, _family in LLAMA_FAMILY.items():
    register_architecture(_name, prepare_weights=llama.rope_pair_order, family=_family)(llama.llama)


def build_graph(config: ModelConfig, context: int, prefill_chunk: int, all_logits: bool = False,
                cache_slots: int | None = None, max_sequences: int = 1) -> Graph:
    """Trace the model: inputs tokens and positions [S], output logits [S or R, vocab]; S <= prefill_chunk
    new tokens per step, T <= context positions per sequence, R <= max_sequences sequences per step, and a
    KV pool of cache_slots positions (default: one context's worth)."""
    new_tokens = Sym("S", prefill_chunk)
    total = Sym("T", context)
    sequences = Sym("R", min(max_sequences, prefill_chunk))
    inputs = {"tokens": TensorType((new_tokens,), "i32"), "positions": TensorType((new_tokens,), "i32")}
    served_by = architecture(config.architecture)
    name = f"{served_by.family}_{'all' if all_logits else 'last'}_logits"
    return trace(served_by.build, inputs, name=name, config=config, total=total, sequences=sequences,
                 cache_slots=cache_slots or context, all_logits=all_logits)
