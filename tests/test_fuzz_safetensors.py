"""Fuzzing safetensors model folders: damaged files load or fail with a documented error naming the file.

Seeds are tiny models (one layer, hidden 16) as float32, bfloat16, and float16 in two shards with an
index. Each case damages one file: a structural edit of the JSON header (dtype, shape, data_offsets, whole
entries, __metadata__), an absurd header length, raw damage to the bytes, or an edit of the shard index.
"""

import itertools
import json
import shutil
import struct

import numpy as np
import pytest
from fuzz_helpers import contract
from fuzz_helpers.byte_mutations import Damage, damaged
from fuzz_helpers.contract import FUZZ_SETTINGS, FuzzTally
from fuzz_helpers.json_mutations import ABSURD_INTS, edited, json_values, mutated_json
from hypothesis import given
from hypothesis import strategies as st
from oracle.tiny_models import write_tiny_model

import minitorch_infer
from minitorch_infer.errors import ModelFormatError

TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 32, "max_position_embeddings": 64}
SEEDS = {"f32": ("float32", 1), "bf16": ("bfloat16", 1), "f16-sharded": ("float16", 2)}

dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "f32", ""])
sizes = st.sampled_from(ABSURD_INTS) | st.integers(0, 20_000)
tensor_fields = st.one_of(
    dtypes, st.lists(sizes, max_size=5), st.lists(sizes, min_size=2, max_size=2), sizes, json_values)


def split_header(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join_header(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def tensor_field_paths(header: dict) -> list[tuple]:
    """Where the damage that matters goes: each entry, each of its fields and their items, __metadata__."""
    places = [("__metadata__",)]
    for name, entry in header.items():
        if name != "__metadata__":
            places += [(name,), (name, "dtype"), (name, "shape"), (name, "data_offsets"),
                       (name, "data_offsets", 0), (name, "data_offsets", 1), (name, "shape", 0)]
    return places


@st.composite
def header_edit(draw, raw: bytes) -> Damage:
    header, data = split_header(raw)
    header, done = draw(edited(header, tensor_fields, keys=tensor_field_paths(header)))
    return Damage(f"header: {done}", join_header(header, data))


def header_length(raw: bytes) -> st.SearchStrategy[Damage]:
    lengths = st.sampled_from([0, 1, 2, len(raw) - 8, len(raw) - 7, 2**63, 2**64 - 1]) | st.integers(0, len(raw))
    return lengths.map(lambda length: Damage(f"header length {length}", struct.pack("<Q", length) + raw[8:]))


def file_mutations(raw: bytes) -> st.SearchStrategy[Damage]:
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    return st.one_of(header_edit(raw), header_edit(raw), header_length(raw), damaged(raw, focus=header_end))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Seed name -> {file name: bytes} for each seed model folder."""
    folders = {}
    for name, (dtype, shards) in SEEDS.items():
        folder = tmp_path_factory.mktemp(name)
        write_tiny_model(folder, TINY, dtype=dtype, shards=shards)
        folders[name] = {path.name: path.read_bytes() for path in folder.iterdir()}
    return folders


@st.composite
def damaged_file(draw, seeds: dict) -> tuple[str, str, Damage]:
    """(seed, file name, damage) for one of the seed's weight files or its shard index."""
    seed = draw(st.sampled_from(sorted(seeds)))
    files = seeds[seed]
    target = draw(st.sampled_from(sorted(name for name in files if name != "config.json")))
    if target.endswith(".json"):
        return seed, target, draw(mutated_json(json.loads(files[target])))
    return seed, target, draw(file_mutations(files[target]))


def test_damaged_safetensors_folders_load_or_fail_clearly(seeds, tmp_path, record_property):
    tally = FuzzTally("safetensors")
    case_numbers = itertools.count()

    @FUZZ_SETTINGS
    @given(damaged_file(seeds))
    def case(damage):
        seed, target, change = damage
        files = seeds[seed] | {target: change.content}
        folder = tmp_path / f"case{next(case_numbers)}"
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content)
        try:
            tally.run(lambda: minitorch_infer.load(folder), must_name=str(folder),
                      file_bytes=sum(map(len, files.values())))
        finally:
            shutil.rmtree(folder)

    case()
    tally.report(record_property, "ok", "ModelFormatError")


def test_the_contract_catches_hangs_big_allocations_stray_errors_and_vague_messages(monkeypatch):
    """The fuzzers are only as good as this contract, so each of its checks must be able to fail."""
    tally = FuzzTally("contract")

    def hang():
        while True:
            pass

    def vague():
        raise ModelFormatError("something is wrong")

    def stray():
        raise ValueError("from deep inside")

    with monkeypatch.context() as short_limit:
        short_limit.setattr(contract, "CASE_SECONDS", 0.2)
        with pytest.raises(AssertionError, match="stopped after 0.2 s"):
            tally.run(hang, must_name="model.safetensors", file_bytes=100)
    with pytest.raises(AssertionError, match="peak allocation"):
        tally.run(lambda: np.ones(100 * 2**20, np.uint8), must_name="model.safetensors", file_bytes=100)
    with pytest.raises(AssertionError, match="does not name model.safetensors"):
        tally.run(vague, must_name="model.safetensors", file_bytes=100)
    with pytest.raises(ValueError):
        tally.run(stray, must_name="model.safetensors", file_bytes=100)
    tally.run(lambda: None, must_name="model.safetensors", file_bytes=100)
    assert tally.outcomes == {"ok": 1}


@pytest.mark.parametrize("seed_name, target, edit, message", [
    # each of these once ended in a TypeError, IsADirectoryError, OSError or a message of a thousand characters
    ("bf16", "model.safetensors", lambda h: h["lm_head.weight"].update(dtype=[]),
     r"tensor 'lm_head\.weight': unknown dtype \[\]"),
    ("bf16", "model.safetensors", lambda h: h["lm_head.weight"].update(data_offsets=[0, 10**400]),
     r"'lm_head\.weight' ends at byte 1000+\.\.\. of the data section, past the end of the file"),
    ("f16-sharded", "model.safetensors.index.json", lambda i: i["weight_map"].update({"lm_head.weight": ".."}),
     r"weight_map\['lm_head\.weight'\] = '\.\.' is not a file name in the model folder"),
    ("f16-sharded", "model.safetensors.index.json", lambda i: i["weight_map"].update({"lm_head.weight": "a" * 300}),
     r"shard 'aaaa+\.\.\. is missing"),
])
def test_what_the_fuzzer_found_stays_fixed(seeds, tmp_path, seed_name, target, edit, message):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, content in seeds[seed_name].items():
        (folder / name).write_bytes(content)
    if target.endswith(".json"):
        document = json.loads(seeds[seed_name][target])
        edit(document)
        (folder / target).write_text(json.dumps(document))
    else:
        header, data = split_header(seeds[seed_name][target])
        edit(header)
        (folder / target).write_bytes(join_header(header, data))
    with pytest.raises(ModelFormatError, match=message):
        minitorch_infer.load(folder)
