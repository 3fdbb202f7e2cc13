"""Tests of the test oracle itself (tests/oracle), against what transformers computed.

- The real story model against transformers' reference outputs (tests/fixtures/reference, transformers 5.23):
  greedy tokens exactly, logits to 1e-4.
- The HF golden fixtures (tests/fixtures/hf_golden, made by tests/oracle/make_hf_golden.py): every
  position's logits to 1e-4 and the greedy continuation exactly.
- Properties that pin the semantics independently of HF: causality, the sliding-window boundary, GQA as
  MHA with repeated key/value heads, when dynamic and llama3 RoPE reduce to plain RoPE.
- The tiny model writer: files read back exactly, by this loader and by safetensors itself.

Nothing here imports minitorch_infer (nor conftest, which does): the oracle must stay independent.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from oracle import llama_numpy
from oracle.llama_numpy import forward, greedy, load_hf_dir, model_settings, read_safetensors, weight_shapes
from oracle.tiny_models import TEST_SEQUENCE_LENGTH, random_configs, to_storage, write_tiny_model

TESTS = Path(__file__).resolve().parent
STORY_DIR = TESTS.parent / "models" / "story"            # ships with the checkout
REFERENCE_DIR = TESTS / "fixtures" / "reference"          # transformers' outputs, copied from ../shared/reference
HF_GOLDEN = TESTS / "fixtures" / "hf_golden"
GOLDEN_FIXTURES = sorted(path.name for path in HF_GOLDEN.iterdir() if path.is_dir())

LOGITS_ATOL = 1e-4  # float32 transformers vs the float64 oracle differ by ~1e-5 on these models


def top5(logits: np.ndarray) -> tuple:
    ids = np.argsort(-logits, kind="stable")[:5]
    return ids.tolist(), logits[ids]


# ----------------------------------------------------------------------------------------------
# The story model against transformers' reference outputs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def story():
    config, weights = load_hf_dir(STORY_DIR)
    reference = json.loads((REFERENCE_DIR / "reference_outputs.json").read_text())["story"]
    prompts = json.loads((REFERENCE_DIR / "prompts.json").read_text())["story"]
    return config, weights, reference, prompts


def test_story_greedy_32_tokens_equal_reference(story):
    config, weights, reference, _ = story
    assert greedy(config, weights, reference["prompt_ids"], 32) == reference["greedy_ids"]


def test_story_top5_at_last_prompt_position(story):
    config, weights, reference, _ = story
    ids, logits = top5(forward(config, weights, reference["prompt_ids"])[-1])
    assert ids == reference["first_top5_ids"]
    np.testing.assert_allclose(logits, reference["first_top5_logits"], rtol=0, atol=LOGITS_ATOL)


def test_story_top5_after_128_token_prefill(story):
    config, weights, reference, prompts = story
    ids, logits = top5(forward(config, weights, prompts["prefill_ids"])[-1])
    assert ids == reference["prefill_ids_first_top5"]["ids"]
    np.testing.assert_allclose(logits, reference["prefill_ids_first_top5"]["logits"], rtol=0, atol=LOGITS_ATOL)


# ----------------------------------------------------------------------------------------------
# HF golden fixtures
# ----------------------------------------------------------------------------------------------


def load_golden(name: str) -> tuple:
    directory = HF_GOLDEN / name
    config, weights = load_hf_dir(directory)
    expected = json.loads((directory / "expected.json").read_text())
    return config, weights, expected, np.load(directory / "logits.npy")


def test_golden_fixtures_are_all_there():
    # Guards the parametrized tests below against silently running on nothing.
    assert len(GOLDEN_FIXTURES) == 8, GOLDEN_FIXTURES


@pytest.mark.parametrize("name", GOLDEN_FIXTURES)
def test_golden_logits_of_every_position(name):
    config, weights, expected, hf_logits = load_golden(name)
    logits = forward(config, weights, expected["input_ids"])
    assert logits.shape == hf_logits.shape
    np.testing.assert_allclose(logits, hf_logits, rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("name", GOLDEN_FIXTURES)
def test_golden_greedy_continuation(name):
    config, weights, expected, _ = load_golden(name)
    assert greedy(config, weights, expected["input_ids"], len(expected["greedy_ids"])) == expected["greedy_ids"]


@pytest.mark.parametrize("name", GOLDEN_FIXTURES)
def test_weight_shapes_name_what_save_pretrained_wrote(name):
    config, weights, _, _ = load_golden(name)
    assert {name: tuple(array.shape) for name, array in weights.items()} == weight_shapes(config)


@pytest.mark.parametrize(
    "file", ["llama_gqa_llama3/model.safetensors", "llama_linear_tied_fp16/model.safetensors"]
)
def test_safetensors_reader_agrees_with_safetensors_library(file):
    # F32 and F16 files written by torch; the BF16 one is checked by its fixture's logits.
    ours = read_safetensors(HF_GOLDEN / file)
    theirs = load_file(HF_GOLDEN / file)
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == np.float32
        np.testing.assert_array_equal(ours[name], theirs[name].astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Properties of the oracle that hold whatever HF does
# ----------------------------------------------------------------------------------------------


def tiny(tmp_path, **overrides) -> tuple:
    return write_tiny_model(tmp_path / "model", overrides, seed=7)


def random_ids(config: dict, n: int, seed: int = 0) -> list:
    return np.random.default_rng(seed).integers(0, config["vocab_size"], n).tolist()


def test_logits_at_a_position_ignore_later_tokens(tmp_path):
    config, weights = tiny(tmp_path)
    ids = random_ids(config, 12)
    changed = ids[:8] + [(t + 1) % config["vocab_size"] for t in ids[8:]]
    before, after = forward(config, weights, ids), forward(config, weights, changed)
    np.testing.assert_array_equal(before[:8], after[:8])
    assert not np.allclose(before[8:], after[8:])


def test_sliding_window_covers_the_token_itself_and_window_minus_1_before_it(tmp_path):
    # One layer, window 4: position 10 reads positions 7..10 (HF: kv_idx > q_idx - sliding_window).
    config, weights = tiny(tmp_path, model_type="mistral", num_hidden_layers=1, sliding_window=4)
    ids = random_ids(config, 11)
    base = forward(config, weights, ids)[10]

    def logits_with_token_changed(position):
        changed = list(ids)
        changed[position] = (changed[position] + 1) % config["vocab_size"]
        return forward(config, weights, changed)[10]

    np.testing.assert_array_equal(logits_with_token_changed(6), base)
    assert not np.allclose(logits_with_token_changed(7), base)


def test_gqa_equals_mha_with_each_kv_head_repeated_for_its_query_heads(tmp_path):
    config, weights = tiny(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    head_dim = config["hidden_size"] // 4
    mha_config = {**config, "num_key_value_heads": 4}
    mha_weights = dict(weights)
    for i in range(config["num_hidden_layers"]):
        for projection in ("k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{projection}.weight"
            heads = weights[name].reshape(2, head_dim, -1)  # [kv heads, head_dim, hidden]
            # Query heads 0 and 1 read kv head 0; 2 and 3 read kv head 1.
            mha_weights[name] = np.repeat(heads, 2, axis=0).reshape(4 * head_dim, -1)
    ids = random_ids(config, 10)
    np.testing.assert_allclose(forward(mha_config, mha_weights, ids), forward(config, weights, ids), atol=1e-12)


def test_dynamic_rope_is_plain_rope_until_the_sequence_outgrows_max_positions(tmp_path):
    config, weights = tiny(tmp_path, max_position_embeddings=10)
    dynamic = {**config, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    ids = random_ids(config, 11)
    np.testing.assert_array_equal(forward(dynamic, weights, ids[:10]), forward(config, weights, ids[:10]))
    # At 11 tokens the base grows for every position, the first ones included.
    assert not np.allclose(forward(dynamic, weights, ids)[:10], forward(config, weights, ids)[:10])


def test_dynamic_rope_base_follows_the_ntk_formula():
    config = {"num_attention_heads": 2, "hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 8,
              "vocab_size": 5, "max_position_embeddings": 10, "rope_theta": 100.0,
              "rope_scaling": {"type": "dynamic", "factor": 3.0}}
    settings = model_settings(config)
    # head_dim 8; at 25 tokens: base = 100 * (3 * 25 / 10 - 2) ** (8 / 6).
    base = 100.0 * (3 * 25 / 10 - 2) ** (8 / 6)
    expected = 1.0 / base ** (np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(llama_numpy.rope_inverse_frequencies(settings, seq_len=25), expected, rtol=1e-14)


def test_llama3_rope_with_factor_1_is_plain_rope(tmp_path):
    config, weights = tiny(tmp_path)
    llama3 = {**config, "rope_scaling": {"rope_type": "llama3", "factor": 1.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    ids = random_ids(config, 10)
    np.testing.assert_allclose(forward(llama3, weights, ids), forward(config, weights, ids), atol=1e-12)


def test_linear_rope_divides_every_frequency_by_factor():
    config = {"num_attention_heads": 2, "hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 8,
              "vocab_size": 5, "max_position_embeddings": 10}
    plain = llama_numpy.rope_inverse_frequencies(model_settings(config), seq_len=4)
    linear = {**config, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}
    np.testing.assert_allclose(llama_numpy.rope_inverse_frequencies(model_settings(linear), seq_len=4), plain / 4)


def test_tied_checkpoint_may_store_the_shared_matrix_as_lm_head(tmp_path):
    config, weights = tiny(tmp_path, tie_word_embeddings=True)
    renamed = dict(weights)
    renamed["lm_head.weight"] = renamed.pop("model.embed_tokens.weight")
    ids = random_ids(config, 6)
    np.testing.assert_array_equal(forward(config, renamed, ids), forward(config, weights, ids))


def test_qwen2_without_use_sliding_window_ignores_sliding_window():
    config = {"model_type": "qwen2", "num_hidden_layers": 3, "sliding_window": 4, "max_window_layers": 1}
    assert llama_numpy.sliding_windows(config, "qwen2", 3) == [None, None, None]
    config["use_sliding_window"] = True
    assert llama_numpy.sliding_windows(config, "qwen2", 3) == [None, 4, 4]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope type 'yarn'"),
        ({"num_key_value_heads": 3}, "num_key_value_heads 3"),
    ],
)
def test_unsupported_configs_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        model_settings({"num_attention_heads": 4, "hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 8,
                        "vocab_size": 5, "max_position_embeddings": 10, **overrides})


# ----------------------------------------------------------------------------------------------
# Tiny random models
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shards", [1, 3])
def test_tiny_model_reads_back_exactly_what_was_returned(tmp_path, dtype, shards):
    config, weights = write_tiny_model(tmp_path, {"attention_bias": True}, dtype=dtype, shards=shards, seed=3)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shards > 1)
    assert len(list(tmp_path.glob("*.safetensors"))) == shards
    loaded_config, loaded_weights = load_hf_dir(tmp_path)
    assert loaded_config == config
    assert set(loaded_weights) == set(weights) == set(weight_shapes(config))
    for name, array in weights.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(loaded_weights[name], array)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tiny_model_files_read_by_safetensors_library(tmp_path, dtype):
    _, weights = write_tiny_model(tmp_path, {}, dtype=dtype)
    stored = load_file(tmp_path / "model.safetensors")
    assert {name: array.dtype for name, array in stored.items()} == {name: np.dtype(dtype) for name in weights}
    for name, array in weights.items():
        np.testing.assert_array_equal(stored[name].astype(np.float32), array)


def test_bfloat16_rounds_to_nearest_even():
    one = 1.0
    values = np.array(
        [one, -2.25, one + 2.0**-8, one + 3 * 2.0**-8, one + 2.0**-8 + 2.0**-20, 3.0e-3], dtype=np.float32
    )
    # 1 + 2^-8 lies halfway between bf16 0x3F80 and 0x3F81 (ties to the even 0x3F80); 1 + 3 * 2^-8 halfway
    # between 0x3F81 and 0x3F82 (to 0x3F82); just above halfway rounds up.
    expected = [0x3F80, 0xC010, 0x3F80, 0x3F82, 0x3F81, 0x3B45]
    assert to_storage(values, "bfloat16").tolist() == expected


def test_random_configs_are_deterministic():
    assert random_configs() == random_configs()
    assert random_configs(n=30, seed=5)[:24] == random_configs(n=24, seed=5)
    assert random_configs(seed=1) != random_configs(seed=2)


def test_random_configs_cover_every_feature(tmp_path):
    configs = [write_tiny_model(tmp_path / str(i), overrides)[0] for i, overrides in enumerate(random_configs())]
    settings = [model_settings(config) for config in configs]
    assert len(configs) >= 24
    assert {s.num_heads // s.num_kv_heads for s in settings if s.num_kv_heads > 1} >= {1, 2, 4}
    assert any(s.num_kv_heads == 1 and s.num_heads > 1 for s in settings)  # MQA
    assert {s.tie_word_embeddings for s in settings} == {True, False}
    assert any(s.head_dim * s.num_heads != s.hidden_size for s in settings)
    assert {37, 101} <= {s.vocab_size for s in settings}
    assert {s.rope["rope_type"] for s in settings} == {"default", "linear", "dynamic", "llama3"}
    spellings = {
        ("rope_parameters" if c.get("rope_parameters") else "type" if "type" in c["rope_scaling"] else "rope_type",
         s.rope["rope_type"])
        for c, s in zip(configs, settings)
        if s.rope["rope_type"] != "default"
    }
    assert len(spellings) == 3 * 3
    assert all(s.max_position_embeddings < TEST_SEQUENCE_LENGTH for s in settings if s.rope["rope_type"] == "dynamic")
    windows = [w for s in settings for w in s.sliding_windows if w is not None]
    assert windows and max(windows) < TEST_SEQUENCE_LENGTH
    assert {s.model_type for s in settings if any(s.sliding_windows)} == {"mistral", "qwen2"}
    assert any(s.model_type == "qwen2" and not any(s.sliding_windows) for s in settings)
    assert any(s.model_type == "qwen2" and None in s.sliding_windows and any(s.sliding_windows) for s in settings)
    assert any(s.model_type == "llama" and s.qkv_bias and s.o_bias for s in settings)
    assert any(s.mlp_bias for s in settings)
    assert {s.num_layers for s in settings} == {1, 2, 3}
    assert all(16 <= s.hidden_size <= 64 for s in settings)


@pytest.mark.parametrize("index", range(24))
def test_random_config_gives_usable_logits(tmp_path, index):
    config, weights = write_tiny_model(tmp_path, random_configs()[index], dtype="bfloat16", seed=index)
    logits = forward(config, weights, random_ids(config, TEST_SEQUENCE_LENGTH, seed=index))
    assert np.isfinite(logits).all()
    # Neither flat nor exploding, and not the same prediction everywhere.
    assert 0.5 < logits.std() < 20 and np.abs(logits).max() < 100
    assert len(set(np.argmax(logits, axis=-1).tolist())) > 1
