"""Fuzzing a model folder's tokenizer files: tokenizer.json, tokenizer_config.json, generation_config.json.

The seed is a tiny model with a small BPE tokenizer (SentencePiece-style spaces, <s> and </s>) and a
chat template. Each case damages one of the three files, structurally (any value, anywhere, replaced by
one of another kind, or removed) or as text. A folder that loads must then work (fuzz_helpers.usage).
Loading fails only with a documented error naming the file.
"""

import itertools
import json
import shutil

import pytest
from fuzz_helpers.contract import FUZZ_SETTINGS, FuzzTally
from fuzz_helpers.json_mutations import mutated_json
from fuzz_helpers.usage import use_model
from hypothesis import given
from hypothesis import strategies as st
from oracle.tiny_models import write_tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

import minitorch_infer
from minitorch_infer.errors import ModelFormatError

TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 64, "max_position_embeddings": 64}
SPECIALS = ["<unk>", "<s>", "</s>"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz") + ["▁"]
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("▁", "w"), ("o", "r"), ("▁w", "or")]
TOKENIZER_CONFIG = {
    "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
    "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}",
}
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [2]}
FILES = ["tokenizer.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def write_tokenizer(folder) -> None:
    vocab = {token: index for index, token in enumerate(SPECIALS + LETTERS + ["".join(m) for m in MERGES])}
    tokenizer = Tokenizer(models.BPE(vocab, MERGES, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer-seed")
    write_tiny_model(folder, TINY)
    write_tokenizer(folder)
    return folder


def load_and_use(folder) -> None:
    use_model(minitorch_infer.load(folder))


def test_damaged_tokenizer_files_load_a_working_tokenizer_or_fail_clearly(seed, tmp_path, record_property):
    tally = FuzzTally("tokenizer files")
    originals = {name: json.loads((seed / name).read_text()) for name in set(FILES)}
    damage = st.sampled_from(FILES).flatmap(
        lambda name: mutated_json(originals[name]).map(lambda change: (name, change)))
    case_numbers = itertools.count()

    @FUZZ_SETTINGS
    @given(damage)
    def case(named_change):
        name, change = named_change
        folder = tmp_path / f"case{next(case_numbers)}"
        shutil.copytree(seed, folder)
        (folder / name).write_bytes(change.content)
        try:
            tally.run(lambda: load_and_use(folder), must_name=str(folder / name),
                      file_bytes=sum(path.stat().st_size for path in folder.iterdir()))
        finally:
            shutil.rmtree(folder)

    case()
    tally.report(record_property, "ok", "ModelFormatError")


def test_a_tokenizer_that_panics_when_used_fails_to_load_naming_the_file(seed, tmp_path):
    """Found by this fuzzer: a post-processor template naming a special token it does not define loads
    fine, then makes the tokenizers library panic (a BaseException) on the first encode."""
    folder = tmp_path / "model"
    shutil.copytree(seed, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["post_processor"]["special_tokens"] = {}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ModelFormatError, match=r"tokenizer\.json: the tokenizer fails on a test text \(the "
                                               r"tokenizers library panicked: no entry found for key\)"):
        minitorch_infer.load(folder)


@pytest.mark.parametrize("name, edit, message", [
    ("tokenizer_config.json", {"chat_template": [None]},
     r"tokenizer_config\.json: chat_template = \[None\] must be a string or a list"),
    ("tokenizer_config.json", {"add_bos_token": "false"},
     r"tokenizer_config\.json: add_bos_token = 'false' must be true, false or null"),
    ("generation_config.json", {"eos_token_id": [-1]},
     r"generation_config\.json: eos_token_id = \[-1\] must be token ids in 0\.\.63"),
])
def test_what_the_fuzzer_found_in_the_settings_files_stays_fixed(seed, tmp_path, name, edit, message):
    folder = tmp_path / "model"
    shutil.copytree(seed, folder)
    settings = json.loads((folder / name).read_text())
    (folder / name).write_text(json.dumps(settings | edit))
    with pytest.raises(ModelFormatError, match=message):
        minitorch_infer.load(folder)


def test_a_tokenizer_with_ids_past_the_models_vocabulary_is_refused(seed, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(seed, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["xyz"] = 64
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ModelFormatError, match=r"tokenizer\.json: the tokenizer has token ids up to 64, but the "
                                               r"model's vocabulary .* ends at 63"):
        minitorch_infer.load(folder)
