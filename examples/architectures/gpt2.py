"""GPT-2 as a plugin: written only with minitorch-infer's public API, as a user outside the package would.

    minitorch-infer generate --plugin examples/architectures/gpt2.py -m tests/fixtures/extensions/gpt2_tiny -p "Hi"

    import minitorch_infer, minitorch_infer.plugins
    minitorch_infer.plugins.load_plugin("examples/architectures/gpt2.py")   # or import it
    model = minitorch_infer.load("path/to/a/gpt2/folder")

What differs from Llama: LayerNorm (with bias) instead of RMSNorm; GELU (tanh form) instead of SwiGLU; learned
position embeddings (wpe) instead of RoPE; a bias on every projection; q, k and v from one fused c_attn
product; weights stored by HF's Conv1D as [in, out] (turned to [out, in] views at load, since F.matmul
computes x·Wᵀ); and a head tied to the token embedding. Shapes: S new tokens, D = n_embd, H heads of hd.
"""

from __future__ import annotations

import re

from minitorch_infer.architectures import register_architecture
from minitorch_infer.config import ModelConfig
from minitorch_infer.errors import ModelFormatError, UnsupportedModelError
from minitorch_infer.ir import functional as F

GELU_FORMS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")     # weights stored [in, out]


def gpt2_config(raw: dict, source: str) -> ModelConfig:
    """config.json's GPT-2 fields onto ModelConfig; layer_norm_epsilon and the GELU form stay in `raw`."""
    def positive(key, default=None):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelFormatError(f"{source}: field {key!r} = {value!r} must be a positive integer")
        return value

    activation = raw.get("activation_function", "gelu_new")
    if activation not in GELU_FORMS:
        raise UnsupportedModelError(f"{source}: activation_function = {activation!r} is not supported; "
                                    f"supported: {', '.join(GELU_FORMS)}")
    hidden, heads, vocab = positive("n_embd"), positive("n_head"), positive("vocab_size")
    if hidden % heads:
        raise ModelFormatError(f"{source}: n_embd = {hidden} does not split into n_head = {heads} heads")
    eos = raw.get("eos_token_id")
    return ModelConfig(
        architecture="GPT2LMHeadModel", hidden_size=hidden, intermediate_size=raw.get("n_inner") or 4 * hidden,
        num_layers=positive("n_layer"), num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        vocab_size=vocab, rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)), rope_theta=10000.0,
        max_position_embeddings=positive("n_positions", 1024), tie_word_embeddings=True,
        bos_token_id=raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else None,
        eos_token_ids=(eos,) if isinstance(eos, int) and 0 <= eos < vocab else (), source=source, raw=raw)


def gpt2_tensor_name(name: str) -> str | None:
    """transformer.h.3.attn.c_attn.weight -> layers.3.attn.c_attn (and .bias -> _bias, as the Llama names go);
    LayerNorms keep .weight/.bias (layers.3.ln_1.weight); transformer.wte.weight -> embed, wpe.weight -> wpe."""
    name = re.sub(r"^h\.(\d+)\.", r"layers.\1.", name.removeprefix("transformer."))
    if re.fullmatch(r"layers\.\d+\.attn\.(masked_)?bias", name):
        return None                                   # old checkpoints' causal-mask buffers
    if name in ("wte.weight", "wpe.weight", "lm_head.weight"):
        return {"wte.weight": "embed", "wpe.weight": "wpe", "lm_head.weight": "lm_head"}[name]
    module, _, kind = name.rpartition(".")
    if module.endswith(CONV1D):
        return module if kind == "weight" else f"{module}_bias"
    return name


def conv1d_to_linear(config: ModelConfig, weights) -> None:
    """Conv1D keeps [in, out]; F.matmul wants [out, in]. A transposed view: no copy, and BLAS reads either."""
    for i in range(config.num_layers):
        for part in CONV1D:
            name = f"layers.{i}.{part}"
            if name in weights:
                weights.convert(name, weights[name].T)


@register_architecture("GPT2LMHeadModel", config=gpt2_config, tensor_name=gpt2_tensor_name,
                       prepare_weights=conv1d_to_linear, family="gpt2")
def gpt2(tokens, positions, *, config, total, sequences, cache_slots, all_logits):
    c = config
    if total.max > c.max_position_embeddings:     # learned positions end there; RoPE models can go on
        raise UnsupportedModelError(f"{c.source}: a context of {total.max} positions, but GPT-2 learned "
                                    f"n_positions = {c.max_position_embeddings}")
    x = F.embedding(tokens, F.param("embed", (c.vocab_size, c.hidden_size)))                        # [S, D]
    x = x + F.embedding(positions, F.param("wpe", (c.max_position_embeddings, c.hidden_size)))    # learned positions
    for i in range(c.num_layers):
        with F.scope(f"layers.{i}", layer=i):
            x = x + attention_block(x, c, i, total, cache_slots)
            x = x + mlp_block(x, c, i)
    if not all_logits:
        x = F.last_row(x, sequences)                                          # [R, D]: each sequence's newest row
    x = layer_norm(x, "ln_f", c)
    return F.matmul(x, F.param("embed", (c.vocab_size, c.hidden_size)))      # tied head: [S or R, vocab]


def attention_block(x, c: ModelConfig, i: int, total, cache_slots: int):
    seq, width = x.shape[0], c.hidden_size
    with F.scope("attn"):
        qkv = linear(layer_norm(x, f"layers.{i}.ln_1", c), f"layers.{i}.attn.c_attn", 3 * width, width)   # [S, 3D]
        q, k, v = (F.slice_cols(qkv, part * width, (part + 1) * width).reshape(seq, c.num_heads, c.head_dim)
                   for part in range(3))                                                               # [S, H, hd]
        cache_shape = (c.num_heads, cache_slots, c.head_dim)
        keys = F.kv_write(k, F.state(f"kv.{i}.k", cache_shape), total)                                # [H, T, hd]
        values = F.kv_write(v, F.state(f"kv.{i}.v", cache_shape), total)
        out = F.attention(q, keys, values, scale=c.head_dim ** -0.5)
        return linear(out.reshape(seq, width), f"layers.{i}.attn.c_proj", width, width)


def mlp_block(x, c: ModelConfig, i: int):
    with F.scope("mlp"):
        h = linear(layer_norm(x, f"layers.{i}.ln_2", c), f"layers.{i}.mlp.c_fc", c.intermediate_size, c.hidden_size)
        h = F.gelu(h, GELU_FORMS[c.raw.get("activation_function", "gelu_new")])
        return linear(h, f"layers.{i}.mlp.c_proj", c.hidden_size, c.intermediate_size)


def layer_norm(x, name: str, c: ModelConfig):
    return F.layer_norm(x, F.param(f"{name}.weight", (c.hidden_size,)), F.param(f"{name}.bias", (c.hidden_size,)),
                        c.rms_norm_eps)


def linear(x, name: str, out_features: int, in_features: int):
    """x · Wᵀ + b, W [out, in] (after conv1d_to_linear)."""
    return F.matmul(x, F.param(name, (out_features, in_features))) + F.param(f"{name}_bias", (out_features,))
