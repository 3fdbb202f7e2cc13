"""load(): from a model folder (config.json + safetensors + tokenizer.json) or a .gguf file to a compiled Model."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .architectures import architecture, read_config
from .config import ModelConfig, read_json_object, token_ids
from .errors import ModelFormatError
from .model import Model
from .passes import quantize_weights
from .plugins import load_configured_plugins
from .formats.model_files import find_model
from .tokenizer import Tokenizer, read_generation_eos
from .formats.weights import WeightStore, load_safetensors_dir


# The weight type each kind of file runs from when none is asked for (README, "Quantised weights", says why).
DEFAULT_WEIGHTS = {"gguf": "native", "safetensors": "f32"}


def load(name_or_path: str | os.PathLike, weights: str | None = None, **options) -> Model:
    """Load and compile a model. `name_or_path`: a folder, a .gguf file, or a known name ("story").

    `weights`: what the matrices are computed from: "f32", "q8_0", "q4_0", "q4_1", or "native" (as stored:
    a GGUF's Q8_0/Q4_0/Q4_1 matrices stay quantised; other types and safetensors are float32). The default is
    DEFAULT_WEIGHTS[the file's kind].

    Other options go to Model: context, prefill_chunk, passes, memory_plan, kv_memory (the paged KV pool's
    size: bytes, or "512MiB", "8192tokens"), kv_block_size, max_batch (sequences per step).
    """
    load_configured_plugins()
    path = find_model(name_or_path)
    kind = "gguf" if path.suffix == ".gguf" else "safetensors"
    weights = DEFAULT_WEIGHTS[kind] if weights is None else weights
    quantize_weights(weights)                              # an unknown type fails before the file is read
    if path.is_dir():
        config, store, tokenizer = _read_hf_dir(path)
    elif path.suffix == ".gguf":
        # Blocks stay as stored unless float32 is asked for: converting them one tensor at a time in the
        # quantize_weights pass never holds the whole model in float32.
        config, store, tokenizer = _read_gguf(path, keep_blocks=weights != "f32")
    else:
        raise ModelFormatError(f"{path}: not a model folder or a .gguf file")
    _check_layer_count(config, store)
    if config.tie_word_embeddings and not store.tie_embeddings():
        config = replace(config, tie_word_embeddings=False)
    return Model(config, store, tokenizer, source=str(path), weight_type=weights, **options)


def _check_layer_count(config: ModelConfig, weights: WeightStore) -> None:
    """Before tracing, whose cost grows with the layer count: the weights hold every layer the config declares.
    (Model checks every tensor's shape once traced; this only keeps a corrupt count from tracing for minutes.)"""
    stored = weights.layer_count()
    if config.num_layers > stored:
        raise ModelFormatError(
            f"{config.source}: num_hidden_layers = {config.num_layers}, but {weights.source} holds tensors for "
            f"{stored} layers")


def _read_hf_dir(path: Path) -> tuple[ModelConfig, WeightStore, Tokenizer]:
    config_path = path / "config.json"
    if not config_path.exists():
        raise ModelFormatError(f"{path}: no config.json")
    config = read_config(read_json_object(config_path, "config"), str(config_path))
    generation_eos = token_ids(read_generation_eos(path), config.vocab_size,
                               f"{path / 'generation_config.json'}: eos_token_id")
    config = replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + generation_eos)))
    tokenizer = Tokenizer.from_dir(path, config.bos_token_id, config.eos_token_ids)
    if tokenizer is not None and tokenizer.largest_id() >= config.vocab_size:
        raise ModelFormatError(f"{tokenizer.source}: the tokenizer has token ids up to {tokenizer.largest_id()}, but "
                               f"the model's vocabulary ({config_path} vocab_size) ends at {config.vocab_size - 1}")
    return config, load_safetensors_dir(path, architecture(config.architecture).tensor_name), tokenizer


def _read_gguf(path: Path, keep_blocks: bool) -> tuple[ModelConfig, WeightStore, Tokenizer]:
    from .formats.gguf_loader import read_gguf  # the gguf package costs ~50 ms to import; folders never need it

    model = read_gguf(path, keep_blocks)
    config = ModelConfig.from_dict(model.config, source=str(path))
    weights = WeightStore(source=str(path))
    weights.add_hf_tensors(model.tensors.items())
    tokenizer = Tokenizer(model.tokenizer, config.bos_token_id, config.eos_token_ids, model.add_bos_token,
                          model.chat_template, source=str(path), template_origin=f"{path} tokenizer.chat_template")
    return config, weights, tokenizer
