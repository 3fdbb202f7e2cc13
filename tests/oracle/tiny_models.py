"""Tiny random models in HF format (config.json + safetensors), for differential tests.

    config, weights = write_tiny_model(tmp_path, {"num_key_value_heads": 1}, dtype="bfloat16", shards=2)
    for overrides in random_configs():  # >= 24 varied small configs, always the same ones
        ...

The weights are random but scaled so a forward pass is neither flat nor saturated and greedy decoding
does not just repeat one token: see random_tensor. Logits come out O(1)-O(10). What write_tiny_model
returns is what the files hold, read back as float32 after the float16/bfloat16 rounding, so an oracle
fed the returned weights sees the same values as an engine that loads the directory.
"""

import json
from pathlib import Path

import numpy as np

from .llama_numpy import weight_shapes

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

BASE_CONFIG = {
    "model_type": "llama",
    "vocab_size": 101,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

SAFETENSORS_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_tiny_model(directory, config_overrides: dict, dtype: str = "float32", shards: int = 1, seed: int = 0):
    """Write config.json and random weights to `directory`; return (config, weights as float32)."""
    if dtype not in SAFETENSORS_DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(SAFETENSORS_DTYPE_NAMES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    config = {**BASE_CONFIG, **config_overrides}
    config.setdefault("architectures", [ARCHITECTURES[config["model_type"]]])
    config["torch_dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    rng = np.random.default_rng(seed)
    stored = {name: to_storage(random_tensor(rng, name, shape), dtype) for name, shape in weight_shapes(config).items()}
    write_shards(directory, stored, dtype, shards)
    return config, {name: from_storage(bits, dtype) for name, bits in stored.items()}


def random_tensor(rng: np.random.Generator, name: str, shape: tuple) -> np.ndarray:
    if name == "model.embed_tokens.weight":
        # Each layer adds O(1) to the residual stream; the embedding should not drown that out.
        values = rng.normal(0.0, 0.5, shape)
    elif name == "model.norm.weight":
        # Mean 0, not 1: with tied embeddings a positive final norm weight makes the input token's own
        # embedding the best match, and greedy decoding of a random model repeats one token forever.
        values = rng.normal(0.0, 1.0, shape)
    elif name.endswith("norm.weight"):
        values = 1.0 + 0.2 * rng.normal(size=shape)
    elif name.endswith(".bias"):
        values = 0.3 * rng.normal(size=shape)
    elif name == "lm_head.weight":
        # Normed hidden states have rms ~1, so this gives logits with a spread of about 3.
        values = rng.normal(0.0, 3.0 / np.sqrt(shape[1]), shape)
    else:  # projections [out, in]
        values = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
    return values.astype(np.float32)


def to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """The array whose bytes the file holds. bfloat16 has no numpy type: keep its bits as uint16."""
    if dtype == "float32":
        return values
    if dtype == "float16":
        return values.astype(np.float16)
    # bfloat16 = the top 16 bits of a float32, rounded to nearest, ties to even (as torch does).
    bits = values.view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return ((bits + rounding) >> 16).astype(np.uint16)


def from_storage(stored: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def write_shards(directory: Path, stored: dict, dtype: str, shards: int) -> None:
    """model.safetensors, or `shards` files named as save_pretrained names them plus the index json
    that maps each tensor to its file."""
    names = list(stored)
    if shards == 1:
        write_safetensors(directory / "model.safetensors", stored, dtype)
        return
    if not 1 < shards <= len(names):
        raise ValueError(f"shards {shards} must be between 1 and the number of tensors {len(names)}")
    weight_map = {}
    for k in range(shards):
        shard_names = names[k * len(names) // shards : (k + 1) * len(names) // shards]
        file_name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(directory / file_name, {name: stored[name] for name in shard_names}, dtype)
        weight_map.update({name: file_name for name in shard_names})
    total_size = sum(array.nbytes for array in stored.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_safetensors(file: Path, stored: dict, dtype: str) -> None:
    """The safetensors format, written directly (safetensors.numpy cannot write bfloat16): an 8-byte
    little-endian header size, a JSON header padded with spaces to 8-byte alignment, the raw bytes."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array in stored.items():
        header[name] = {
            "dtype": SAFETENSORS_DTYPE_NAMES[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(file, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for array in stored.values():
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


# ----------------------------------------------------------------------------------------------
# A fixed, varied set of small configs
# ----------------------------------------------------------------------------------------------

# The sequence length differential tests should run these configs at: longer than every sliding
# window and every dynamic-NTK max_position_embeddings below, so both take effect.
TEST_SEQUENCE_LENGTH = 24

# Features that each config takes in turn (cycles of different lengths, so combinations vary). The
# first 12 configs alone cover every entry of every cycle.
KV_GROUPS = [1, 2, 4, "mqa"]  # query heads per key/value head; "mqa" = a single key/value head
FLAVOURS = [
    "llama",
    "mistral_sliding",
    "llama_attention_bias",
    "qwen2",
    "llama",
    "qwen2_sliding",
]
ROPES = ["default", "linear", "dynamic", "llama3", "default"]
TIED = [False, True, True]


def random_configs(n: int = 24, seed: int = 1234) -> list:
    """n config_overrides for write_tiny_model: every GQA ratio and MQA, tied and untied, explicit
    head_dim != hidden/heads, odd vocab sizes, each rope scaling type written in each spelling,
    sliding windows shorter than TEST_SEQUENCE_LENGTH, q/k/v biases (Llama attention_bias and Qwen2),
    1-3 layers, hidden 16-64. The same n and seed always give the same configs."""
    rng = np.random.default_rng(seed)
    configs = []
    for i in range(n):
        kv_group = KV_GROUPS[i % len(KV_GROUPS)]
        flavour = FLAVOURS[i % len(FLAVOURS)]
        rope_type = ROPES[i % len(ROPES)]

        num_heads = int(rng.choice([4, 8])) if kv_group in (4, "mqa") else int(rng.choice([2, 4]))
        num_kv_heads = 1 if kv_group == "mqa" else num_heads // kv_group
        # head_dim = hidden / heads stays >= 4 (RoPE needs an even head_dim, dynamic NTK one above 2).
        hidden_size = int(rng.choice([32, 48, 64] if num_heads == 8 else [16, 32, 48, 64]))
        config = {
            "vocab_size": int(rng.choice([37, 64, 101, 128])),
            "hidden_size": hidden_size,
            "intermediate_size": int(rng.choice([2, 3])) * hidden_size,
            "num_hidden_layers": 1 + i % 3,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "rms_norm_eps": float(rng.choice([1e-6, 1e-5])),
            "rope_theta": float(rng.choice([100.0, 10000.0, 500000.0])),
            "tie_word_embeddings": TIED[i % len(TIED)],
        }
        # Every third config sets head_dim explicitly, larger or smaller than hidden/heads (HF still
        # requires hidden_size % heads == 0).
        if i % 3 == 1:
            derived = hidden_size // num_heads
            config["head_dim"] = 2 * derived if derived <= 8 else derived // 2 - 2
        config.update(rope_config(rope_type, i, config["rope_theta"]))
        config.update(flavour_config(flavour, config["num_hidden_layers"], rng))
        configs.append(config)
    return configs


def rope_config(rope_type: str, i: int, theta: float) -> dict:
    """rope_scaling for one type, spelt the three ways checkpoints do: transformers 4 with `type`, 4 with
    `rope_type`, or transformers 5's `rope_parameters` that carries rope_theta too."""
    if rope_type == "default":
        return {}
    parameters = {
        "linear": {"factor": 2.0},
        # max_position_embeddings below TEST_SEQUENCE_LENGTH, so the NTK base change takes effect.
        "dynamic": {"factor": 3.0},
        # With original_max_position_embeddings 64 and factors 1/4, wavelengths below 16 are kept, those
        # above 64 divided by 8, those between interpolated.
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }[rope_type]
    spelling = (i // len(ROPES)) % 3  # over 24 configs, each type gets each spelling
    extra = {"max_position_embeddings": 12} if rope_type == "dynamic" else {}
    if spelling == 0:
        return {"rope_scaling": {"type": rope_type, **parameters}, **extra}
    if spelling == 1:
        return {"rope_scaling": {"rope_type": rope_type, **parameters}, **extra}
    return {"rope_scaling": None, "rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **parameters}, **extra}


def flavour_config(flavour: str, num_layers: int, rng: np.random.Generator) -> dict:
    window = int(rng.integers(3, 9))  # always shorter than TEST_SEQUENCE_LENGTH
    if flavour == "mistral_sliding":
        return {"model_type": "mistral", "sliding_window": window}
    if flavour == "llama_attention_bias":
        return {"attention_bias": True, "mlp_bias": bool(rng.integers(2))}
    if flavour == "qwen2":
        # A sliding_window that must be ignored: use_sliding_window is false (as in Qwen2.5 checkpoints).
        return {"model_type": "qwen2", "sliding_window": window, "use_sliding_window": False, "max_window_layers": 0}
    if flavour == "qwen2_sliding":
        # Layers from max_window_layers on slide; with one layer, that one slides.
        return {
            "model_type": "qwen2",
            "sliding_window": window,
            "use_sliding_window": True,
            "max_window_layers": min(1, num_layers - 1),
        }
    return {}
