"""read_gguf: HF config and tensors from GGUF files, the real SmolLM2 file and small synthetic ones."""

import re

import gguf.quants
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf_helpers.synthetic import (
    TinyLlama,
    byte_level_vocab,
    llama_cpp_permute,
    llama_metadata,
    random_hf_weights,
    to_gguf_tensors,
    write_gguf,
    write_tiny_llama,
)

from conftest import require_model

from minitorch_infer.errors import MinitorchError, ModelFormatError, ModelNotFoundError, UnsupportedModelError
from minitorch_infer.formats.gguf_file import open_gguf
from minitorch_infer.formats.gguf_loader import read_gguf

VOCAB = len(byte_level_vocab()["tokenizer.ggml.tokens"])


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(require_model("smollm2-135m-instruct"))


def test_smollm2_config(smollm2):
    # SmolLM2-135M-Instruct's config.json, as far as a GGUF file carries it
    assert smollm2.config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def test_smollm2_tensors_have_hf_names_shapes_and_layout(smollm2):
    layer_shapes = {
        "input_layernorm.weight": (576,),
        "self_attn.q_proj.weight": (576, 576),
        "self_attn.k_proj.weight": (192, 576),
        "self_attn.v_proj.weight": (192, 576),
        "self_attn.o_proj.weight": (576, 576),
        "post_attention_layernorm.weight": (576,),
        "mlp.gate_proj.weight": (1536, 576),
        "mlp.up_proj.weight": (1536, 576),
        "mlp.down_proj.weight": (576, 1536),
    }
    expected = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    for i in range(30):
        expected |= {f"model.layers.{i}.{name}": shape for name, shape in layer_shapes.items()}

    assert {name: array.shape for name, array in smollm2.tensors.items()} == expected
    for array in smollm2.tensors.values():
        assert array.dtype == np.float32 and array.flags.c_contiguous


def test_smollm2_weights_are_the_dequantised_file_with_q_and_k_rows_unpermuted(smollm2):
    file = open_gguf(smollm2.path)

    def gguf_py_dequantised(name):
        info = file.tensors[name]
        raw = file.tensor_bytes(name).reshape(info.shape[0], -1) if len(info.shape) == 2 else file.tensor_bytes(name)
        return gguf.quants.dequantize(raw, info.ggml_type).reshape(info.shape)

    assert file.tensors["token_embd.weight"].ggml_type == T.Q8_0
    assert file.tensors["blk.7.attn_q.weight"].ggml_type == T.Q4_1
    same_as_stored = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.layers.7.mlp.down_proj.weight": "blk.7.ffn_down.weight",
        "model.layers.7.input_layernorm.weight": "blk.7.attn_norm.weight",
    }
    for hf_name, gguf_name in same_as_stored.items():
        np.testing.assert_array_equal(smollm2.tensors[hf_name], gguf_py_dequantised(gguf_name))
    # re-applying llama.cpp's permutation must give back the rows as stored
    q_proj, k_proj = (smollm2.tensors[f"model.layers.7.self_attn.{name}.weight"] for name in ("q_proj", "k_proj"))
    np.testing.assert_array_equal(llama_cpp_permute(q_proj, 9), gguf_py_dequantised("blk.7.attn_q.weight"))
    np.testing.assert_array_equal(llama_cpp_permute(k_proj, 3), gguf_py_dequantised("blk.7.attn_k.weight"))


def test_smollm2_tokenizer_settings_and_metadata(smollm2):
    assert smollm2.add_bos_token is False
    assert smollm2.chat_template.startswith("{% for message in messages %}")
    assert smollm2.metadata["tokenizer.ggml.pre"] == "smollm"
    assert smollm2.metadata["general.architecture"] == "llama"
    assert "tokenizer.ggml.tokens" not in smollm2.metadata  # the big arrays are left out
    assert all(isinstance(value, (str, int, float, bool)) for value in smollm2.metadata.values())


def test_reads_back_the_hf_weights_llama_cpp_converted(tmp_path):
    model = TinyLlama()
    weights = random_hf_weights(model, VOCAB, tied=False, biases=True)

    loaded = read_gguf(write_tiny_llama(tmp_path / "tiny.gguf", model, weights=weights))

    assert loaded.tensors.keys() == weights.keys()
    for name, expected in weights.items():
        np.testing.assert_array_equal(loaded.tensors[name], expected, err_msg=name)
    config = loaded.config
    assert config["tie_word_embeddings"] is False
    assert (config["hidden_size"], config["num_key_value_heads"], config["vocab_size"]) == (64, 2, VOCAB)
    assert "head_dim" not in config


def test_quantised_tensors_are_dequantised_in_hf_order(tmp_path):
    model = TinyLlama()
    weights = random_hf_weights(model, VOCAB)
    quantised = {name: T.Q8_0 for name in to_gguf_tensors(weights, model) if not name.endswith("norm.weight")}
    quantised["blk.0.attn_q.weight"] = T.Q4_1
    quantised["blk.1.attn_k.weight"] = T.Q5_0

    loaded = read_gguf(write_tiny_llama(tmp_path / "tiny.gguf", model, weights=weights, tensor_types=quantised))

    # quantisation blocks lie within rows, so permuting rows commutes with the quantisation round trip
    hf_types = {"model.layers.0.self_attn.q_proj.weight": T.Q4_1, "model.layers.1.self_attn.k_proj.weight": T.Q5_0}
    for name, expected in weights.items():
        ggml_type = hf_types.get(name, T.F32 if name.endswith("norm.weight") else T.Q8_0)
        if ggml_type != T.F32:
            expected = gguf.quants.dequantize(gguf.quants.quantize(expected, ggml_type), ggml_type)
        np.testing.assert_array_equal(loaded.tensors[name], expected, err_msg=name)


def test_head_dim_is_set_when_key_length_is_not_hidden_over_heads(tmp_path):
    model = TinyLlama(key_length=32)

    loaded = read_gguf(write_tiny_llama(tmp_path / "tiny.gguf", model))

    assert loaded.config["head_dim"] == 32
    assert loaded.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)


def test_optional_metadata_defaults_and_linear_rope_scaling(tmp_path):
    model = TinyLlama(kv_heads=4)
    path = write_tiny_llama(
        tmp_path / "tiny.gguf",
        model,
        drop_metadata=("llama.attention.head_count_kv", "llama.rope.freq_base"),
        extra_metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
    )

    config = read_gguf(path).config

    assert config["num_key_value_heads"] == 4
    assert config["rope_theta"] == 10000.0
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_missing_file_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nothing.gguf"):
        read_gguf(tmp_path / "nothing.gguf")


def test_bad_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(100))

    with pytest.raises(ModelFormatError, match=rf"{path}.*magic"):
        read_gguf(path)


@pytest.fixture
def tiny_file(tmp_path):
    return write_tiny_llama(tmp_path / "tiny.gguf")


@pytest.mark.parametrize(
    "where, message",
    [
        ("in the header", r"23 bytes is too short to be a GGUF file"),
        ("in the metadata", r"file ends inside metadata 'tokenizer\.ggml\.tokens' \(item 267 of 268\)"),
        ("in the tensor directory", r"file ends inside dimensions of tensor 'token_embd\.weight'"),
        ("in the tensor data", r"tensor '.*' data \(bytes \d+ to \d+\) runs past the end of the file"),
    ],
)
def test_truncated_file_is_a_format_error_naming_file_and_place(tiny_file, where, message):
    content = tiny_file.read_bytes()
    name_in_directory = content.index(b"token_embd.weight")
    cut = {
        "in the header": 24 - 1,
        # inside "<tool>", the last token: the next key's name and 8-byte length follow it
        "in the metadata": content.index(b"tokenizer.ggml.token_type") - 8 - 2,
        "in the tensor directory": name_in_directory + len("token_embd.weight") + 8,  # after the dim count
        "in the tensor data": len(content) - 100,
    }[where]
    tiny_file.write_bytes(content[:cut])

    with pytest.raises(ModelFormatError, match=re.escape(f"{tiny_file}: ") + message):
        read_gguf(tiny_file)


@pytest.mark.parametrize(
    "key",
    [
        "llama.embedding_length",
        "llama.block_count",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.context_length",
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
    ],
)
def test_missing_metadata_key_is_named(tmp_path, key):
    path = write_tiny_llama(tmp_path / "tiny.gguf", drop_metadata=(key,))

    with pytest.raises(ModelFormatError, match=rf"{tmp_path}.*'{key}' is missing"):
        read_gguf(path)


def test_metadata_of_the_wrong_type_is_named(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf", extra_metadata={"llama.block_count": "two"})

    with pytest.raises(ModelFormatError, match=r"'llama\.block_count' should be int, got str 'two'"):
        read_gguf(path)


def test_tensor_shape_inconsistent_with_metadata(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf", extra_metadata={"llama.feed_forward_length": 128})

    with pytest.raises(ModelFormatError, match=r"tensor 'blk\.0\.ffn_gate\.weight' has shape \[96, 64\].*\[128, 64\]"):
        read_gguf(path)


def test_missing_tensor_is_named(tmp_path):
    model = TinyLlama()
    tensors = to_gguf_tensors(random_hf_weights(model, VOCAB), model)
    del tensors["blk.1.ffn_down.weight"]
    path = write_gguf(tmp_path / "tiny.gguf", llama_metadata(model) | byte_level_vocab(), tensors)

    with pytest.raises(ModelFormatError, match=r"1 tensors are missing: blk\.1\.ffn_down\.weight"):
        read_gguf(path)


def test_layer_beyond_block_count(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf", extra_metadata={"llama.block_count": 1})

    with pytest.raises(ModelFormatError, match=r"'blk\.1\..*' is beyond llama\.block_count = 1"):
        read_gguf(path)


def test_other_architecture_is_unsupported_naming_it(tmp_path):
    tensors = {"token_embd.weight": np.zeros((VOCAB, 8))}
    path = write_gguf(tmp_path / "gpt2.gguf", byte_level_vocab(), tensors, arch="gpt2")

    with pytest.raises(UnsupportedModelError, match=r"general\.architecture is 'gpt2'"):
        read_gguf(path)


@pytest.mark.parametrize(
    "name, message",
    [
        ("rope_freqs.weight", r"rope_freqs\.weight.*not supported"),
        ("blk.0.attn_sinks.weight", r"'blk\.0\.attn_sinks\.weight' is not part of"),
    ],
)
def test_unknown_tensor_is_unsupported(tmp_path, name, message):
    model = TinyLlama()
    tensors = to_gguf_tensors(random_hf_weights(model, VOCAB), model) | {name: np.ones(32, dtype=np.float32)}
    path = write_gguf(tmp_path / "tiny.gguf", llama_metadata(model) | byte_level_vocab(), tensors)

    with pytest.raises(UnsupportedModelError, match=message):
        read_gguf(path)


def test_unsupported_tensor_type_is_refused_naming_tensor_and_type(tmp_path):
    model = TinyLlama(hidden=256, layers=1)  # rows of 256 values: one Q2_K block each
    tensors = to_gguf_tensors(random_hf_weights(model, VOCAB), model)
    tensors["blk.0.ffn_gate.weight"] = np.zeros((model.ffn, GGML_QUANT_SIZES[T.Q2_K][1]), dtype=np.uint8)
    path = write_gguf(
        tmp_path / "tiny.gguf",
        llama_metadata(model) | byte_level_vocab(),
        tensors,
        tensor_types={"blk.0.ffn_gate.weight": T.Q2_K},
    )

    with pytest.raises(UnsupportedModelError, match=r"'blk\.0\.ffn_gate\.weight' has type Q2_K"):
        read_gguf(path)


def test_damaged_files_raise_only_our_errors(tiny_file):
    """Random byte changes and truncations of the header: load or raise a MinitorchError, nothing else."""
    content = tiny_file.read_bytes()
    header_end = min(info.offset for info in open_gguf(tiny_file).tensors.values())
    rng = np.random.default_rng(1234)
    for trial in range(300):
        damaged = bytearray(content)
        if trial % 3 == 0:
            damaged = damaged[: rng.integers(0, len(content))]
        else:
            for at in rng.integers(0, header_end, size=rng.integers(1, 4)):
                damaged[at] = rng.integers(0, 256)
        tiny_file.write_bytes(bytes(damaged))
        try:
            read_gguf(tiny_file)
        except MinitorchError:
            pass
        except Exception as error:  # noqa: BLE001 - any other exception is the failure this test looks for
            pytest.fail(f"trial {trial}: {type(error).__name__}: {error}")
