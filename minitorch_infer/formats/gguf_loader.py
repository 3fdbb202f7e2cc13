"""Load a llama-architecture GGUF file as what a Hugging Face checkpoint would hold: a config.json dict,
float32 tensors under HF names and layouts, and a tokenizer.

GGUF lists dims innermost first, so read in NumPy order a [out, in] matrix already has HF's layout.
The one layout change: llama.cpp's converter reorders the rows of q_proj and k_proj for its RoPE, which
rotates adjacent pairs of values, while HF's RoPE rotates the two halves of each head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .dequantize import SUPPORTED_TYPES, dequantize
from ..errors import ModelFormatError, UnsupportedModelError, shown
from ..quantized import BLOCK_TYPES, QuantizedTensor
from .gguf_file import GGUFFile, TensorInfo, open_gguf
from .gguf_tokenizer import SpecialTokens, build_tokenizer, read_special_tokens

ARCHITECTURE = "llama"

# GGUF name -> HF name; "{i}" is the layer index
_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# without output.weight the output projection is the token embedding (tied)
_OPTIONAL_TENSORS = re.compile(r"output\.weight|blk\.\d+\.attn_[qkv]\.bias")


@dataclass
class GGUFModel:
    """A GGUF model in Hugging Face terms."""

    path: Path
    config: dict[str, Any]  # config.json keys
    tensors: dict[str, np.ndarray | QuantizedTensor]  # HF name -> float32 (C-contiguous), or blocks as stored
    tokenizer: Tokenizer
    chat_template: str | None
    add_bos_token: bool
    add_eos_token: bool
    metadata: dict[str, Any]  # the scalar and string metadata, for display


def read_gguf(path: str | Path, keep_blocks: bool = False) -> GGUFModel:
    """Read a llama GGUF file, dequantising its tensors to float32, except with keep_blocks those of a type the
    engine computes on directly (Q8_0, Q4_0, Q4_1 matrices), which stay as stored. ModelFormatError if the
    file is malformed."""
    gguf = open_gguf(path)
    architecture = gguf.field("general.architecture", str)
    if architecture != ARCHITECTURE:
        raise UnsupportedModelError(
            f"{gguf.path}: general.architecture is {shown(architecture)}; only {ARCHITECTURE!r} GGUF files are "
            "supported"
        )
    special = read_special_tokens(gguf)
    config = _config(gguf, special)
    expected = _expected_tensors(config)
    _check_tensors(gguf, expected, config)
    tokenizer = build_tokenizer(gguf)
    if tokenizer.get_vocab_size() > config["vocab_size"]:
        raise ModelFormatError(
            f"{gguf.path}: the tokenizer has {tokenizer.get_vocab_size()} tokens but token_embd.weight only "
            f"{config['vocab_size']} rows"
        )
    # one tensor at a time, so memory peaks near the float32 model plus one tensor's temporaries
    tensors = {expected[name][0]: _load_tensor(gguf, info, config, keep_blocks) for name, info in gguf.tensors.items()}
    return GGUFModel(
        path=gguf.path,
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=gguf.field("tokenizer.chat_template", str, None),
        add_bos_token=special.add_bos,
        add_eos_token=special.add_eos,
        metadata={key: value for key, value in gguf.metadata.items() if not isinstance(value, (list, np.ndarray))},
    )


def _config(gguf: GGUFFile, special: SpecialTokens) -> dict[str, Any]:
    """config.json for LlamaForCausalLM, from the llama.* metadata and the embedding's shape."""

    def positive(key: str, *default: int) -> int:
        value = gguf.field(f"{ARCHITECTURE}.{key}", int, *default)
        if value <= 0:
            raise ModelFormatError(f"{gguf.path}: {ARCHITECTURE}.{key} is {value}, expected a positive count")
        return value

    hidden_size = positive("embedding_length")
    num_heads = positive("attention.head_count")
    num_kv_heads = positive("attention.head_count_kv", num_heads)
    if num_heads % num_kv_heads:
        raise ModelFormatError(
            f"{gguf.path}: {num_heads} attention heads cannot share {num_kv_heads} key/value heads evenly"
        )
    default_head_dim = hidden_size // num_heads
    if hidden_size % num_heads and f"{ARCHITECTURE}.attention.key_length" not in gguf.metadata:
        raise ModelFormatError(
            f"{gguf.path}: embedding length {hidden_size} does not split into {num_heads} heads and "
            f"{ARCHITECTURE}.attention.key_length is missing"
        )
    head_dim = positive("attention.key_length", default_head_dim)
    value_dim = positive("attention.value_length", head_dim)
    rope_dim = positive("rope.dimension_count", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(f"{gguf.path}: key length {head_dim} and value length {value_dim} differ")
    if rope_dim != head_dim:
        raise UnsupportedModelError(
            f"{gguf.path}: {ARCHITECTURE}.rope.dimension_count is {rope_dim}; only RoPE over whole heads "
            f"({head_dim}) is supported"
        )
    if head_dim % 2:
        raise ModelFormatError(f"{gguf.path}: head size {head_dim} is odd, so RoPE cannot pair its values")

    if "token_embd.weight" not in gguf.tensors:
        raise ModelFormatError(f"{gguf.path}: tensor 'token_embd.weight' is missing")
    vocab_size = gguf.tensors["token_embd.weight"].shape[0]
    declared_vocab = positive("vocab_size", vocab_size)
    if declared_vocab != vocab_size:
        raise ModelFormatError(
            f"{gguf.path}: {ARCHITECTURE}.vocab_size is {declared_vocab} but token_embd.weight has {vocab_size} rows"
        )
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": positive("feed_forward_length"),
        "num_hidden_layers": _block_count(gguf, positive("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": gguf.field(f"{ARCHITECTURE}.attention.layer_norm_rms_epsilon", float),
        "rope_theta": gguf.field(f"{ARCHITECTURE}.rope.freq_base", float, 10000.0),  # llama.cpp's default
        "rope_scaling": _rope_scaling(gguf),
        "max_position_embeddings": positive("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "bos_token_id": special.bos_id,
        "eos_token_id": special.eos_id,
    }
    if head_dim != default_head_dim:
        config["head_dim"] = head_dim
    return config


def _block_count(gguf: GGUFFile, declared: int) -> int:
    """The layer count, checked against the tensors before anything is built per layer: a corrupt count
    would otherwise list (and later trace) millions of layers before finding their tensors missing."""
    stored = {match.group(1) for name in gguf.tensors if (match := re.match(r"blk\.(\d+)\.", name))}
    if declared > len(stored):
        raise ModelFormatError(
            f"{gguf.path}: {ARCHITECTURE}.block_count is {declared}, but the file holds tensors for {len(stored)} "
            "layers"
        )
    return declared


def _rope_scaling(gguf: GGUFFile) -> dict[str, Any] | None:
    kind = gguf.field(f"{ARCHITECTURE}.rope.scaling.type", str, "none")
    factor = gguf.field(f"{ARCHITECTURE}.rope.scaling.factor", float, None)
    # files from before rope.scaling.type spelled linear scaling rope.scale_linear
    legacy_linear = gguf.field(f"{ARCHITECTURE}.rope.scale_linear", float, None)
    if kind == "none" and legacy_linear not in (None, 1.0):
        kind, factor = "linear", legacy_linear
    if kind == "none":
        return None
    if kind == "linear" and factor is not None:
        return {"rope_type": "linear", "factor": factor}
    raise UnsupportedModelError(
        f"{gguf.path}: {ARCHITECTURE}.rope.scaling.type is {shown(kind)} (factor {factor}); only 'none' and 'linear' "
        "are supported"
    )


def _expected_tensors(config: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor a llama GGUF file may hold: GGUF name -> (HF name, HF shape)."""
    hidden, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim", hidden // config["num_attention_heads"])
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config["num_key_value_heads"] * head_dim
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "output.weight": (vocab, hidden),
        "blk.{i}.attn_norm.weight": (hidden,),
        "blk.{i}.attn_q.weight": (q_size, hidden),
        "blk.{i}.attn_k.weight": (kv_size, hidden),
        "blk.{i}.attn_v.weight": (kv_size, hidden),
        "blk.{i}.attn_output.weight": (hidden, q_size),
        "blk.{i}.attn_q.bias": (q_size,),
        "blk.{i}.attn_k.bias": (kv_size,),
        "blk.{i}.attn_v.bias": (kv_size,),
        "blk.{i}.ffn_norm.weight": (hidden,),
        "blk.{i}.ffn_gate.weight": (inner, hidden),
        "blk.{i}.ffn_up.weight": (inner, hidden),
        "blk.{i}.ffn_down.weight": (hidden, inner),
    }
    expected = {}
    for gguf_name, hf_name in _TENSOR_NAMES.items():
        layers = range(config["num_hidden_layers"]) if "{i}" in gguf_name else [None]
        for i in layers:
            expected[gguf_name.format(i=i)] = (hf_name.format(i=i), shapes[gguf_name])
    return expected


def _check_tensors(gguf: GGUFFile, expected: dict[str, tuple[str, tuple[int, ...]]], config: dict[str, Any]) -> None:
    """Every tensor known, shaped as the metadata implies and of a type we read; none missing."""
    for name, info in gguf.tensors.items():
        if name not in expected:
            raise _unexpected_tensor(gguf, name, config["num_hidden_layers"])
        implied = expected[name][1]
        if info.shape != implied:
            raise ModelFormatError(
                f"{gguf.path}: tensor {shown(name)} has shape {list(info.shape)}, but the metadata implies "
                f"{list(implied)}"
            )
        if info.ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"{gguf.path}: tensor {shown(name)} has type {info.ggml_type.name}, which cannot be dequantised "
                f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
            )
    missing = [name for name in expected if name not in gguf.tensors and not _OPTIONAL_TENSORS.fullmatch(name)]
    if missing:
        listed = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise ModelFormatError(f"{gguf.path}: {len(missing)} tensors are missing: {listed}")


def _unexpected_tensor(gguf: GGUFFile, name: str, num_layers: int) -> Exception:
    layer = re.match(r"blk\.(\d+)\.", name)
    if layer and int(layer.group(1)) >= num_layers:
        return ModelFormatError(
            f"{gguf.path}: tensor {shown(name)} is beyond {ARCHITECTURE}.block_count = {num_layers}")
    if name == "rope_freqs.weight":
        return UnsupportedModelError(
            f"{gguf.path}: tensor 'rope_freqs.weight' (Llama 3.1-style RoPE frequency scaling) is not supported"
        )
    return UnsupportedModelError(f"{gguf.path}: tensor {shown(name)} is not part of a llama model")


def _load_tensor(gguf: GGUFFile, info: TensorInfo, config: dict[str, Any], keep_blocks: bool
                 ) -> np.ndarray | QuantizedTensor:
    kind = info.ggml_type.name.lower()
    if keep_blocks and kind in BLOCK_TYPES and len(info.shape) == 2:
        values = QuantizedTensor.from_ggml(gguf.tensor_bytes(info.name), kind, info.shape)
    else:
        values = dequantize(gguf.tensor_bytes(info.name), info.ggml_type, info.shape, info.name)
        if np.shares_memory(values, gguf.tensor_bytes(info.name)):
            values = values.copy()          # F32 comes back as a view of the map, whose pages are released next
    gguf.release(info.name)
    if re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", info.name):
        return _undo_rope_permutation(values, config["num_attention_heads"])
    if re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", info.name):
        return _undo_rope_permutation(values, config["num_key_value_heads"])
    return values


def _undo_rope_permutation(rows: np.ndarray | QuantizedTensor, num_heads: int) -> np.ndarray | QuantizedTensor:
    """Put q/k rows (or bias entries) back in HF order.

    Within each head llama.cpp stores HF row j * half + i (half j of the head, 0 <= i < half) at position
    2 * i + j, interleaving the halves; reading (heads, half, 2) as (heads, 2, half) undoes that.
    """
    half = rows.shape[0] // num_heads // 2
    order = np.arange(rows.shape[0]).reshape(num_heads, half, 2).swapaxes(1, 2).reshape(-1)
    if isinstance(rows, QuantizedTensor):
        return rows.take_rows(order)
    return np.ascontiguousarray(rows[order])
