"""Write small GGUF files for tests: a tiny llama model from HF-named weights, and two small vocabularies.

The names and the q/k row order follow llama.cpp's converter (convert_hf_to_gguf.py), written out here
independently of the loader, so a test can check that the loader undoes exactly what the converter does.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, TokenType

SPACE_MARK = "\u2581"


@dataclass(frozen=True)
class TinyLlama:
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 96
    layers: int = 2
    context: int = 256
    key_length: int | None = None  # head size, when it is not hidden / heads

    @property
    def head_dim(self) -> int:
        return self.key_length or self.hidden // self.heads


def llama_metadata(model: TinyLlama) -> dict[str, Any]:
    metadata = {
        "llama.block_count": model.layers,
        "llama.context_length": model.context,
        "llama.embedding_length": model.hidden,
        "llama.feed_forward_length": model.ffn,
        "llama.attention.head_count": model.heads,
        "llama.attention.head_count_kv": model.kv_heads,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": model.head_dim,
    }
    if model.key_length is not None:
        metadata["llama.attention.key_length"] = metadata["llama.attention.value_length"] = model.key_length
    return metadata


def random_hf_weights(
    model: TinyLlama, vocab: int, seed: int = 0, tied: bool = True, biases: bool = False
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def tensor(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    q_size, kv_size = model.heads * model.head_dim, model.kv_heads * model.head_dim
    weights = {"model.embed_tokens.weight": tensor(vocab, model.hidden), "model.norm.weight": tensor(model.hidden)}
    if not tied:
        weights["lm_head.weight"] = tensor(vocab, model.hidden)
    for i in range(model.layers):
        layer = f"model.layers.{i}."
        weights |= {
            layer + "input_layernorm.weight": tensor(model.hidden),
            layer + "self_attn.q_proj.weight": tensor(q_size, model.hidden),
            layer + "self_attn.k_proj.weight": tensor(kv_size, model.hidden),
            layer + "self_attn.v_proj.weight": tensor(kv_size, model.hidden),
            layer + "self_attn.o_proj.weight": tensor(model.hidden, q_size),
            layer + "post_attention_layernorm.weight": tensor(model.hidden),
            layer + "mlp.gate_proj.weight": tensor(model.ffn, model.hidden),
            layer + "mlp.up_proj.weight": tensor(model.ffn, model.hidden),
            layer + "mlp.down_proj.weight": tensor(model.hidden, model.ffn),
        }
        if biases:
            weights |= {
                layer + "self_attn.q_proj.bias": tensor(q_size),
                layer + "self_attn.k_proj.bias": tensor(kv_size),
                layer + "self_attn.v_proj.bias": tensor(kv_size),
            }
    return weights


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q_proj/k_proj rows (LlamaModel.permute)."""
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def to_gguf_tensors(hf_weights: dict[str, np.ndarray], model: TinyLlama) -> dict[str, np.ndarray]:
    """Rename to GGUF names and permute q/k rows, as llama.cpp's converter does."""
    tensors = {}
    for name, value in hf_weights.items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{index}.{_GGUF_NAMES[rest]}"
            if rest.startswith("self_attn.q_proj."):
                value = llama_cpp_permute(value, model.heads)
            elif rest.startswith("self_attn.k_proj."):
                value = llama_cpp_permute(value, model.kv_heads)
        else:
            gguf_name = _GGUF_NAMES[name]
        tensors[gguf_name] = value
    return tensors


def gpt2_byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte (bytes_to_unicode): printable bytes stand for themselves."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


BYTE_LEVEL_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d"]


def byte_level_vocab(pre: str = "smollm", add_bos: bool = False) -> dict[str, Any]:
    """tokenizer.* metadata of a small byte-level BPE: 3 control tokens, 256 bytes, the merges' results, "<tool>"."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merged = ["".join(merge.split(" ")) for merge in BYTE_LEVEL_MERGES]
    tokens = specials + gpt2_byte_chars() + merged + ["<tool>"]
    types = [TokenType.CONTROL] * 3 + [TokenType.NORMAL] * (256 + len(merged)) + [TokenType.USER_DEFINED]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.merges": list(BYTE_LEVEL_MERGES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
    }


# SentencePiece pieces and scores: a higher score merges first
SENTENCEPIECE_PIECES = {
    "he": -1.0,
    "ll": -2.0,
    "hell": -3.0,
    "hello": -4.0,
    SPACE_MARK + "hello": -5.0,
    "or": -6.0,
    SPACE_MARK + "w": -7.0,
    SPACE_MARK + "wor": -8.0,
    "ld": -9.0,
    "ab": -1.5,  # "abc" must become "ab" "c": "ab" outscores "bc"
    "bc": -2.5,
}
SENTENCEPIECE_CHARS = [SPACE_MARK, "h", "e", "l", "o", "w", "r", "d", "a", "b", "c"]


def sentencepiece_vocab(
    add_bos: bool = True, add_eos: bool = False, add_space_prefix: bool | None = None
) -> dict[str, Any]:
    """tokenizer.* metadata of a small SentencePiece vocabulary: <unk>, <s>, </s>, 256 byte tokens, pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    for char in SENTENCEPIECE_CHARS:
        tokens.append(char)
        types.append(TokenType.NORMAL)
        scores.append(-100.0)
    for piece, score in SENTENCEPIECE_PIECES.items():
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        scores.append(score)
    tokens.append("<tool>")
    types.append(TokenType.USER_DEFINED)
    scores.append(0.0)
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.ggml.add_eos_token": add_eos,
    }
    if add_space_prefix is not None:
        metadata["tokenizer.ggml.add_space_prefix"] = add_space_prefix
    return metadata


def write_gguf(
    path: Path,
    metadata: dict[str, Any],
    tensors: dict[str, np.ndarray],
    arch: str = "llama",
    tensor_types: dict[str, GGMLQuantizationType] | None = None,
) -> Path:
    """Write a GGUF file. Tensors are F32 unless `tensor_types` names another type: float arrays are then
    quantised with gguf-py, uint8 arrays are written as they are (raw blocks)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_key_value(key, value, GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))
    for name, value in tensors.items():
        ggml_type = (tensor_types or {}).get(name, GGMLQuantizationType.F32)
        if ggml_type == GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
        elif value.dtype == np.uint8:
            writer.add_tensor(name, value, raw_dtype=ggml_type)
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, ggml_type), raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_llama(
    path: Path,
    model: TinyLlama = TinyLlama(),
    vocab: dict[str, Any] | None = None,
    weights: dict[str, np.ndarray] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    drop_metadata: tuple[str, ...] = (),
    tensor_types: dict[str, GGMLQuantizationType] | None = None,
) -> Path:
    """A complete tiny llama GGUF (byte-level vocabulary and random weights unless given)."""
    vocab = byte_level_vocab() if vocab is None else vocab
    if weights is None:
        weights = random_hf_weights(model, len(vocab["tokenizer.ggml.tokens"]))
    metadata = llama_metadata(model) | vocab | (extra_metadata or {})
    metadata = {key: value for key, value in metadata.items() if key not in drop_metadata}
    return write_gguf(path, metadata, to_gguf_tensors(weights, model), tensor_types=tensor_types)
