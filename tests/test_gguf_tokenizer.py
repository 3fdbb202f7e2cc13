"""Tokenizers built from GGUF metadata: SmolLM2's byte-level BPE against the reference ids, and small
synthetic byte-level and SentencePiece vocabularies with known encodings."""

from pathlib import Path

import pytest
from gguf_helpers.synthetic import SPACE_MARK, byte_level_vocab, gpt2_byte_chars, sentencepiece_vocab, write_gguf
from gguf_helpers.texts import random_texts
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import reference, require_model

from minitorch_infer.errors import ModelFormatError, UnsupportedModelError
from minitorch_infer.formats.gguf_file import open_gguf
from minitorch_infer.formats.gguf_tokenizer import build_tokenizer, read_special_tokens

SMOLLM2_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>")


@pytest.fixture(scope="module")
def smollm2():
    return build_tokenizer(open_gguf(require_model("smollm2-135m-instruct")))


def _tokenizer(tmp_path: Path, vocab: dict):
    return build_tokenizer(open_gguf(write_gguf(tmp_path / "vocab.gguf", vocab, {})))


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.token_to_id(token) for token in tokens]


# --- SmolLM2 (byte-level BPE, pre-tokenizer "smollm") ---


def test_smollm2_chat_prompt_gives_the_reference_ids(smollm2):
    expected = reference("smollm2")

    assert smollm2.encode(expected["prompts"]["short_text"]).ids == expected["prompt_ids"]


def test_smollm2_prefill_ids_survive_decode_and_encode(smollm2):
    ids = reference("smollm2")["prompts"]["prefill_ids"]

    assert smollm2.encode(smollm2.decode(ids, skip_special_tokens=False)).ids == ids


def test_smollm2_greedy_ids_decode_to_the_reference_text(smollm2):
    expected = reference("smollm2")

    assert smollm2.decode(expected["greedy_ids"], skip_special_tokens=False) == expected["greedy_text"]


def test_smollm2_special_tokens_are_single_ids_even_inside_words(smollm2):
    assert smollm2.encode("<|im_start|>").ids == [1]
    assert smollm2.encode("<|endoftext|>").ids == [0]
    ids = smollm2.encode("word<|im_end|>word").ids
    assert ids.count(2) == 1 and len(ids) == 3


def test_smollm2_splits_numbers_into_digits(smollm2):
    assert smollm2.encode("in 2024").tokens == ["in", "Ġ", "2", "0", "2", "4"]


@pytest.fixture(scope="module")
def spellable(smollm2):
    """Whether a text's UTF-8 bytes all have byte tokens: SmolLM2 lacks 21 (0x04, 0xF1, ...), and BPE drops
    characters it cannot spell, as HF's tokenizer for this model does too."""
    vocab = smollm2.get_vocab()
    byte_chars = gpt2_byte_chars()
    present = {byte for byte in range(256) if byte_chars[byte] in vocab}
    return lambda text: set(text.encode("utf-8")) <= present


def test_smollm2_round_trips_1000_generated_strings(smollm2, spellable):
    texts = random_texts(1000, seed=7, specials=SMOLLM2_SPECIALS)
    assert all(map(spellable, texts))
    encodings = smollm2.encode_batch(texts)

    decoded = [smollm2.decode(encoding.ids, skip_special_tokens=False) for encoding in encodings]

    failures = [text for text, back in zip(texts, decoded) if back != text]

    assert failures == []


@settings(max_examples=300, derandomize=True, deadline=None)
@given(data=st.data())
def test_smollm2_round_trips_any_spellable_text(smollm2, spellable, data):
    text = data.draw(st.text(st.characters(codec="utf-8").filter(spellable), max_size=80))

    assert smollm2.decode(smollm2.encode(text).ids, skip_special_tokens=False) == text


def test_smollm2_drops_characters_its_vocabulary_cannot_spell(smollm2):
    assert smollm2.encode("a\x04b").tokens == ["a", "b"]


# --- synthetic byte-level BPE ---


def test_byte_level_merges_and_added_tokens(tmp_path):
    tokenizer = _tokenizer(tmp_path, byte_level_vocab())

    encoding = tokenizer.encode("hello world<tool><|im_start|>")

    assert encoding.tokens == ["hello", "Ġwor", "ld", "<tool>", "<|im_start|>"]
    # <tool> is user-defined (kept when special tokens are skipped), <|im_start|> is a control token
    assert tokenizer.decode(encoding.ids) == "hello world<tool>"


def test_byte_level_text_outside_the_merges_falls_back_to_bytes(tmp_path):
    tokenizer = _tokenizer(tmp_path, byte_level_vocab())

    encoding = tokenizer.encode("hé😀")

    assert len(encoding.ids) == 1 + 2 + 4
    assert tokenizer.decode(encoding.ids) == "hé😀"


def test_byte_level_adds_bos_when_the_metadata_says_so(tmp_path):
    tokenizer = _tokenizer(tmp_path, byte_level_vocab(add_bos=True))

    assert tokenizer.encode("hello").ids == _ids(tokenizer, "<|im_start|>", "hello")
    assert tokenizer.encode("hello", add_special_tokens=False).ids == _ids(tokenizer, "hello")


@pytest.mark.parametrize(
    "pre, words",
    [
        ("gpt-2", ["12345", "Ġapples", "'ll"]),
        ("smollm", ["1", "2", "3", "4", "5", "Ġapples", "'ll"]),
        ("llama-bpe", ["123", "45", "Ġapples", "'ll"]),
    ],
)
def test_pre_tokenizer_follows_tokenizer_ggml_pre(tmp_path, pre, words):
    tokenizer = _tokenizer(tmp_path, byte_level_vocab(pre=pre))

    assert [word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str("12345 apples'll")] == words


def test_unknown_pre_tokenizer_is_unsupported_naming_it(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"tokenizer\.ggml\.pre is 'deepseek-coder'"):
        _tokenizer(tmp_path, byte_level_vocab(pre="deepseek-coder"))


def test_unknown_tokenizer_model_is_unsupported_naming_it(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"tokenizer\.ggml\.model is 'bert'"):
        _tokenizer(tmp_path, byte_level_vocab() | {"tokenizer.ggml.model": "bert"})


@pytest.mark.parametrize(
    "vocab_change, message",
    [
        ({"tokenizer.ggml.merges": ["h e x"]}, r"merges entry 'h e x' is not two tokens"),
        ({"tokenizer.ggml.merges": ["h zz"]}, r"vocabulary or merges are inconsistent"),
        ({"tokenizer.ggml.token_type": [1, 1]}, r"token_type has 2 entries for 268 tokens"),
        ({"tokenizer.ggml.bos_token_id": 5000}, r"bos_token_id is 5000, outside the 268-token vocabulary"),
    ],
)
def test_inconsistent_vocabulary_is_a_format_error(tmp_path, vocab_change, message):
    with pytest.raises(ModelFormatError, match=message):
        _tokenizer(tmp_path, byte_level_vocab() | vocab_change)


# --- synthetic SentencePiece BPE ---


def test_sentencepiece_merges_follow_the_scores(tmp_path):
    tokenizer = _tokenizer(tmp_path, sentencepiece_vocab())

    assert tokenizer.encode("hello world").tokens == ["<s>", SPACE_MARK + "hello", SPACE_MARK + "wor", "ld"]
    assert tokenizer.encode("abc").tokens == ["<s>", SPACE_MARK, "ab", "c"]


def test_sentencepiece_falls_back_to_bytes(tmp_path):
    tokenizer = _tokenizer(tmp_path, sentencepiece_vocab())

    encoding = tokenizer.encode("hi! é")

    assert encoding.tokens == ["<s>", SPACE_MARK, "h", "<0x69>", "<0x21>", SPACE_MARK, "<0xC3>", "<0xA9>"]
    assert tokenizer.decode(encoding.ids) == "hi! é"


def test_sentencepiece_special_and_user_defined_tokens(tmp_path):
    tokenizer = _tokenizer(tmp_path, sentencepiece_vocab(add_bos=False, add_eos=True))

    # as llama.cpp does, the text after a special token starts with a space mark again
    assert tokenizer.encode("<s>hello<tool>").tokens == ["<s>", SPACE_MARK + "hello", "<tool>", "</s>"]


def test_sentencepiece_without_space_prefix(tmp_path):
    tokenizer = _tokenizer(tmp_path, sentencepiece_vocab(add_space_prefix=False))

    encoding = tokenizer.encode("hello world")

    assert encoding.tokens == ["<s>", "hello", SPACE_MARK + "wor", "ld"]
    assert tokenizer.decode(encoding.ids) == "hello world"


def test_sentencepiece_round_trips_generated_strings(tmp_path):
    tokenizer = _tokenizer(tmp_path, sentencepiece_vocab())
    # SentencePiece cannot give back a literal "▁", and special-token text decodes to nothing when skipped
    texts = [text for text in random_texts(500, seed=11) if SPACE_MARK not in text and "</s>" not in text]

    failures = [text for text in texts if tokenizer.decode(tokenizer.encode(text).ids) != text]

    assert failures == []


def test_add_bos_defaults_by_tokenizer_family(tmp_path):
    def special_tokens(vocab):
        vocab = {key: value for key, value in vocab.items() if key != "tokenizer.ggml.add_bos_token"}
        return read_special_tokens(open_gguf(write_gguf(tmp_path / "vocab.gguf", vocab, {})))

    assert special_tokens(sentencepiece_vocab()).add_bos is True
    assert special_tokens(byte_level_vocab()).add_bos is False
