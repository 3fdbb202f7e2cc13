"""Chat sessions on SmolLM2: KV reuse across turns, rollback, reset, several sessions, and refusals."""

import numpy as np
import pytest

import minitorch_infer
from minitorch_infer.errors import ContextOverflowError, KVCacheFullError
from conftest import require_model


def test_turn_two_prefills_only_its_own_tokens_and_matches_a_fresh_run(smollm2_model):
    with smollm2_model.chat() as session:
        session.send("What is the capital of France?", greedy=True, max_new_tokens=12)
        cached = session.cached_tokens
        before = list(session.token_ids)
        second = session.send("And of Italy?", greedy=True, max_new_tokens=8)
        conversation = second.prompt_ids
        assert conversation[:len(before)] == before
        own_text = "<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"
        own_tokens = smollm2_model.tokenizer.encode(own_text, add_special_tokens=False)
        # Everything turn 1 ran is reused; only its last sampled token (never run) and turn 2's text are fed.
        assert cached == len(before) - 1
        assert second.stats.prompt_tokens == len(conversation) - cached <= len(own_tokens) + 1
        fresh = smollm2_model.generate(conversation, greedy=True, max_new_tokens=8)
        assert fresh.token_ids == second.token_ids

        session.sequence.truncate(cached)
        cached_logits = smollm2_model.forward(session.sequence, conversation[cached:])
    np.testing.assert_allclose(cached_logits, smollm2_model.logits(conversation)[-1], atol=1e-4, rtol=0)


def test_rollback_undoes_the_last_turn(smollm2_model):
    with smollm2_model.chat(system="You are terse.") as session:
        first = session.send("Name a colour.", greedy=True, max_new_tokens=6)
        tokens_after_first = list(session.token_ids)
        session.send("Name an animal.", greedy=True, max_new_tokens=6)
        session.rollback()
        assert session.token_ids == tokens_after_first
        assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
        assert session.cached_tokens <= len(tokens_after_first)
        again = session.send("Name a fruit.", greedy=True, max_new_tokens=6)
    with smollm2_model.chat(system="You are terse.") as fresh:
        fresh.send("Name a colour.", greedy=True, max_new_tokens=6)
        assert fresh.send("Name a fruit.", greedy=True, max_new_tokens=6).token_ids == again.token_ids
    assert first.text


def test_reset_starts_over(smollm2_model):
    with smollm2_model.chat() as session:
        first = session.send("Hi!", greedy=True, max_new_tokens=5)
        session.reset()
        assert session.cached_tokens == 0 and session.messages == []
        assert session.send("Hi!", greedy=True, max_new_tokens=5).token_ids == first.token_ids


def test_streamed_turn_equals_sent_turn(smollm2_model):
    with smollm2_model.chat() as a, smollm2_model.chat() as b:
        sent = a.send("Say hello.", greedy=True, max_new_tokens=8)
        stream = b.stream("Say hello.", greedy=True, max_new_tokens=8)
        assert "".join(stream) == sent.text == stream.result.text


def test_sessions_are_limited_only_by_the_kv_pool():
    model = minitorch_infer.load(require_model("smollm2-135m-instruct"), context=64, kv_memory="128tokens")
    for question in ["Hi", "Hello", "Hey", "Yo", "Hi again", "One more", "And another"]:
        model.chat().send(question, greedy=True, max_new_tokens=2)      # dropped without close()
    assert model.kv_cache.open_sequences == 0 and model.kv_cache.used_blocks == 0
    first, second, third = model.chat(), model.chat(), model.chat()
    first.send("word " * 20, max_new_tokens=4)
    second.send("text " * 20, max_new_tokens=4)
    with pytest.raises(KVCacheFullError, match="the KV cache is full: all 8 blocks of 16 positions are in use"):
        third.send("more " * 20, max_new_tokens=4)
    assert third.cached_tokens == 0
    second.close()
    with pytest.raises(ContextOverflowError, match=r"do not fit: the sequence holds \d+ of 64"):
        third.send("word " * 80, max_new_tokens=4)
    reply = third.send("Hi", greedy=True, max_new_tokens=200)
    assert reply.finish_reason in ("stop", "context")
    first.close()
