"""Bad model files give one clear error naming the file, field or tensor, never a deep traceback."""

import json
import shutil
import struct

import numpy as np
import pytest

import minitorch_infer
from minitorch_infer.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from minitorch_infer.formats import model_files
from conftest import require_model


@pytest.fixture
def story_copy(tmp_path):
    source = require_model("story")
    target = tmp_path / "story"
    shutil.copytree(source, target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def rewrite_header(model_dir, edit):
    """Apply `edit` to the parsed safetensors header and write the file back with the same data."""
    path = model_dir / "model.safetensors"
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    edit(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size:])


def test_truncated_header(story_copy):
    path = story_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: header length \d+ is larger than the file"):
        minitorch_infer.load(story_copy)


def test_corrupt_header_json(story_copy):
    path = story_copy / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[10:14] = b"\xff\xfe{{"
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="header is not valid JSON"):
        minitorch_infer.load(story_copy)


def test_truncated_tensor_data(story_copy):
    path = story_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelFormatError, match="past the end of the file"):
        minitorch_infer.load(story_copy)


def test_missing_tensor(story_copy):
    rewrite_header(story_copy, lambda h: h.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelFormatError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'.*\[384, 128\]"):
        minitorch_infer.load(story_copy)


def test_wrong_shape(story_copy):
    def swap_shape(header):
        header["model.layers.0.mlp.gate_proj.weight"]["shape"] = [128, 384]
    rewrite_header(story_copy, swap_shape)
    with pytest.raises(ModelFormatError,
                       match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
                             r"\[128, 384\].*implies \[384, 128\]"):
        minitorch_infer.load(story_copy)


def test_offsets_disagree_with_shape(story_copy):
    def grow(header):
        header["model.norm.weight"]["shape"] = [256]
    rewrite_header(story_copy, grow)
    with pytest.raises(ModelFormatError, match=r"'model\.norm\.weight'.*hold 512 bytes, but F32\[256\] needs 1024"):
        minitorch_infer.load(story_copy)


def test_unsupported_tensor_dtype(story_copy):
    def to_int(header):
        header["model.norm.weight"]["dtype"] = "I32"
    rewrite_header(story_copy, to_int)
    with pytest.raises(UnsupportedModelError, match="'model.norm.weight' has dtype I32"):
        minitorch_infer.load(story_copy)


def test_config_missing_field(story_copy):
    edit_config(story_copy, hidden_size=None)
    with pytest.raises(ModelFormatError, match=r"config\.json: required field 'hidden_size' is missing"):
        minitorch_infer.load(story_copy)


def test_config_not_json(story_copy):
    (story_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match=r"config\.json: cannot read config"):
        minitorch_infer.load(story_copy)


@pytest.mark.parametrize("field, value, message", [
    ("architectures", ["BertForMaskedLM"], r"architectures = \['BertForMaskedLM'\] is not supported"),
    ("hidden_act", "gelu", "hidden_act = 'gelu' is not supported"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "rope_scaling type 'yarn' is not supported"),
])
def test_unsupported_config(story_copy, field, value, message):
    edit_config(story_copy, **{field: value})
    with pytest.raises(UnsupportedModelError, match=message):
        minitorch_infer.load(story_copy)


def test_config_with_wrong_type(story_copy):
    edit_config(story_copy, num_attention_heads="8")
    with pytest.raises(ModelFormatError, match="'num_attention_heads' = '8' must be a positive integer"):
        minitorch_infer.load(story_copy)


def test_weights_that_do_not_fit_the_config(story_copy):
    edit_config(story_copy, attention_bias=True)
    with pytest.raises(ModelFormatError, match=r"missing tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        minitorch_infer.load(story_copy)


def test_model_that_does_not_exist(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        minitorch_infer.load(tmp_path / "nothing-here")


def test_a_known_model_not_yet_fetched_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setattr(model_files, "model_search_dirs", lambda: [tmp_path])
    with pytest.raises(ModelNotFoundError, match=r"'smollm2-135m-instruct' is not downloaded yet: run "
                                                 r"`minitorch-infer fetch smollm2-135m-instruct`"):
        minitorch_infer.load("smollm2-135m-instruct")


def test_an_unknown_name_lists_the_known_names_and_says_a_path_works():
    with pytest.raises(ModelNotFoundError, match=r"'tinyllama' not found: .*known name \(story, "
                                                 r"smollm2-135m-instruct\); a model folder .* or a \.gguf file"):
        minitorch_infer.load("tinyllama")


def test_the_story_model_ships_with_the_package(tmp_path, monkeypatch):
    monkeypatch.delenv("MINITORCH_MODELS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert model_files.find_model("story") == model_files.BUNDLED_MODELS_DIR / "story"


def test_bf16_and_f16_weights_load_as_float32(story_copy):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(story_copy / "model.safetensors")
    half = {name: array.astype(np.float16) for name, array in tensors.items()}
    save_file(half, story_copy / "model.safetensors")
    model = minitorch_infer.load(story_copy)
    assert model.weights["layers.0.mlp.gate"].dtype == np.float32
    np.testing.assert_array_equal(model.weights["layers.0.mlp.gate"], half["model.layers.0.mlp.gate_proj.weight"])
