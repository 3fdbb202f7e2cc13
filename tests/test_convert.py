"""convert_gguf_to_hf: a complete HF folder, written atomically, never over existing files."""

import json

import numpy as np
import pytest
from gguf_helpers.synthetic import sentencepiece_vocab, write_tiny_llama
from gguf_helpers.texts import random_texts
from safetensors import safe_open
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from conftest import require_model

from minitorch_infer.formats import convert
from minitorch_infer.formats.convert import OutputExistsError, convert_gguf_to_hf
from minitorch_infer.errors import ModelFormatError
from minitorch_infer.formats.gguf_loader import read_gguf

FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def smollm2_path():
    return require_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return read_gguf(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_converted(smollm2_path, tmp_path_factory):
    return convert_gguf_to_hf(smollm2_path, tmp_path_factory.mktemp("convert") / "smollm2")


def _json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_smollm2_folder_has_hf_files_config_and_float32_weights(smollm2, smollm2_converted):
    assert {path.name for path in smollm2_converted.iterdir()} == FILES
    assert _json(smollm2_converted / "config.json") == smollm2.config
    assert _json(smollm2_converted / "generation_config.json") == {"bos_token_id": 1, "eos_token_id": 2}
    weights = load_file(smollm2_converted / "model.safetensors")
    assert weights.keys() == smollm2.tensors.keys()
    for name, values in weights.items():
        assert values.dtype == np.float32
        np.testing.assert_array_equal(values, smollm2.tensors[name], err_msg=name)
    with safe_open(smollm2_converted / "model.safetensors", "np") as file:
        assert file.metadata() == {"format": "pt"}


def test_smollm2_tokenizer_config(smollm2, smollm2_converted):
    config = _json(smollm2_converted / "tokenizer_config.json")

    assert config["chat_template"] == smollm2.chat_template
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert (config["add_bos_token"], config["add_eos_token"]) == (False, False)
    assert config["clean_up_tokenization_spaces"] is False


def test_smollm2_tokenizer_json_encodes_like_the_gguf_tokenizer(smollm2, smollm2_converted):
    from_gguf = smollm2.tokenizer
    from_json = Tokenizer.from_file(str(smollm2_converted / "tokenizer.json"))
    texts = random_texts(300, seed=3, specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>"))

    for text in texts:
        ids = from_gguf.encode(text).ids
        assert from_json.encode(text).ids == ids, text
        assert from_json.decode(ids, skip_special_tokens=False) == from_gguf.decode(ids, skip_special_tokens=False)


def test_sentencepiece_tokenizer_json_encodes_like_the_gguf_tokenizer(tmp_path):
    gguf_path = write_tiny_llama(tmp_path / "tiny.gguf", vocab=sentencepiece_vocab(add_eos=True))

    out_dir = convert_gguf_to_hf(gguf_path, tmp_path / "hf")

    from_gguf = read_gguf(gguf_path).tokenizer
    from_json = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    for text in random_texts(200, seed=5, specials=("<s>", "</s>", "<tool>")):
        assert from_json.encode(text).ids == from_gguf.encode(text).ids, text
    assert _json(out_dir / "tokenizer_config.json")["add_eos_token"] is True


def test_converts_into_an_existing_empty_folder(tmp_path):
    (tmp_path / "hf").mkdir()

    convert_gguf_to_hf(write_tiny_llama(tmp_path / "tiny.gguf"), tmp_path / "hf")

    assert {path.name for path in (tmp_path / "hf").iterdir()} == FILES


def test_refuses_a_non_empty_folder_before_converting_and_leaves_it_alone(tmp_path, monkeypatch):
    gguf_path = write_tiny_llama(tmp_path / "tiny.gguf")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")

    def no_reading(path):
        raise AssertionError("the GGUF file must not be read when the output folder is taken")

    monkeypatch.setattr(convert, "read_gguf", no_reading)

    with pytest.raises(OutputExistsError, match=r"hf already exists"):
        convert_gguf_to_hf(gguf_path, tmp_path / "hf")

    assert [path.name for path in (tmp_path / "hf").iterdir()] == ["notes.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf", "tiny.gguf"]


def test_output_exists_error_is_also_a_file_exists_error():
    assert issubclass(OutputExistsError, FileExistsError)


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    gguf_path = write_tiny_llama(tmp_path / "tiny.gguf")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "save_file", interrupted)

    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(gguf_path, tmp_path / "hf")

    assert [path.name for path in tmp_path.iterdir()] == ["tiny.gguf"]


def test_malformed_gguf_creates_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(10))

    with pytest.raises(ModelFormatError, match="bad.gguf"):
        convert_gguf_to_hf(bad, tmp_path / "out" / "hf")

    assert [path.name for path in tmp_path.iterdir()] == ["bad.gguf"]
