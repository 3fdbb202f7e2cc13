"""SmolLM2-135M-Instruct from its Q4_1 GGUF against transformers' outputs on the same dequantised weights."""

import json

import numpy as np

from minitorch_infer.generation.chat import render_chat_prompt

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_prompt_renders_and_tokenizes_like_the_reference(smollm2_model, smollm2_reference):
    assert render_chat_prompt(smollm2_model, MESSAGES) == smollm2_reference["prompt_ids"]
    assert smollm2_model.tokenizer.encode(smollm2_reference["prompts"]["short_text"], add_special_tokens=False) \
        == smollm2_reference["prompts"]["short_ids"]


def test_greedy_32_tokens_equal_reference(smollm2_model, smollm2_reference):
    result = smollm2_model.generate(smollm2_reference["prompt_ids"], max_new_tokens=32, greedy=True, ignore_eos=True)
    assert result.token_ids == smollm2_reference["greedy_ids"]
    # The reference text keeps special tokens; a stream leaves them out.
    assert smollm2_model.tokenizer.decode(result.token_ids, skip_special_tokens=False) == smollm2_reference["greedy_text"]
    assert result.text.startswith("The capital of France is Paris.")


def test_greedy_stops_at_eos_like_the_reference(smollm2_model, smollm2_reference):
    result = smollm2_model.generate(smollm2_reference["prompt_ids"], max_new_tokens=32, greedy=True)
    assert result.token_ids == smollm2_reference["generate_ids_eos_stop"]


def assert_top5(logits, ids, values, tolerance=1e-3):
    top5 = np.argsort(-logits, kind="stable")[:5]
    assert top5.tolist() == ids
    np.testing.assert_allclose(logits[top5], values, atol=tolerance, rtol=0)


def test_last_prompt_position_logits(smollm2_model, smollm2_reference):
    logits = smollm2_model.logits(smollm2_reference["prompt_ids"])[-1]
    assert_top5(logits, smollm2_reference["first_top5_ids"], smollm2_reference["first_top5_logits"])


def test_128_token_prompt_logits(smollm2_model, smollm2_reference):
    logits = smollm2_model.logits(smollm2_reference["prompts"]["prefill_ids"])[-1]
    expected = smollm2_reference["prefill_ids_first_top5"]
    assert_top5(logits, expected["ids"], expected["logits"])


def test_each_greedy_step_matches_the_reference_top1(smollm2_model, smollm2_reference):
    steps = smollm2_reference["step_top1"]
    steps = json.loads(steps) if isinstance(steps, str) else steps
    prompt = smollm2_reference["prompt_ids"]
    ids = prompt + smollm2_reference["greedy_ids"]
    logits = smollm2_model.logits(ids)
    for step, (top1, _margin) in enumerate(steps):
        row = logits[len(prompt) - 1 + step]
        assert int(np.argmax(row)) == ids[len(prompt) + step]
        assert abs(float(row.max()) - top1) < 1e-3
