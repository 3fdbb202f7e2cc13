"""Build a `tokenizers.Tokenizer` from the vocabulary a GGUF file carries in its metadata.

Two families, named by `tokenizer.ggml.model`:
- "gpt2": byte-level BPE from the vocabulary and merge list, split into words first by the regex that
  `tokenizer.ggml.pre` names (the splits are llama.cpp's, which defines what those names mean);
- "llama": SentencePiece BPE, where merges come from the per-token scores, "▁" stands for a space and
  unknown characters fall back to <0xNN> byte tokens.
Control and unknown tokens become special added tokens, so their text in a prompt maps to their one id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ..errors import ModelFormatError, UnsupportedModelError, shown
from .gguf_file import GGUFFile

SPACE_MARK = "\u2581"  # "▁", SentencePiece's visible space

# Llama 3's split (llama.cpp's "llama-bpe"): case-insensitive contractions, numbers in runs of up to three.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _gpt2_words() -> pre_tokenizers.PreTokenizer:
    # ByteLevel with use_regex=True splits words with GPT-2's regex, as llama.cpp's "gpt-2" does
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_words() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_words()])


def _llama3_words() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> pre-tokenizer, grouped as llama.cpp groups them (llama-vocab.cpp)
PRE_TOKENIZERS = {
    "gpt-2": _gpt2_words,
    "smollm": _digits_then_gpt2_words,
    "starcoder": _digits_then_gpt2_words,
    "refact": _digits_then_gpt2_words,
    "codeshell": _digits_then_gpt2_words,
    "llama-bpe": _llama3_words,
}
# Llama 3 looks a whole word up in the vocabulary before merging (HF's ignore_merges)
_IGNORE_MERGES = {"llama-bpe"}


@dataclass(frozen=True)
class SpecialTokens:
    """BOS/EOS ids and whether encoding adds them, from the tokenizer.ggml.* metadata."""

    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool


def read_special_tokens(gguf: GGUFFile) -> SpecialTokens:
    """BOS/EOS settings. add_bos defaults to true for "llama" (SentencePiece) vocabularies, as llama.cpp does."""
    n_tokens = len(gguf.field("tokenizer.ggml.tokens", list))
    ids = {}
    for name in ("bos", "eos"):
        key = f"tokenizer.ggml.{name}_token_id"
        token_id = gguf.field(key, int, None)
        if token_id is not None and not 0 <= token_id < n_tokens:
            raise ModelFormatError(f"{gguf.path}: {key} is {token_id}, outside the {n_tokens}-token vocabulary")
        ids[name] = token_id
    add_bos = gguf.field("tokenizer.ggml.add_bos_token", bool, gguf.field("tokenizer.ggml.model", str) == "llama")
    add_eos = gguf.field("tokenizer.ggml.add_eos_token", bool, False)
    for name, adds in (("bos", add_bos), ("eos", add_eos)):
        if adds and ids[name] is None:
            raise ModelFormatError(
                f"{gguf.path}: tokenizer.ggml.add_{name}_token is set but there is no {name} token id"
            )
    return SpecialTokens(ids["bos"], ids["eos"], add_bos, add_eos)


def build_tokenizer(gguf: GGUFFile) -> Tokenizer:
    """The tokenizer the GGUF file describes; UnsupportedModelError for other tokenizer families."""
    kind = gguf.field("tokenizer.ggml.model", str)
    tokens = gguf.field("tokenizer.ggml.tokens", list)
    token_types = gguf.field("tokenizer.ggml.token_type", np.ndarray, None)
    if token_types is None:
        token_types = np.full(len(tokens), TokenType.NORMAL, dtype=np.int32)
    if len(token_types) != len(tokens):
        raise ModelFormatError(
            f"{gguf.path}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
        )
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(gguf, tokens)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(gguf, tokens, token_types)
    else:
        raise UnsupportedModelError(
            f"{gguf.path}: tokenizer.ggml.model is {shown(kind)}; only 'gpt2' (byte-level BPE) and 'llama' "
            "(SentencePiece BPE) are supported"
        )
    _add_special_tokens(tokenizer, tokens, token_types)
    tokenizer.post_processor = _bos_eos_template(tokens, read_special_tokens(gguf))
    return tokenizer


def _byte_level_bpe(gguf: GGUFFile, tokens: list[str]) -> Tokenizer:
    pre = gguf.field("tokenizer.ggml.pre", str, None)
    if pre not in PRE_TOKENIZERS:
        found = "missing" if pre is None else repr(pre)
        raise UnsupportedModelError(
            f"{gguf.path}: tokenizer.ggml.pre is {found}; supported pre-tokenizers: {', '.join(PRE_TOKENIZERS)}"
        )
    merges = []
    for line in gguf.field("tokenizer.ggml.merges", list):
        pair = line.split(" ")
        # byte-level tokens never contain a space (it is spelled "Ġ"), so a merge is exactly two tokens
        if len(pair) != 2:
            raise ModelFormatError(f"{gguf.path}: tokenizer.ggml.merges entry {shown(line)} is not two tokens")
        merges.append((pair[0], pair[1]))
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    model = _bpe(gguf, vocab, merges, ignore_merges=pre in _IGNORE_MERGES)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(gguf: GGUFFile, tokens: list[str], token_types: np.ndarray) -> Tokenizer:
    scores = gguf.field("tokenizer.ggml.scores", np.ndarray)
    if len(scores) != len(tokens):
        raise ModelFormatError(f"{gguf.path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    unk_id = gguf.field("tokenizer.ggml.unknown_token_id", int, None)
    if unk_id is not None and not 0 <= unk_id < len(tokens):
        raise ModelFormatError(f"{gguf.path}: tokenizer.ggml.unknown_token_id {unk_id} is outside the vocabulary")
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merges = _merges_from_scores(tokens, scores.tolist(), token_types.tolist())
    unk_token = tokens[unk_id] if unk_id is not None else None
    tokenizer = Tokenizer(_bpe(gguf, vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))

    # llama.cpp puts a space before the text and after every special token; a normalizer does the same,
    # because tokenizers normalizes each stretch of text between special tokens on its own.
    add_space_prefix = gguf.field("tokenizer.ggml.add_space_prefix", bool, True)
    to_marks = normalizers.Replace(" ", SPACE_MARK)
    if add_space_prefix:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE_MARK), to_marks])
    else:
        tokenizer.normalizer = to_marks
    steps = [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE joins the adjacent pair whose joined piece scores highest. As a ranked merge list
    that is every split of a piece into two pieces, best joined score first (ties: piece id, then split ids).
    """
    pieces = {token: token_id for token_id, token in enumerate(tokens) if token_types[token_id] == TokenType.NORMAL}
    ranked = []
    for piece, piece_id in pieces.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                ranked.append((-scores[piece_id], piece_id, pieces[left], pieces[right]))
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, _, left, right in ranked]


def _bpe(gguf: GGUFFile, vocab: dict[str, int], merges: list[tuple[str, str]], **options) -> BPE:
    try:
        return BPE(vocab, merges, **options)
    except Exception as error:  # tokenizers reports bad merges as a bare Exception
        raise ModelFormatError(f"{gguf.path}: the tokenizer vocabulary or merges are inconsistent: {error}") from None


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: np.ndarray) -> None:
    """Control and unknown tokens match as special tokens; user-defined ones as plain added tokens.

    normalized=False: GGUF stores these tokens as the raw text they stand for.
    """
    special, user_defined = [], []
    for token, token_type in zip(tokens, token_types.tolist()):
        if token and token_type in (TokenType.CONTROL, TokenType.UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif token and token_type == TokenType.USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)


def _bos_eos_template(tokens: list[str], special: SpecialTokens) -> processors.PostProcessor | None:
    """Adds BOS/EOS around each sequence, as the add_bos/add_eos flags ask."""
    if not (special.add_bos or special.add_eos):
        return None

    # the template names them BOS/EOS: its syntax cannot spell a token text that holds a ":"
    def sequence(name: str, type_id: int) -> list[str]:
        start = [f"BOS:{type_id}"] if special.add_bos else []
        end = [f"EOS:{type_id}"] if special.add_eos else []
        return start + [f"${name}:{type_id}"] + end

    markers = [("BOS", special.bos_id, special.add_bos), ("EOS", special.eos_id, special.add_eos)]
    return processors.TemplateProcessing(
        single=sequence("A", 0),
        pair=sequence("A", 0) + sequence("B", 1),
        special_tokens=[
            {"id": name, "ids": [token_id], "tokens": [tokens[token_id]]} for name, token_id, adds in markers if adds
        ],
    )
