"""Tokenizer: a `tokenizers` Tokenizer plus what the model files say about BOS, EOS and chat templates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import tokenizers

from .errors import ModelFormatError


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 add_bos_token: bool, chat_template: str | None = None, source: str = "<tokenizer>"):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.source = source

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids for text; with add_special_tokens, BOS first when the model wants it (and only once)."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @classmethod
    def from_dir(cls, model_dir: Path, bos_token_id: int | None, eos_token_ids: Sequence[int]) -> Tokenizer | None:
        """The folder's tokenizer, or None when it has no tokenizer.json (the model then runs on token ids)."""
        path = model_dir / "tokenizer.json"
        if not path.exists():
            return None
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises a bare Exception on malformed files
            raise ModelFormatError(f"{path}: cannot read tokenizer: {error}") from None
        settings = _read_json(model_dir / "tokenizer_config.json")
        template = settings.get("chat_template")
        if isinstance(template, list):   # several named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        add_bos = settings.get("add_bos_token", False)
        return cls(backend, bos_token_id, eos_token_ids, bool(add_bos), template if isinstance(template, str) else None,
                   source=str(path))


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFormatError(f"{path}: cannot read: {error}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def read_generation_eos(model_dir: Path) -> tuple[int, ...]:
    """EOS ids from generation_config.json, which may list more than config.json (chat models often do)."""
    eos = _read_json(model_dir / "generation_config.json").get("eos_token_id")
    if isinstance(eos, int):
        return (eos,)
    if isinstance(eos, list):
        return tuple(e for e in eos if isinstance(e, int))
    return ()
