"""Tokenizer: a `tokenizers` Tokenizer plus what the model files say about BOS, EOS and chat templates.

A damaged tokenizer.json can load and still fail when used: the `tokenizers` library then raises a bare
Exception, or panics (a PanicException, which is a BaseException). Both become ModelFormatError naming the
file, at load time where a probe finds them, or at the encode or decode that does.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import tokenizers

from .config import read_json_object
from .errors import ModelFormatError, shown


PROBE_TEXT = "Hello, world! 123 \u00e9\u4e16"


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 add_bos_token: bool, chat_template: str | None = None, source: str = "<tokenizer>",
                 template_origin: str | None = None):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.source = source
        # where the template came from, for TemplateError messages: not always the tokenizer's own file
        self.template_origin = template_origin or f"{source} chat_template"

    def token_text(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids for text; with add_special_tokens, BOS first when the model wants it (and only once)."""
        with _as_format_errors(self.source, "cannot encode text"):
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        with _as_format_errors(self.source, "cannot decode token ids"):
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @classmethod
    def from_dir(cls, model_dir: Path, bos_token_id: int | None, eos_token_ids: Sequence[int]) -> Tokenizer | None:
        """The folder's tokenizer, or None when it has no tokenizer.json (the model then runs on token ids)."""
        path = model_dir / "tokenizer.json"
        if not path.exists():
            return None
        with _as_format_errors(path, "cannot read tokenizer"):
            backend = tokenizers.Tokenizer.from_file(str(path))
        with _as_format_errors(path, "the tokenizer fails on a test text"):
            # every stage (normalizer, pre-tokenizer, model, post-processor, decoder) runs on this
            backend.decode(backend.encode(PROBE_TEXT, add_special_tokens=True).ids)
        settings_path = model_dir / "tokenizer_config.json"
        settings = read_json_object(settings_path, "tokenizer settings") if settings_path.exists() else {}
        return cls(backend, bos_token_id, eos_token_ids, _add_bos_token(settings_path, settings),
                   _chat_template(settings_path, settings), source=str(path),
                   template_origin=f"{settings_path} chat_template")

    def largest_id(self) -> int:
        """The largest token id the tokenizer can produce (-1 for an empty vocabulary)."""
        return max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1)


def _add_bos_token(path: Path, settings: dict) -> bool:
    add_bos = settings.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        # bool("false") is True: a string here must be refused, not read as a yes
        raise ModelFormatError(f"{path}: add_bos_token = {shown(add_bos)} must be true, false or null")
    return bool(add_bos)


def _chat_template(path: Path, settings: dict) -> str | None:
    template = settings.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    # several named templates, [{"name": ..., "template": ...}]: the one named "default" is for chat
    if isinstance(template, list) and all(
            isinstance(named, dict) and isinstance(named.get("name"), str) and isinstance(named.get("template"), str)
            for named in template):
        return next((named["template"] for named in template if named["name"] == "default"), None)
    raise ModelFormatError(
        f"{path}: chat_template = {shown(template)} must be a string or a list of {{name, template}} objects")


@contextmanager
def _as_format_errors(path: str | Path, what: str) -> Iterator[None]:
    """Turn the tokenizers library's failures into a ModelFormatError: "{path}: {what}: {its message}"."""
    try:
        yield
    except BaseException as error:
        failure = library_failure(path, what, error)
        if failure is None:
            raise
        raise failure from None


def library_failure(path: str | Path, what: str, error: BaseException) -> ModelFormatError | None:
    """The ModelFormatError for a failure inside the tokenizers library, or None for what is not the file's
    fault (Ctrl-C, running out of memory).

    The library reports malformed files with a bare Exception, and panics with pyo3's PanicException, a
    BaseException whose type has no importable name.
    """
    if isinstance(error, MemoryError):
        return None
    if isinstance(error, Exception):
        return ModelFormatError(f"{path}: {what}: {_first_line(error)}")
    if type(error).__name__ == "PanicException":
        return ModelFormatError(f"{path}: {what} (the tokenizers library panicked: {_first_line(error)})")
    return None


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def read_generation_eos(model_dir: Path) -> int | list | None:
    """eos_token_id from generation_config.json, which may list more than config.json (chat models often do)."""
    path = model_dir / "generation_config.json"
    return read_json_object(path, "generation settings").get("eos_token_id") if path.exists() else None
