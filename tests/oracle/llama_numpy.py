"""A plain NumPy Llama-family language model: the test oracle.

This file shares no code with `minitorch_infer`. The engine's differential tests compare against it,
so it is written to be read top to bottom and trusted: no KV cache, no fusion, no cleverness. Every
call recomputes every position in float64, which makes it the slow, obviously-right definition that
prefill + decode with a cache must reproduce.

The semantics are those of HF transformers (checked against 5.23) for `LlamaForCausalLM`,
`MistralForCausalLM` and `Qwen2ForCausalLM`:

- pre-norm decoder blocks: x += attn(rms_norm(x)); x += mlp(rms_norm(x)); logits = lm_head(rms_norm(x));
- RMSNorm: x / sqrt(mean(x^2) + eps) * weight;
- MLP: down(silu(gate(x)) * up(x));
- attention with `num_key_value_heads` <= `num_attention_heads` (MHA, GQA, MQA): query head h reads
  key/value head h // (heads / kv_heads); scores scaled by 1/sqrt(head_dim);
- RoPE in HF's "rotate_half" layout (a head's first half pairs with its second half, not even/odd
  neighbours), with the `rope_scaling` types default, linear, dynamic (NTK) and llama3;
- Mistral's and Qwen2's sliding window: query i sees key j when i - window < j <= i, i.e. itself and
  the window - 1 keys before it (HF masking_utils: `kv_idx > q_idx - sliding_window`).

API:
    load_hf_dir(path) -> (config, weights)         a HF model directory (config.json + safetensors)
    forward(config, weights, token_ids) -> logits  float64 [len(token_ids), vocab_size]
    greedy(config, weights, prompt_ids, n) -> ids  n new tokens, argmax each step, no stop at EOS
    model_settings(config) -> ModelSettings        how HF reads a config.json
    weight_shapes(config) -> {name: shape}         every tensor such a model has, by HF name
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


# ----------------------------------------------------------------------------------------------
# Reading config.json the way transformers does
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSettings:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_position_embeddings: int
    rope: dict  # rope_type, rope_theta and that type's parameters
    sliding_windows: tuple  # per layer: a window size, or None for full causal attention


def model_settings(config: dict) -> ModelSettings:
    """Everything the forward pass needs from a config.json, with the defaults of HF's config classes."""
    model_type = config.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    hidden_act = config.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"config.json: hidden_act {hidden_act!r} is not supported (only 'silu')")

    num_heads = config["num_attention_heads"]
    num_kv_heads = config.get("num_key_value_heads") or num_heads
    if num_heads % num_kv_heads:
        raise ValueError(
            f"config.json: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
        )
    num_layers = config["num_hidden_layers"]

    if model_type == "llama":
        # One flag covers all four projections, o_proj included.
        qkv_bias = o_bias = bool(config.get("attention_bias", False))
        mlp_bias = bool(config.get("mlp_bias", False))
    elif model_type == "qwen2":
        # Qwen2Attention hard-codes bias=True on q/k/v and False on o; there is no config flag.
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:  # mistral: no biases anywhere
        qkv_bias = o_bias = mlp_bias = False

    return ModelSettings(
        model_type=model_type,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        # An explicit head_dim may differ from hidden_size / heads; null or absent means derived.
        head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        max_position_embeddings=config["max_position_embeddings"],
        rope=rope_settings(config),
        sliding_windows=tuple(sliding_windows(config, model_type, num_layers)),
    )


def rope_settings(config: dict) -> dict:
    """The RoPE parameters, merged as HF does from the old and new spellings.

    transformers 4 wrote `rope_scaling` (with `type` or `rope_type`) next to a top-level `rope_theta`;
    transformers 5 writes one `rope_parameters` dict holding `rope_theta` too. A non-empty
    `rope_scaling` wins over `rope_parameters`, and a `rope_theta` inside the dict wins over the
    top-level one.
    """
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    rope["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json: rope type {rope['rope_type']!r} is not one of {SUPPORTED_ROPE_TYPES}")
    if rope["rope_type"] == "llama3":
        # A top-level original_max_position_embeddings is NOT used for Llama (checked with from_pretrained).
        rope.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    return rope


def sliding_windows(config: dict, model_type: str, num_layers: int) -> list:
    """Per layer, the sliding window size or None."""
    if model_type == "mistral":
        # MistralConfig defaults sliding_window to 4096 when the key is absent; null means none.
        return [config.get("sliding_window", 4096)] * num_layers
    if model_type == "qwen2":
        # Qwen2 ignores sliding_window unless use_sliding_window is true (Qwen2.5 checkpoints ship a
        # sliding_window with use_sliding_window false). Then only layers marked "sliding_attention"
        # slide: by default those with index >= max_window_layers.
        if not config.get("use_sliding_window", False):
            return [None] * num_layers
        window = config.get("sliding_window", 4096)
        layer_types = config.get("layer_types") or [
            "sliding_attention" if window is not None and i >= config.get("max_window_layers", 28) else "full_attention"
            for i in range(num_layers)
        ]
        return [window if layer_type == "sliding_attention" else None for layer_type in layer_types]
    # LlamaModel builds a plain causal mask; a sliding_window key in its config is ignored.
    return [None] * num_layers


def weight_shapes(config: dict) -> dict:
    """Every tensor of the model with its shape, by HF name. Tied models list the shared matrix as
    model.embed_tokens.weight (what save_pretrained writes), though a file may hold it as lm_head.weight."""
    s = model_settings(config)
    q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    shapes = {"model.embed_tokens.weight": (s.vocab_size, s.hidden_size)}
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (s.hidden_size,)
        shapes[p + "self_attn.q_proj.weight"] = (q_size, s.hidden_size)
        shapes[p + "self_attn.k_proj.weight"] = (kv_size, s.hidden_size)
        shapes[p + "self_attn.v_proj.weight"] = (kv_size, s.hidden_size)
        shapes[p + "self_attn.o_proj.weight"] = (s.hidden_size, q_size)
        if s.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_size,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_size,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_size,)
        if s.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (s.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (s.hidden_size,)
        shapes[p + "mlp.gate_proj.weight"] = (s.intermediate_size, s.hidden_size)
        shapes[p + "mlp.up_proj.weight"] = (s.intermediate_size, s.hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (s.hidden_size, s.intermediate_size)
        if s.mlp_bias:
            shapes[p + "mlp.gate_proj.bias"] = (s.intermediate_size,)
            shapes[p + "mlp.up_proj.bias"] = (s.intermediate_size,)
            shapes[p + "mlp.down_proj.bias"] = (s.hidden_size,)
    shapes["model.norm.weight"] = (s.hidden_size,)
    if not s.tie_word_embeddings:
        shapes["lm_head.weight"] = (s.vocab_size, s.hidden_size)
    return shapes


# ----------------------------------------------------------------------------------------------
# Loading a HF model directory
# ----------------------------------------------------------------------------------------------

# safetensors dtype -> numpy dtype of the stored bytes (always little-endian). BF16 is handled apart.
SAFETENSORS_FLOAT_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2")}


def load_hf_dir(path) -> tuple:
    """(config, weights) of a HF model directory: config.json plus model.safetensors, or shards
    listed in model.safetensors.index.json. Weights come back as float32 (float64 for F64), exactly."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        weights = {}
        for shard in sorted(set(weight_map.values())):
            weights.update(read_safetensors(path / shard))
        missing = set(weight_map) - set(weights)
        if missing:
            raise ValueError(f"{index_file}: tensors listed but not found in the shards: {sorted(missing)}")
    elif (path / "model.safetensors").exists():
        weights = read_safetensors(path / "model.safetensors")
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    return config, weights


def read_safetensors(file) -> dict:
    """Read a .safetensors file directly from its format: an 8-byte little-endian header length,
    a JSON header {name: {dtype, shape, data_offsets}}, then the raw tensor bytes.

    Read by hand rather than with safetensors.numpy because numpy has no bfloat16 and
    safetensors.numpy.load_file raises TypeError ("data type 'bfloat16' not understood") on BF16.
    """
    data = Path(file).read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    body = data[8 + header_size :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = body[start:end]
        if info["dtype"] == "BF16":
            # A bfloat16 is the top half of a float32 with the same bits: shift into place.
            values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in SAFETENSORS_FLOAT_DTYPES:
            stored = SAFETENSORS_FLOAT_DTYPES[info["dtype"]]
            values = np.frombuffer(raw, stored).astype(np.promote_types(stored, np.float32))
        else:
            raise ValueError(f"{file}: tensor {name} has dtype {info['dtype']}, not a float type")
        tensors[name] = values.reshape(info["shape"])
    return tensors


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------


def rope_inverse_frequencies(s: ModelSettings, seq_len: int) -> np.ndarray:
    """The head_dim/2 rotation speeds (radians per position). `seq_len` is max(position id) + 1 of
    the forward call; only dynamic scaling looks at it."""
    dim = s.head_dim
    rope = s.rope
    base = rope["rope_theta"]
    if rope["rope_type"] == "dynamic":
        # Dynamic NTK: once the call reaches past max_position_embeddings, stretch the base so the
        # slowest rotation still fits. At or below it the base is unchanged.
        factor, max_positions = rope["factor"], s.max_position_embeddings
        seq_len = max(seq_len, max_positions)
        base = base * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2) / dim)

    if rope["rope_type"] == "linear":
        # Linear scaling divides positions by factor; dividing the frequencies is the same thing.
        inv_freq = inv_freq / rope["factor"]
    elif rope["rope_type"] == "llama3":
        inv_freq = llama3_scaled(inv_freq, rope)
    return inv_freq


def llama3_scaled(inv_freq: np.ndarray, rope: dict) -> np.ndarray:
    """Llama 3.1's rule by wavelength: short wavelengths stay, long ones are divided by factor, and
    those in between are interpolated smoothly."""
    factor = rope["factor"]
    low_freq_factor, high_freq_factor = rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(
        wavelen > low_freq_wavelen,
        inv_freq / factor,
        np.where(wavelen < high_freq_wavelen, inv_freq, interpolated),
    )


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate x [heads, seq, head_dim]. HF layout: element k pairs with element k + head_dim/2."""
    angles = positions[:, None] * inv_freq[None, :]  # [seq, head_dim/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [seq, head_dim]
    half = x.shape[-1] // 2
    rotated_half = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(angles) + rotated_half * np.sin(angles)


# ----------------------------------------------------------------------------------------------
# The forward pass
# ----------------------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def linear(x: np.ndarray, w: dict, name: str, bias: bool) -> np.ndarray:
    """x @ W.T (+ b). HF stores a projection's weight as [out_features, in_features]. Whether there is
    a bias comes from the config, as in HF: a stray bias tensor in the file is ignored."""
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if bias else y


def attention_mask(seq_len: int, window) -> np.ndarray:
    """allowed[i, j]: query i may read key j. Causal, and with a window only i - window < j."""
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def attention(s: ModelSettings, w: dict, prefix: str, x: np.ndarray, inv_freq: np.ndarray, window) -> np.ndarray:
    seq_len = x.shape[0]
    positions = np.arange(seq_len, dtype=np.float64)

    def heads(y, n):  # [seq, n * head_dim] -> [n, seq, head_dim]
        return y.reshape(seq_len, n, s.head_dim).transpose(1, 0, 2)

    q = heads(linear(x, w, prefix + "q_proj", s.qkv_bias), s.num_heads)
    k = heads(linear(x, w, prefix + "k_proj", s.qkv_bias), s.num_kv_heads)
    v = heads(linear(x, w, prefix + "v_proj", s.qkv_bias), s.num_kv_heads)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)

    # GQA/MQA: consecutive query heads share a key/value head (head h uses kv head h // group).
    group = s.num_heads // s.num_kv_heads
    k = np.repeat(k, group, axis=0)
    v = np.repeat(v, group, axis=0)

    scores = q @ k.transpose(0, 2, 1) / math.sqrt(s.head_dim)  # [heads, seq, seq]
    scores = np.where(attention_mask(seq_len, window), scores, -np.inf)
    out = softmax(scores) @ v  # [heads, seq, head_dim]
    out = out.transpose(1, 0, 2).reshape(seq_len, s.num_heads * s.head_dim)
    return linear(out, w, prefix + "o_proj", s.o_bias)


def mlp(s: ModelSettings, w: dict, prefix: str, x: np.ndarray) -> np.ndarray:
    gate = linear(x, w, prefix + "gate_proj", s.mlp_bias)
    up = linear(x, w, prefix + "up_proj", s.mlp_bias)
    return linear(silu(gate) * up, w, prefix + "down_proj", s.mlp_bias)


def embedding_matrices(s: ModelSettings, w: dict) -> tuple:
    """(embed_tokens, lm_head). A tied checkpoint may store the shared matrix under either name:
    transformers 5 ties whichever one is present (the story model stores only lm_head.weight). If
    both are stored, HF uses each as stored (it refuses to tie two different matrices)."""
    embed_name, head_name = "model.embed_tokens.weight", "lm_head.weight"
    if not s.tie_word_embeddings:
        return w[embed_name], w[head_name]
    if embed_name not in w and head_name not in w:
        raise KeyError(f"tied embeddings: neither {embed_name} nor {head_name} is in the weights")
    shared = w[embed_name] if embed_name in w else w[head_name]
    return w.get(embed_name, shared), w.get(head_name, shared)


def forward(config: dict, weights: dict, token_ids) -> np.ndarray:
    """Logits [len(token_ids), vocab_size] (float64) at every position, token_ids at positions 0, 1, ..."""
    s = model_settings(config)
    w = {name: np.asarray(value, dtype=np.float64) for name, value in weights.items()}
    token_ids = np.asarray(token_ids, dtype=np.int64)
    inv_freq = rope_inverse_frequencies(s, seq_len=len(token_ids))

    embed_tokens, lm_head = embedding_matrices(s, w)
    x = embed_tokens[token_ids]
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], s.rms_norm_eps)
        x = x + attention(s, w, p + "self_attn.", h, inv_freq, s.sliding_windows[i])
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], s.rms_norm_eps)
        x = x + mlp(s, w, p + "mlp.", h)
    x = rms_norm(x, w["model.norm.weight"], s.rms_norm_eps)

    return x @ lm_head.T


def greedy(config: dict, weights: dict, prompt_ids, n: int) -> list:
    """The n tokens that greedy decoding appends to prompt_ids (argmax, first index on ties, no stop at
    EOS), each step recomputed from scratch over the whole sequence."""
    ids = [int(t) for t in prompt_ids]
    for _ in range(n):
        ids.append(int(np.argmax(forward(config, weights, ids)[-1])))
    return ids[len(prompt_ids) :]
