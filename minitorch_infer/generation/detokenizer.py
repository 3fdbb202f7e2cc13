"""Streaming token ids out as text, one token at a time, without ever emitting half a character.

Decoding tokens one by one and concatenating goes wrong in two ways:
- a character's UTF-8 bytes can span several tokens (byte-level BPE, or SentencePiece byte fallback
  `<0xE4>`); decoded alone, each part becomes U+FFFD;
- some decoders treat the start of a text specially (SentencePiece strips the leading space), so
  decoding a suffix is not the suffix of decoding the whole.

The fix is the prefix-offset/read-offset technique of vLLM and text-generation-inference. A small
window holds a few already-emitted tokens as context (up to `read_offset`), then the tokens not yet
emitted. Each step decodes the window and emits what it adds to the context's own decoding, once that
addition is non-empty and does not end in U+FFFD (a character still incomplete). Then the window drops
the old context, and the tokens just emitted become the new one, so each step decodes a few tokens,
never the whole output.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence

from tokenizers import Tokenizer

from ..tokenizer import library_failure

# How many prompt tokens give the first generated token its context (vLLM uses the same number).
_PROMPT_CONTEXT_TOKENS = 5

# Once generation runs, a window is nearly always the last token emitted and the new one, and after each
# emission the context is the new token alone. Windows that short are decoded once per tokenizer and then
# looked up: a call into the tokenizer costs 4-8 us, and a token makes two (a push went from 8.2 to 2.2 us).
# The cache is emptied when it reaches _SHORT_DECODES_KEPT entries, so it never grows unbounded.
_SHORT_WINDOW = 2
_SHORT_DECODES_KEPT = 1 << 16
_short_decodes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# In that steady state (one token of context, nothing held back) a push is a function of the context token and
# the new one alone: what it emits, and the new context's text. Kept per tokenizer as the decodes are, a push
# that was seen before is one lookup (the story model's greedy story, pushed again: 0.45 -> 0.14 us a token).
_steady_pushes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Most decoders join the tokens' texts end to end, and then a plain token (see _plain_texts) adds the same text
# after any plain token: a steady push of two plain tokens is then known from the new token alone, one lookup
# after that token's first push, where a pair seen for the first time cost a decode. (The bench's story
# requests met a new pair at a quarter of their tokens, ~5 us each: ~1 us a token on average.)
_plain_texts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The decoder steps (tokenizers' names) that change each token's text on its own, and those that join the
# texts into one. A decoder qualifies when it is these steps alone, per-token ones first, and after the join at
# most a Strip of the text's start (which a plain first token keeps from reaching the next). A Replace or a
# Strip of the end after the join could act across two tokens' texts; CTC's decoder drops repeated tokens.
_PER_TOKEN_STEPS = {"Replace", "Strip", "Metaspace", "ByteFallback"}
_JOINING_STEPS = {"Fuse", "ByteLevel"}
# A vocabulary this small has its plain texts found all at once, by its first detokenizer (the story model's 2,048
# tokens: ~4 ms), rather than each token at its first push (~4 us; in the bench's short story runs, ~0.4 us a
# token on average). SmolLM2's 49,152 would take ~64 ms, which its first request would wait for: a larger
# vocabulary's texts are found as its tokens come.
_WHOLE_TABLE_TOKENS = 8192


class IncrementalDetokenizer:
    """Turns generated token ids into text pieces whose concatenation equals decoding them all at once.

    Without `prompt_ids` the stream equals `tokenizer.decode(generated_ids)`. With them, the last few
    prompt tokens serve as context, so the stream is the text the generated tokens add after the prompt
    (e.g. " time" rather than "time" after "Once upon a" with a SentencePiece tokenizer).
    With `skip_special_tokens`, special tokens produce no text, as in `tokenizer.decode`.

    One exception, only for invalid UTF-8: a byte-fallback decoder turns every byte of a run of byte
    tokens into U+FFFD once the run turns out invalid, including bytes already emitted as valid text. The
    stream cannot take those back, so there it differs from `decode`; both show U+FFFD.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        source: str = "the tokenizer",
    ):
        self.tokenizer = tokenizer
        self.source = source                    # names the tokenizer's file in errors
        self.skip_special_tokens = skip_special_tokens
        self._skipped_ids = _ids_decode_skips(tokenizer) if skip_special_tokens else set()
        self._short_decodes = _short_decodes.setdefault(tokenizer, {}).setdefault(skip_special_tokens, {})
        self._steady_pushes = _steady_pushes.setdefault(tokenizer, {}).setdefault(skip_special_tokens, {})
        if tokenizer not in _plain_texts:
            _plain_texts[tokenizer] = {} if _joins_texts_end_to_end(tokenizer) else None
        plain_texts = _plain_texts[tokenizer]            # None for another kind of decoder
        self._plain_texts = None if plain_texts is None else plain_texts.setdefault(skip_special_tokens, {})
        if self._plain_texts == {} and tokenizer.get_vocab_size() <= _WHOLE_TABLE_TOKENS:   # not None: joins
            for token_id in range(tokenizer.get_vocab_size()):
                self._plain_text(token_id)
        self._window = self._prompt_context(prompt_ids)
        self._read_offset = len(self._window)
        self._context_text = self._decode(self._window)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it makes final ('' while a character is incomplete)."""
        if token_id in self._skipped_ids:
            return ""
        window = self._window
        if len(window) != 1 or self._read_offset != 1:
            return self._push(token_id)
        key = (window[0], token_id)
        texts = self._plain_texts
        if texts is None:
            seen = self._steady_pushes.get(key)
        else:
            seen = texts.get(token_id)
            if not (seen and texts.get(key[0])):     # both plain (known so) takes the new token's texts at once
                seen = self._plain_push(*key)
        if seen is not None:
            piece, self._context_text = seen
            window[0] = token_id
            return piece
        piece = self._push(token_id)
        if len(window) == 1:                 # it emitted, and the state is steady again, on token_id
            if len(self._steady_pushes) >= _SHORT_DECODES_KEPT:
                self._steady_pushes.clear()
            self._steady_pushes[key] = (piece, self._context_text)
        return piece

    def _plain_push(self, context_id: int, token_id: int) -> tuple[str, str] | None:
        """A steady push by a decoder that joins texts end to end: (what it emits, the new context's text), from
        the new token alone when both tokens are plain; else as seen before for this pair, or None."""
        texts = self._plain_texts
        context, token = texts.get(context_id), texts.get(token_id)       # known after a token's first push
        if context is None:
            context = self._plain_text(context_id)
        if token is None:
            token = self._plain_text(token_id)
        if context and token:
            return token
        return self._steady_pushes.get((context_id, token_id))

    def _plain_text(self, token_id: int) -> tuple[str, str] | tuple[()]:
        """(the text the token adds after a plain token, its own text) if it is plain, else (); kept in
        _plain_texts. Plain: its own text is complete (no U+FFFD) and not empty, so that a decoder that joins
        texts end to end keeps it whole beside another (a Strip of the start cannot reach past it). Then it adds
        after any plain token what it adds after itself."""
        alone = self._decode([token_id])
        plain = alone and "\ufffd" not in alone
        found = self._plain_texts[token_id] = (self._call_decode([token_id] * 2)[len(alone):], alone) if plain else ()
        return found

    def _push(self, token_id: int) -> str:
        """push() from any state: decode the window with the new token, and emit what it adds, if it is final."""
        self._window.append(token_id)
        text = self._decode(self._window)
        # Hold the token back while it adds no text yet or leaves a character incomplete (U+FFFD).
        if len(text) <= len(self._context_text) or text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """At the end of generation: the text still held back (with U+FFFD for bytes that never completed)."""
        return self._emit(self._decode(self._window))

    def _emit(self, text: str) -> str:
        """What `text` (the window decoded) adds to the context; the tokens it covers become the context."""
        new_text = text[len(self._context_text) :]
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        self._context_text = self._decode(self._window)
        return new_text

    def _prompt_context(self, prompt_ids: Sequence[int]) -> list[int]:
        """The last few prompt tokens, starting at the start of a character.

        Skipped tokens are left out: they decode to nothing, and a window that starts with nothing would
        let the decoder strip a leading space that belongs mid-stream. A context that starts inside a
        character would decode to U+FFFD there (a byte-fallback decoder even turns the whole run of byte
        tokens into U+FFFD), so step back up to 3 more tokens, as a UTF-8 character has at most 4 bytes.
        """
        kept = [token_id for token_id in prompt_ids if token_id not in self._skipped_ids]
        start = max(len(kept) - _PROMPT_CONTEXT_TOKENS, 0)
        for character_start in range(start, max(start - 3, 0) - 1, -1):
            if not self._decode(kept[character_start:]).startswith("\ufffd"):
                return kept[character_start:]
        return kept[start:]

    def _decode(self, token_ids: list[int]) -> str:
        if len(token_ids) > _SHORT_WINDOW:
            return self._call_decode(token_ids)
        key = tuple(token_ids)
        text = self._short_decodes.get(key)
        if text is None:
            text = self._call_decode(token_ids)
            if len(self._short_decodes) >= _SHORT_DECODES_KEPT:
                self._short_decodes.clear()
            self._short_decodes[key] = text
        return text

    def _call_decode(self, token_ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        except BaseException as error:          # a try costs nothing until it catches; this runs every token
            failure = library_failure(self.source, f"cannot decode token ids {token_ids}", error)
            if failure is None:
                raise
            raise failure from None


def _joins_texts_end_to_end(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's decoder is made of _PER_TOKEN_STEPS, then at most one of _JOINING_STEPS, then at
    most Strips of the start (see _plain_texts)."""
    if tokenizer.decoder is None:
        return False                            # no decoder: decode joins the tokens with spaces between
    try:
        config = json.loads(tokenizer.decoder.__getstate__())
    except Exception:                           # a decoder written in Python has no configuration to read
        return False
    steps = config["decoders"] if config.get("type") == "Sequence" else [config]
    joined = False
    for step in steps:
        kind = step.get("type")
        if joined and not (kind == "Strip" and step.get("stop") == 0):
            return False
        if kind in _JOINING_STEPS:
            joined = True
        elif kind not in _PER_TOKEN_STEPS:
            return False
    return True


def _ids_decode_skips(tokenizer: Tokenizer) -> set[int]:
    """The special tokens that `tokenizer.decode(..., skip_special_tokens=True)` really drops.

    Asked of decode itself because that is not every token marked special: tokenizers 0.23 keeps
    added tokens marked `normalized`, such as the story model's BOS and EOS.
    """
    return {
        token_id
        for token_id, token in tokenizer.get_added_tokens_decoder().items()
        if token.special and tokenizer.decode([token_id], skip_special_tokens=True) == ""
    }
