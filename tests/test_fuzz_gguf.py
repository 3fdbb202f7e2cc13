"""Fuzzing GGUF files: damaged files load or fail with a documented error naming the file.

Seeds are two tiny llama files: a byte-level BPE vocabulary with float32 tensors, and a SentencePiece
vocabulary with quantised tensors (Q8_0, Q4_0, Q4_1, Q5_0, F16, BF16). Each case damages one of them:
a header field set to a corrupt value (magic, version, counts, metadata types and lengths, tensor
dimensions, types and offsets), a metadata value replaced by one of another type or size (or removed),
or raw damage (cut short, bit flips, overwritten bytes) aimed mostly at the header. A file that loads must
then work (fuzz_helpers.usage).
"""

import itertools
import struct

import pytest
from fuzz_helpers.byte_mutations import Damage, damaged
from fuzz_helpers.contract import FUZZ_SETTINGS, FuzzTally
from fuzz_helpers.gguf_fields import field_set, header_fields
from fuzz_helpers.usage import use_model
from gguf import GGMLQuantizationType as T
from gguf_helpers.synthetic import (
    TinyLlama,
    byte_level_vocab,
    llama_metadata,
    random_hf_weights,
    sentencepiece_vocab,
    to_gguf_tensors,
    write_gguf,
)
from hypothesis import given
from hypothesis import strategies as st

import minitorch_infer
from minitorch_infer.backends import quantized
from minitorch_infer.errors import ModelFormatError
from minitorch_infer.quantized import BLOCK_TYPES

BPE_MODEL = TinyLlama(hidden=16, heads=2, kv_heads=1, ffn=16, layers=1, context=64)
QUANTISED_MODEL = TinyLlama(hidden=32, heads=2, kv_heads=1, ffn=32, layers=1, context=64)
QUANTISED_TYPES = {"blk.0.attn_q.weight": T.Q8_0, "blk.0.attn_k.weight": T.Q4_0, "blk.0.ffn_up.weight": T.Q4_1,
                   "blk.0.ffn_down.weight": T.Q5_0, "token_embd.weight": T.F16, "blk.0.ffn_gate.weight": T.BF16}

# What a metadata value may be replaced by: the writer stores ints as u32/i32, floats as f32, lists as arrays.
metadata_values = st.one_of(
    st.integers(-(2**31), 2**32 - 1), st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, -1]),
    st.floats(width=32), st.booleans(), st.text(max_size=8),
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4), st.lists(st.text(max_size=4), max_size=4),
    st.lists(st.floats(width=32), max_size=4), st.just([]),
)


class Seed:
    """A GGUF file and what it was written from, so a case can rewrite it with edited metadata."""

    def __init__(self, path, model: TinyLlama, vocab: dict, tensor_types: dict):
        self.metadata = llama_metadata(model) | vocab
        self.tensors = to_gguf_tensors(random_hf_weights(model, len(vocab["tokenizer.ggml.tokens"])), model)
        self.tensor_types = tensor_types
        self.raw = write_gguf(path, self.metadata, self.tensors, tensor_types=tensor_types).read_bytes()
        self.fields = header_fields(self.raw)
        self.header_end = self.fields[-1].offset + 8


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Compile (or load) the quantised kernels once, before any case: Numba's one-time work allocates ~17 MB,
    which is not the loader's allocation the contract bounds per byte of file."""
    quantized.warm_up(set(BLOCK_TYPES))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-seeds")
    return {
        "bpe-f32": Seed(folder / "bpe.gguf", BPE_MODEL, byte_level_vocab(), {}),
        "spm-quantised": Seed(folder / "spm.gguf", QUANTISED_MODEL, sentencepiece_vocab(), QUANTISED_TYPES),
    }


@st.composite
def metadata_edit(draw, seed: Seed, path) -> Damage:
    key = draw(st.sampled_from(sorted(seed.metadata)))
    metadata = dict(seed.metadata)
    if draw(st.integers(0, 3)) == 0:
        del metadata[key]
        description = f"metadata {key} removed"
    else:
        metadata[key] = draw(metadata_values)
        description = f"metadata {key} = {metadata[key]!r:.60}"
    write_gguf(path, metadata, seed.tensors, tensor_types=seed.tensor_types)
    return Damage(description, path.read_bytes())


def damaged_gguf(seeds: dict, scratch) -> st.SearchStrategy[tuple[str, Damage]]:
    def for_seed(name: str) -> st.SearchStrategy[tuple[str, Damage]]:
        seed = seeds[name]
        damage = st.one_of(field_set(seed.raw, seed.fields), field_set(seed.raw, seed.fields),
                           metadata_edit(seed, scratch), damaged(seed.raw, focus=seed.header_end))
        return damage.map(lambda change: (name, change))

    return st.sampled_from(sorted(seeds)).flatmap(for_seed)


def test_damaged_gguf_files_load_or_fail_clearly(seeds, tmp_path, record_property):
    tally = FuzzTally("gguf")
    case_numbers = itertools.count()

    @FUZZ_SETTINGS
    @given(damaged_gguf(seeds, tmp_path / "rewritten.gguf"))
    def case(damage):
        _, change = damage
        path = tmp_path / f"case{next(case_numbers)}.gguf"
        path.write_bytes(change.content)
        try:
            tally.run(lambda: use_model(minitorch_infer.load(path)), must_name=str(path),
                      file_bytes=len(change.content))
        finally:
            path.unlink()

    case()
    tally.report(record_property, "ok", "ModelFormatError")


def test_a_corrupt_block_count_is_refused_before_anything_is_built_per_layer(seeds, tmp_path):
    """Found by this fuzzer: one flipped bit in llama.block_count (1 -> 131073) made loading list and trace
    131,073 layers (minutes, and memory growing with them) before finding their tensors missing."""
    seed = seeds["bpe-f32"]
    path = write_gguf(tmp_path / "model.gguf", seed.metadata | {"llama.block_count": 131073}, seed.tensors)
    with pytest.raises(ModelFormatError, match=r"llama\.block_count is 131073, but the file holds tensors for 1 "
                                               r"layers"):
        minitorch_infer.load(path)


def test_a_key_length_that_swallows_the_header_gives_a_short_message(seeds, tmp_path):
    """Found by this fuzzer: a key length field set too large made the key swallow the next kilobyte of the
    header, and every message quoted all of it."""
    seed = seeds["bpe-f32"]
    damage = bytearray(seed.raw)
    key_length = next(f for f in seed.fields if f.label == "length of metadata key #14")
    struct.pack_into("<Q", damage, key_length.offset, 1000)
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(damage))
    with pytest.raises(ModelFormatError) as refused:
        minitorch_infer.load(path)
    assert len(str(refused.value)) < len(str(path)) + 200, str(refused.value)
