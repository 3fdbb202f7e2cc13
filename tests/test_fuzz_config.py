"""Fuzzing config.json: a damaged config loads a model that runs, or fails with a documented error naming
the file.

The weights stay those of the seed (a tiny one-layer model), so most edits that change a size must be
caught as a mismatch with the weights, before any work is sized from the config. An edit that loads
must give a model whose logits are finite: a config that silently produces NaN (a negative epsilon, a
degenerate rope setting) is as wrong as a crash.
"""

import itertools
import json
import shutil

import numpy as np
import pytest
from fuzz_helpers.contract import FUZZ_SETTINGS, FuzzTally
from fuzz_helpers.json_mutations import json_values, mutated_json
from hypothesis import given
from hypothesis import strategies as st
from oracle.tiny_models import write_tiny_model

import minitorch_infer
from minitorch_infer.errors import ModelFormatError, UnsupportedModelError

TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 32, "max_position_embeddings": 64}
# Keys the engine reads, whether or not the seed has them, and a few it ignores.
KEYS = ["architectures", "hidden_act", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta",
        "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
        "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "bos_token_id",
        "eos_token_id", "model_type", "torch_dtype"]

rope_settings = st.fixed_dictionaries(
    {"rope_type": st.sampled_from(["default", "linear", "dynamic", "llama3", "yarn", 3])},
    optional={"type": st.sampled_from(["linear", "su"]), "factor": json_values,
              "low_freq_factor": json_values, "high_freq_factor": json_values,
              "original_max_position_embeddings": json_values, "rope_theta": json_values})
config_values = st.one_of(
    json_values, json_values, rope_settings,
    st.sampled_from([["LlamaForCausalLM"], ["MistralForCausalLM"], ["Qwen2ForCausalLM"], ["GPT2LMHeadModel"], [],
                     "LlamaForCausalLM", "gelu", "silu", ["sliding_attention"], ["full_attention", "full_attention"]]),
)


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("config-seed")
    write_tiny_model(folder, TINY)
    return folder


def load_and_run(folder):
    model = minitorch_infer.load(folder)
    logits = model.logits([1, 2, 3][:model.context])   # several positions, so RoPE angles are not all zero
    assert np.isfinite(logits).all(), f"{folder}/config.json loads, but its logits are not finite"


def test_damaged_configs_load_a_working_model_or_fail_clearly(seed, tmp_path, record_property):
    tally = FuzzTally("config.json")
    config = json.loads((seed / "config.json").read_text())
    case_numbers = itertools.count()

    @FUZZ_SETTINGS
    @given(mutated_json(config, config_values, keys=[(key,) for key in KEYS]))
    def case(change):
        folder = tmp_path / f"case{next(case_numbers)}"
        shutil.copytree(seed, folder)
        (folder / "config.json").write_bytes(change.content)
        try:
            tally.run(lambda: load_and_run(folder), must_name=str(folder / "config.json"),
                      file_bytes=sum(path.stat().st_size for path in folder.iterdir()))
        finally:
            shutil.rmtree(folder)

    case()
    tally.report(record_property, "ok", "ModelFormatError")


@pytest.mark.parametrize("edit, error, message", [
    # each of these once crashed, hung, allocated without bound or gave NaN logits
    ({"rope_theta": 1e-300}, ModelFormatError, "rope_theta = 1e-300 must be a finite number >= 1"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 1e-300}}, ModelFormatError,
     r"rope_scaling\['factor'\] = 1e-300 must be a finite number >= 1"),
    ({"rms_norm_eps": float("nan")}, ModelFormatError, "rms_norm_eps = nan must be a finite number >= 0"),
    ({"rms_norm_eps": 10**400}, ModelFormatError, r"rms_norm_eps = 1000+\.\.\. must be a finite number"),
    ({"architectures": [[]]}, UnsupportedModelError, r"architectures = \[\[\]\] is not supported"),
    ({"eos_token_id": [[]]}, ModelFormatError, r"eos_token_id = \[\[\]\] must be token ids in 0\.\.31"),
    ({"bos_token_id": 32}, ModelFormatError, r"bos_token_id = 32 must be token ids in 0\.\.31"),
    ({"num_hidden_layers": 10**9}, ModelFormatError, "'num_hidden_layers' = 1000000000 is implausibly large"),
    ({"num_hidden_layers": 5000}, ModelFormatError, "num_hidden_layers = 5000, but .* holds tensors for 1 layers"),
])
def test_what_the_fuzzer_found_stays_fixed(seed, tmp_path, edit, error, message):
    folder = tmp_path / "model"
    shutil.copytree(seed, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | edit))
    with pytest.raises(error, match=message):
        minitorch_infer.load(folder)
