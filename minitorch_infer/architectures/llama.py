"""The Llama family (Llama, Mistral, Qwen2) as a plain function over graph ops. Read it top to bottom.

Weights are referred to by canonical names (`layers.3.attn.q`); minitorch_infer.formats.weights maps HF and GGUF
names onto them. Shapes: S = new tokens this step (of one or more sequences), T = a sequence's past + new
tokens, R = sequences in the step, D = hidden size.
RoPE rotates adjacent pairs of dimensions (one complex multiply), so the q/k weight rows are stored in
pair order: `rope_pair_order` does that once, when the model is built.
"""

from __future__ import annotations

import numpy as np

from ..ir import functional as F
from ..ir.tracer import Tensor
from ..ir.types import Sym
from ..config import ModelConfig
from ..quantized import QuantizedTensor


def llama(tokens: Tensor, positions: Tensor, *, config: ModelConfig, total: Sym, sequences: Sym, cache_slots: int,
          all_logits: bool) -> Tensor:
    c = config
    x = F.embedding(tokens, F.param("embed", (c.vocab_size, c.hidden_size)))       # [S, D]
    rotation = F.rope_table(positions, c.head_dim, c.rope_theta, c.rope_scaling)    # [S, head_dim]: cos/sin pairs
    for i in range(c.num_layers):
        with F.scope(f"layers.{i}", layer=i):
            x = x + attention_block(x, rotation, c, i, total, cache_slots)            # [S, D]
            x = x + mlp_block(x, c, i)                                                 # [S, D]
    if not all_logits:
        x = F.last_row(x, sequences)                                   # [R, D]: each sequence's newest row
    x = F.rms_norm(x, F.param("norm", (c.hidden_size,)), c.rms_norm_eps)
    head = "embed" if c.tie_word_embeddings else "lm_head"
    return F.matmul(x, F.param(head, (c.vocab_size, c.hidden_size)))                  # [S or R, vocab]


def attention_block(x: Tensor, rotation: Tensor, c: ModelConfig, i: int, total: Sym, cache_slots: int) -> Tensor:
    seq = x.shape[0]
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    with F.scope("attn"):
        h = F.rms_norm(x, F.param(f"layers.{i}.attn_norm", (c.hidden_size,)), c.rms_norm_eps)
        q = linear(h, f"layers.{i}.attn.q", q_width, c.hidden_size, c.qkv_bias)       # [S, Hq*hd]
        k = linear(h, f"layers.{i}.attn.k", kv_width, c.hidden_size, c.qkv_bias)      # [S, Hkv*hd]
        v = linear(h, f"layers.{i}.attn.v", kv_width, c.hidden_size, c.qkv_bias)
        q = F.rope(q.reshape(seq, c.num_heads, c.head_dim), rotation)                  # [S, Hq, hd]
        k = F.rope(k.reshape(seq, c.num_kv_heads, c.head_dim), rotation)               # [S, Hkv, hd]
        cache_shape = (c.num_kv_heads, cache_slots, c.head_dim)                          # the paged KV pool
        keys = F.kv_write(k, F.state(f"kv.{i}.k", cache_shape), total)                 # [Hkv, T, hd]
        values = F.kv_write(v.reshape(seq, c.num_kv_heads, c.head_dim), F.state(f"kv.{i}.v", cache_shape), total)
        out = F.attention(q, keys, values, scale=c.head_dim ** -0.5, window=c.layer_windows[i])
        return linear(out.reshape(seq, q_width), f"layers.{i}.attn.o", c.hidden_size, q_width, c.o_bias)


def mlp_block(x: Tensor, c: ModelConfig, i: int) -> Tensor:
    with F.scope("mlp"):
        h = F.rms_norm(x, F.param(f"layers.{i}.mlp_norm", (c.hidden_size,)), c.rms_norm_eps)
        gate = linear(h, f"layers.{i}.mlp.gate", c.intermediate_size, c.hidden_size, c.mlp_bias)
        up = linear(h, f"layers.{i}.mlp.up", c.intermediate_size, c.hidden_size, c.mlp_bias)
        return linear(F.silu(gate) * up, f"layers.{i}.mlp.down", c.hidden_size, c.intermediate_size, c.mlp_bias)


def linear(x: Tensor, name: str, out_features: int, in_features: int, bias: bool) -> Tensor:
    """x · Wᵀ (+ b), with W in HF's [out, in] layout."""
    y = F.matmul(x, F.param(name, (out_features, in_features)))
    return y + F.param(f"{name}_bias", (out_features,)) if bias else y


def rope_pair_order(config: ModelConfig, weights) -> None:
    """Reorder each head's q/k rows (and biases) from HF's rotate-half layout (i with i + D/2) to adjacent pairs.

    llama.cpp stores q/k this way too. q and k are reordered alike, so q·k and attention do not change.
    Runs before the weights' shapes are checked: a tensor of the wrong size is left for that check to name.
    """
    half = config.head_dim // 2
    within_head = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
    for i in range(config.num_layers):
        for part, heads in (("q", config.num_heads), ("k", config.num_kv_heads)):
            order = (np.arange(heads)[:, None] * config.head_dim + within_head[None, :]).reshape(-1)
            for name in (f"layers.{i}.attn.{part}", f"layers.{i}.attn.{part}_bias"):
                if name in weights and weights[name].shape[:1] == order.shape:
                    weight = weights[name]
                    if isinstance(weight, QuantizedTensor):
                        weights.replace(name, weight.take_rows(order))
                    else:
                        weights.replace(name, np.ascontiguousarray(weight[order]))
