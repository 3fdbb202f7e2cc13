"""`convert` turns the SmolLM2 GGUF into an HF folder that loads to the same model: same ids, same logits."""

import numpy as np
import pytest

import minitorch_infer
from minitorch_infer.formats.convert import convert_gguf_to_hf
from conftest import require_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    gguf = require_model("smollm2-135m-instruct")
    folder = convert_gguf_to_hf(gguf, tmp_path_factory.mktemp("convert") / "smollm2-hf")
    return minitorch_infer.load(folder, context=256)


def test_converted_folder_gives_the_same_logits(converted, smollm2_model, smollm2_reference):
    ids = smollm2_reference["prompt_ids"]
    # The GGUF model computes from its Q4_1 blocks, the converted folder from their float32 values: the same
    # products summed in another order (in panels, a block of 2-4 rows of x keeps 2-4 interleaved sums where
    # the float32 kernel keeps one; elsewhere the tiled kernel's 8-lane partial sums against BLAS). After 30
    # layers that moves logits of up to ~30 by up to ~2e-4 (7e-6 relative); a wrong value moves them more.
    np.testing.assert_allclose(converted.logits(ids), smollm2_model.logits(ids), atol=3e-4, rtol=0)


def test_converted_folder_keeps_tokenizer_template_and_eos(converted, smollm2_model):
    text = "Hello, world! 日本語 🎉 <|im_start|>user\n"
    assert converted.tokenizer.encode(text, add_special_tokens=False) == \
        smollm2_model.tokenizer.encode(text, add_special_tokens=False)
    assert converted.tokenizer.chat_template == smollm2_model.tokenizer.chat_template
    assert converted.config.eos_token_ids == smollm2_model.config.eos_token_ids
    reply = converted.chat().send("What is the capital of France?", greedy=True, max_new_tokens=8)
    assert reply.text.startswith("The capital of France is Paris")
