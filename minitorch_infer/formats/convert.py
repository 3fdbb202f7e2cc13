"""Convert a GGUF file into a Hugging Face model folder (float32 safetensors, config, tokenizer files).

The folder is written under a hidden temporary name next to `out_dir` and renamed into place at the end,
so an interrupted conversion never leaves a half-written model where a loader would find it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from safetensors.numpy import save_file

from ..errors import OutputExistsError
from .gguf_loader import GGUFModel, read_gguf


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write config.json, generation_config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json for the GGUF model into `out_dir` (absent or empty); return `out_dir`."""
    out_dir = Path(out_dir)
    _refuse_existing(out_dir)
    model = read_gguf(gguf_path)  # before anything is created, so a bad file leaves nothing behind
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_model_folder(model, staging)
        _refuse_existing(out_dir)  # in case something appeared there while we converted
        # rename() replaces an empty folder atomically, so out_dir is either absent/empty or complete
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _refuse_existing(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(f"{out_dir} already exists and is not an empty folder; not overwriting it")


def _write_model_folder(model: GGUFModel, folder: Path) -> None:
    _write_json(folder / "config.json", model.config)
    _write_json(folder / "generation_config.json", _generation_config(model))
    # transformers refuses safetensors files whose metadata does not name a framework
    save_file(model.tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", _tokenizer_config(model))


def _generation_config(model: GGUFModel) -> dict[str, Any]:
    ids = {key: model.config[key] for key in ("bos_token_id", "eos_token_id")}
    return {key: value for key, value in ids.items() if value is not None}


def _tokenizer_config(model: GGUFModel) -> dict[str, Any]:
    def token(token_id: int | None) -> str | None:
        return None if token_id is None else model.tokenizer.id_to_token(token_id)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(model.config["bos_token_id"]),
        "eos_token": token(model.config["eos_token_id"]),
        "add_bos_token": model.add_bos_token,
        "add_eos_token": model.add_eos_token,
        "model_max_length": model.config["max_position_embeddings"],
        # transformers would otherwise tidy spaces before punctuation when decoding, which GGUF models never do
        "clean_up_tokenization_spaces": False,
    }
    if model.chat_template is not None:
        config["chat_template"] = model.chat_template
    return config


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
