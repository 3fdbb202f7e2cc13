"""Streaming detokenisation: the pieces always add up to the full decode, never split a character, and
cost a small window per token. Three tokenizers: the story model's SentencePiece-style BPE (leading-space
stripping, no byte tokens), and two built here so that CJK and emoji span several tokens: a byte-level
BPE (GPT-2/SmolLM2 style) and a SentencePiece-style BPE with byte fallback (Llama 2 style, `<0xE4>`)."""

import string

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from conftest import require_model
from minitorch_infer.generation.detokenizer import IncrementalDetokenizer
from minitorch_infer.errors import ModelFormatError

END_OF_TEXT = "<|endoftext|>"

MIXED_TEXT = "Hello 世界! 🙂👍🏽 naïve café — 日本語のテキスト, 한국어, Ελληνικά 🇯🇵."
STORY_TEXT = (
    "Once upon a time there was a little dog named Spot. Spot liked to run and play in the park.\n"
    'Lily and Ben were happy. They said, "Thank you, Mom!"  Then  they  ran.'
)


def train_byte_level_bpe() -> Tokenizer:
    """A byte-level BPE with few merges: most non-ASCII characters stay split into single bytes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [STORY_TEXT, "the cat sat on the mat with the hat", "世界 世界 你好 🙂 🙂", "hello hello world"] * 3
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def build_byte_fallback_bpe() -> Tokenizer:
    """Llama 2's tokenizer.json layout: spaces as "▁", one prepended, any character outside the small
    vocabulary spelled as <0xNN> byte tokens; the decoder strips the leading space again."""
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he")]
    pieces = ["<unk>", "<s>", END_OF_TEXT, *(f"<0x{byte:02X}>" for byte in range(256)), "▁"]
    pieces += [*string.ascii_letters, *string.digits, *".,!?", *("".join(pair) for pair in merges)]
    vocab = {piece: token_id for token_id, piece in enumerate(pieces)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(["<unk>", "<s>", END_OF_TEXT])
    return tokenizer


# Module level rather than fixtures, so that they can parametrize tests.
BYTE_LEVEL = train_byte_level_bpe()
BYTE_FALLBACK = build_byte_fallback_bpe()

multibyte_tokenizers = pytest.mark.parametrize(
    "tokenizer", [BYTE_LEVEL, BYTE_FALLBACK], ids=["byte-level", "byte-fallback"]
)
# Byte 0xE4, the lead byte of many CJK characters, as each tokenizer spells it.
LEAD_BYTE = {id(BYTE_LEVEL): "ä", id(BYTE_FALLBACK): "<0xE4>"}


def stream_pieces(tokenizer, generated_ids, prompt_ids=(), skip_special_tokens=True) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    return [detokenizer.push(token_id) for token_id in generated_ids] + [detokenizer.flush()]


def random_ids(tokenizer: Tokenizer) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, tokenizer.get_vocab_size() - 1), max_size=40)


# --- multibyte characters -----------------------------------------------------------------------------------


@multibyte_tokenizers
def test_multibyte_characters_are_held_until_complete(tokenizer):
    ids = tokenizer.encode(MIXED_TEXT).ids
    pieces = stream_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == MIXED_TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") >= 10  # the emoji and CJK bytes really were split over tokens


@multibyte_tokenizers
@settings(max_examples=100)
@given(text=st.text(max_size=60))
def test_any_text_round_trips_through_the_stream_without_replacement_characters(tokenizer, text):
    assume("\ufffd" not in text and "▁" not in text)  # "▁" is the byte-fallback tokenizer's space
    pieces = stream_pieces(tokenizer, tokenizer.encode(text).ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


@multibyte_tokenizers
@settings(max_examples=100)
@given(data=st.data(), skip_special_tokens=st.booleans())
def test_any_token_sequence_streams_to_its_full_decode(tokenizer, data, skip_special_tokens):
    # Random ids include invalid UTF-8: the U+FFFD that decode produces must appear in the stream too.
    # Random ids, or a fixed case: special tokens among multibyte characters, starting mid-character
    # for the byte-level tokenizer.
    special_between_characters = tokenizer.encode(f"🙂{END_OF_TEXT}世").ids[1:] + [tokenizer.token_to_id(END_OF_TEXT)]
    ids = data.draw(st.one_of(random_ids(tokenizer), st.just(special_between_characters)))
    streamed = "".join(stream_pieces(tokenizer, ids, skip_special_tokens=skip_special_tokens))
    decoded = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if tokenizer is BYTE_FALLBACK and "\ufffd" in decoded:
        # The documented exception: byte fallback invalidates a whole byte run, even bytes already emitted.
        assert "\ufffd" in streamed
    else:
        assert streamed == decoded


def test_byte_fallback_invalid_run_differs_from_decode_only_in_replacement_characters():
    ids = [BYTE_FALLBACK.token_to_id("<0x41>"), BYTE_FALLBACK.token_to_id("<0x80>")]  # "A", then a stray byte
    assert BYTE_FALLBACK.decode(ids) == "\ufffd\ufffd"
    assert "".join(stream_pieces(BYTE_FALLBACK, ids)) == "A\ufffd"


@multibyte_tokenizers
def test_invalid_bytes_show_as_replacement_at_flush(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(tokenizer.token_to_id(LEAD_BYTE[id(tokenizer)])) == ""
    assert detokenizer.flush() == "\ufffd"


@multibyte_tokenizers
def test_special_tokens_are_skipped_or_kept_as_asked(tokenizer):
    ids = tokenizer.encode(f"hi 🙂{END_OF_TEXT} there").ids
    assert tokenizer.token_to_id(END_OF_TEXT) in ids
    skipped = tokenizer.decode(ids)
    assert END_OF_TEXT not in skipped
    assert "".join(stream_pieces(tokenizer, ids)) == skipped
    kept = tokenizer.decode(ids, skip_special_tokens=False)
    assert END_OF_TEXT in kept
    assert "".join(stream_pieces(tokenizer, ids, skip_special_tokens=False)) == kept


@multibyte_tokenizers
@settings(max_examples=60)
@given(prompt=st.text(max_size=30), completion=st.text(min_size=1, max_size=30))
def test_prompt_context_makes_the_stream_the_text_added_after_the_prompt(tokenizer, prompt, completion):
    ids = tokenizer.encode(prompt + completion).ids
    full_text = tokenizer.decode(ids)
    for split in range(1, len(ids)):
        prompt_text = tokenizer.decode(ids[:split])
        if prompt_text.endswith("\ufffd"):
            continue  # the prompt ends mid-character: no well-defined "text after the prompt"
        streamed = "".join(stream_pieces(tokenizer, ids[split:], prompt_ids=ids[:split]))
        assert streamed == full_text[len(prompt_text) :]


@multibyte_tokenizers
def test_prompt_ending_in_multibyte_characters_gives_the_stream_clean_context(tokenizer):
    # The last 5 prompt tokens begin inside "界"'s bytes; the context must step back to a character start.
    prompt = tokenizer.encode("你好世界").ids
    ids = tokenizer.encode("你好世界再见 ok").ids
    assert ids[: len(prompt)] == prompt
    assert "".join(stream_pieces(tokenizer, ids[len(prompt) :], prompt_ids=prompt)) == "再见 ok"


# --- the story model's SentencePiece-style tokenizer -----------------------------------------------------------


@pytest.fixture(scope="module")
def story() -> Tokenizer:
    return Tokenizer.from_file(str(require_model("story") / "tokenizer.json"))


def test_story_text_streams_to_its_decode(story):
    ids = story.encode(STORY_TEXT).ids  # starts with BOS, which decode keeps (tokenizers 0.23)
    pieces = stream_pieces(story, ids)
    assert "".join(pieces) == story.decode(ids)
    assert "".join(stream_pieces(story, ids[1:])) == STORY_TEXT
    assert "".join(stream_pieces(story, ids, skip_special_tokens=False)) == story.decode(
        ids, skip_special_tokens=False
    )


def test_story_prompt_context_keeps_the_first_tokens_leading_space(story):
    ids = story.encode(STORY_TEXT).ids
    full_text = story.decode(ids)
    leading_space_matters = 0
    for split in range(1, len(ids)):
        expected = full_text[len(story.decode(ids[:split])) :]
        assert "".join(stream_pieces(story, ids[split:], prompt_ids=ids[:split])) == expected
        # Decoding the generated ids alone strips their leading space; the stream with context must not.
        leading_space_matters += story.decode(ids[split:]) != expected
    assert leading_space_matters >= 5


def test_story_first_token_after_prompt_gets_its_space(story):
    prompt = story.encode("Spot liked to run").ids
    ids = story.encode("Spot liked to run and play").ids
    assert ids[: len(prompt)] == prompt
    completion = ids[len(prompt) :]
    assert story.decode(completion) == "and play"  # what a context-free decode gives
    assert "".join(stream_pieces(story, completion, prompt_ids=prompt)) == " and play"


@settings(max_examples=100)
@given(ids=st.lists(st.integers(0, 2047), max_size=40), skip_special_tokens=st.booleans())
@example(ids=[1, 80, 80, 1288, 2, 0, 80, 139], skip_special_tokens=True)  # BOS, EOS, <unk> among "▁" runs
@example(ids=[1, 80, 80, 1288, 2, 0, 80, 139], skip_special_tokens=False)
def test_any_story_token_sequence_streams_to_its_full_decode(story, ids, skip_special_tokens):
    # The 2,048-token vocabulary's special ids 0-2 and runs of "▁", whose leading space the decoder strips.
    assert story.get_vocab_size() == 2048
    pieces = stream_pieces(story, ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == story.decode(ids, skip_special_tokens=skip_special_tokens)


# --- cost ------------------------------------------------------------------------------------------------------


class DecodeRecorder:
    """Wraps a tokenizer and records how many ids each decode call was given."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoder = tokenizer.decoder
        self.decoded_lengths: list[int] = []

    def get_added_tokens_decoder(self):
        return self.tokenizer.get_added_tokens_decoder()

    def get_vocab_size(self):
        return self.tokenizer.get_vocab_size()

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@multibyte_tokenizers
def test_each_token_decodes_a_small_window_not_the_whole_output(tokenizer):
    ids = tokenizer.encode(MIXED_TEXT * 20).ids
    recorder = DecodeRecorder(tokenizer)
    split = next(split for split in range(50, len(ids)) if not tokenizer.decode(ids[:split]).endswith("\ufffd"))
    prompt, generated = ids[:split], ids[split:]
    detokenizer = IncrementalDetokenizer(recorder, prompt)    # decodes its special tokens, and its plain texts
    recorder.decoded_lengths.clear()
    pieces = [detokenizer.push(token_id) for token_id in generated] + [detokenizer.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)[len(tokenizer.decode(prompt)) :]
    # At most about two decodes per token, each of a few tokens (the longest character here spans 4 byte
    # tokens), however long the output grows.
    assert len(recorder.decoded_lengths) <= 2 * len(generated)
    assert max(recorder.decoded_lengths) <= 12


class PanicException(BaseException):
    """Named as pyo3's Rust-panic type, which cannot be imported; the engine recognises it by name."""


class FailingDecoder:
    """A tokenizer whose decode fails as a damaged tokenizer.json can make the real one fail."""

    decoder = None

    def __init__(self, failure: BaseException):
        self.failure = failure

    def get_added_tokens_decoder(self):
        return {}

    def decode(self, ids, skip_special_tokens=True):
        if ids:
            raise self.failure
        return ""


@pytest.mark.parametrize("failure", [PanicException("index out of bounds"), Exception("bad decoder")],
                         ids=["panic", "exception"])
def test_a_decoder_that_fails_is_a_format_error_naming_the_file(failure):
    detokenizer = IncrementalDetokenizer(FailingDecoder(failure), source="/models/x/tokenizer.json")
    with pytest.raises(ModelFormatError, match=r"/models/x/tokenizer.json: cannot decode token ids \[7\]"):
        detokenizer.push(7)


def test_ctrl_c_inside_decode_is_not_turned_into_an_error():
    with pytest.raises(KeyboardInterrupt):
        IncrementalDetokenizer(FailingDecoder(KeyboardInterrupt())).push(7)


# --- a plain token's text, known once ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    from minitorch_infer.formats.gguf_file import open_gguf
    from minitorch_infer.formats.gguf_tokenizer import build_tokenizer

    return build_tokenizer(open_gguf(require_model("smollm2-135m-instruct")))


def _steady_push_written_plainly(tokenizer, context_id: int, token_id: int) -> str:
    """What pushing token_id emits after the context token alone, by the stream's rule, from two decodes."""
    context = tokenizer.decode([context_id], skip_special_tokens=False)
    text = tokenizer.decode([context_id, token_id], skip_special_tokens=False)
    return "" if len(text) <= len(context) or text.endswith("\ufffd") else text[len(context):]


def build_strip_two() -> Tokenizer:
    """A decoder that strips two leading spaces, so that a first token whose text is one space leaves the
    second token's space to strip."""
    tokenizer = Tokenizer(models.WordLevel({"▁": 0, "▁a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 2, 0)])
    return tokenizer


STRIP_TWO = build_strip_two()


@pytest.mark.parametrize("name", ["byte-level", "byte-fallback", "strip-two", "story", "smollm2"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_steady_push_emits_what_decoding_its_pair_gives(request, name, data):
    """Every steady push (one token of context, nothing held back), through the plain tokens' texts where both
    tokens are plain, against decoding the pair: random pairs of five tokenizers' vocabularies, byte and added
    tokens among them, tokens whose text the decoder strips away, and the same token twice."""
    tokenizer = ({"byte-level": BYTE_LEVEL, "byte-fallback": BYTE_FALLBACK, "strip-two": STRIP_TWO}.get(name)
                 or request.getfixturevalue(name))
    vocabulary = st.integers(0, tokenizer.get_vocab_size() - 1)
    context_id, token_id = data.draw(vocabulary), data.draw(st.one_of(vocabulary, st.just(None)))
    token_id = context_id if token_id is None else token_id
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    detokenizer._window, detokenizer._read_offset = [context_id], 1      # the steady state, on context_id
    detokenizer._context_text = tokenizer.decode([context_id], skip_special_tokens=False)
    assert detokenizer.push(token_id) == _steady_push_written_plainly(tokenizer, context_id, token_id)


def test_a_plain_token_after_any_plain_token_costs_no_decode(story):
    """Once plain tokens have been pushed, pushing them after one another decodes nothing, in pairs never seen
    before too; after a token that is not plain (a lone "▁", whose text the decoder strips alone), it does."""
    recorder = DecodeRecorder(story)
    dog, ran, space = story.token_to_id("dog▁"), story.token_to_id("ran"), story.token_to_id("▁")
    detokenizer = IncrementalDetokenizer(recorder, skip_special_tokens=False)
    assert [detokenizer.push(token) for token in (dog, ran)] == ["dog ", "ran"]
    decodes = len(recorder.decoded_lengths)
    pairs = [(ran, ran), (ran, dog), (dog, dog), (dog, ran)]
    assert ([detokenizer.push(token) for _, token in pairs]
            == [_steady_push_written_plainly(story, *pair) for pair in pairs] == ["ran", "dog ", "dog ", "ran"])
    assert len(recorder.decoded_lengths) == decodes
    assert [detokenizer.push(token) for token in (space, dog)] == [" ", "dog "]
    assert len(recorder.decoded_lengths) > decodes


class JoinedInPython:
    """A decoder written in Python (tokenizers' Decoder.custom), which cannot be serialised."""

    def decode(self, tokens):
        return "".join(tokens)

    def decode_chain(self, tokens):
        return tokens


@pytest.mark.parametrize("decoder, joins", [
    (decoders.ByteLevel(), True),
    (decoders.Metaspace(), True),
    (decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                        decoders.Strip(" ", 1, 0)]), True),
    (decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")]), False),   # could replace across two
    (decoders.Sequence([decoders.Fuse(), decoders.Strip(" ", 0, 1)]), False),    # strips the last token's end
    (decoders.Sequence([decoders.ByteLevel(), decoders.Fuse()]), False),          # a second join
    (decoders.CTC(), False),                                                       # drops repeated tokens
    (decoders.WordPiece(), False),                                                 # joins "##" pieces
    (None, False),                                                                 # joins with spaces
    (decoders.Decoder.custom(JoinedInPython()), False),                            # nothing to read
])
def test_only_decoders_that_join_texts_end_to_end_use_the_plain_texts(decoder, joins):
    from minitorch_infer.generation.detokenizer import _joins_texts_end_to_end

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.decoder = decoder
    assert _joins_texts_end_to_end(tokenizer) is joins


def test_a_decoder_written_in_python_streams_by_the_pair_memo():
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.decoder = decoders.Decoder.custom(JoinedInPython())
    assert "".join(stream_pieces(tokenizer, [0, 1, 0, 0])) == tokenizer.decode([0, 1, 0, 0]) == "abaa"
