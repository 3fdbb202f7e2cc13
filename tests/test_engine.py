"""The engine on the real story model: cache consistency, chunking, both backends, memory behaviour."""

import tracemalloc

import numpy as np
import pytest

import minitorch_infer
from minitorch_infer.backends import reference
from minitorch_infer.backends.layout import StepLayout
from minitorch_infer.errors import ContextOverflowError, KVCacheFullError, MinitorchError
from conftest import require_model


def full_recompute_last_logits(model, ids):
    return model.logits(ids)[-1]


def test_prefill_then_decode_equals_full_recompute(story_model, story_reference):
    ids = story_reference["prompts"]["prefill_ids"][:40]
    expected = story_model.logits(ids)
    sequence = story_model.kv_cache.open()
    try:
        story_model.forward(sequence, ids[:25])
        for position in range(25, 40):
            logits = story_model.decode_step(sequence, ids[position])
            np.testing.assert_allclose(logits, expected[position], atol=2e-5, rtol=0)
    finally:
        sequence.close()


def test_chunked_prefill_equals_one_shot():
    path = require_model("story")
    chunked = minitorch_infer.load(path, prefill_chunk=7)
    one_shot = minitorch_infer.load(path, prefill_chunk=128)
    ids = list(range(3, 103))
    np.testing.assert_allclose(chunked.logits(ids), one_shot.logits(ids), atol=2e-5, rtol=0)


def test_numpy_backend_equals_reference_backend(story_model):
    graph = story_model.graph
    ids = np.array([1, 80, 147, 201, 282, 57])
    inputs = {"tokens": ids, "positions": np.arange(len(ids))}
    state = {name: np.zeros(v.type.concrete_shape(), np.float32) for name, v in graph.states.items()}
    params = {name: story_model.weights[name] for name in graph.params}
    bindings = {"S": len(ids), "T": len(ids)}
    (expected,) = reference.run(graph, params, inputs, state, bindings)
    actual = story_model.logits(ids)[-1]
    np.testing.assert_allclose(actual, expected[-1], atol=2e-5, rtol=0)


def test_decode_step_allocates_no_activation_memory():
    # A model of its own: in a pool that other tests left fragmented, crossing into a new block allocates a
    # little bookkeeping to find one, which is not what this test is about.
    story_model = minitorch_infer.load(require_model("story"))
    sequence = story_model.kv_cache.open()
    try:
        story_model.forward(sequence, [1, 80, 147])
        for token in (201, 282):             # warm up: binds the one-token program
            story_model.decode_step(sequence, token)
        tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for token in range(300, 340):
            story_model.decode_step(sequence, token)
        after, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        sequence.close()
    # NumPy's array headers (~100 bytes each) come and go; a fresh buffer for the step's activations would
    # show as kilobytes: one decode step's temps sum to `step_bytes`.
    step_bytes = sum(v.type.nbytes({"S": 1, "R": 1, "T": 1}) for v in story_model.graph.values()
                     if v.kind == "temp")
    assert peak - before < step_bytes / 4, f"a decode step allocated {peak - before} of {step_bytes} bytes"
    # What stays is bookkeeping: the token id of each new position (for prefix sharing), ~60 bytes each.
    assert after - before < 1024 + 64 * 40, "decode steps keep memory"


def test_every_buffer_is_float32(story_model):
    program = story_model.program
    assert story_model.memory_plan.arena_bytes > 0
    for value in story_model.graph.values():
        if value.kind in ("temp", "output", "param", "state"):
            assert value.type.dtype == "f32", value
    for name in story_model.graph.params:
        assert story_model.weights[name].dtype == np.float32
    (logits,) = program.run({"tokens": np.array([1]), "positions": np.array([0])}, story_model.kv_cache.arrays,
                            StepLayout.single(1, 1))
    assert logits.dtype == np.float32


def test_rollback_then_refeed_gives_the_same_logits(story_model):
    sequence = story_model.kv_cache.open()
    try:
        first = story_model.forward(sequence, [1, 80, 147, 201])
        story_model.forward(sequence, [500, 600, 700])
        sequence.truncate(3)
        again = story_model.forward(sequence, [201])
        np.testing.assert_allclose(again, first, atol=2e-5, rtol=0)
    finally:
        sequence.close()


def test_overflowing_the_context_is_refused_before_any_work():
    model = minitorch_infer.load(require_model("story"), context=16, prefill_chunk=8)
    with pytest.raises(ContextOverflowError, match="17 tokens exceed the context length 16"):
        model.logits(list(range(1, 18)))
    sequence = model.kv_cache.open()
    try:
        model.forward(sequence, list(range(1, 11)))
        with pytest.raises(ContextOverflowError, match="holds 10 of 16"):
            model.forward(sequence, list(range(1, 8)))
        assert sequence.length == 10          # nothing was written
    finally:
        sequence.close()


def test_generation_stops_at_the_end_of_the_context():
    model = minitorch_infer.load(require_model("story"), context=16, prefill_chunk=8)
    result = model.generate([1, 80, 147, 201, 282, 57], max_new_tokens=100, greedy=True, ignore_eos=True)
    assert result.finish_reason == "context"
    assert len(result.token_ids) == 16 - 6 + 1   # the last token is sampled from the last position's logits


def test_the_kv_pool_hands_out_blocks_and_takes_them_back():
    model = minitorch_infer.load(require_model("story"), kv_memory="64tokens", context=32)
    first, second = model.kv_cache.open(), model.kv_cache.open()
    first.reserve(32)
    second.reserve(17)
    assert model.kv_cache.used_blocks == 4 and model.kv_cache.open_sequences == 2
    third = model.kv_cache.open()
    with pytest.raises(KVCacheFullError, match="all 4 blocks of 16 positions are in use"):
        third.reserve(1)
    first.close()
    third.reserve(20)
    del third                                        # dropped without close(): the finalizer returns its blocks
    second.close()
    assert model.kv_cache.open_sequences == 0 and model.kv_cache.used_blocks == 0


def test_a_full_pool_reuses_the_blocks_registered_longest_ago_and_keeps_the_newest_prefix():
    """Freed full blocks stay registered (warm) for prefixes to come; when no cold block is left, a new one is
    taken from the warm blocks registered first, so the prefix seen last is the one still found."""
    model = minitorch_infer.load(require_model("story"), kv_memory="64tokens", context=64)
    cache = model.kv_cache
    older, newer, fresh = ([int(t) for t in np.arange(32) + base] for base in (100, 200, 300))
    for tokens in (older, newer):
        sequence = cache.open()
        sequence.reserve(len(tokens))
        sequence.advance(tokens)
        sequence.close()
    assert cache.used_blocks == 0 and len(cache._key_of) == 4          # all four blocks warm
    taker = cache.open()
    taker.reserve(32)                                                   # takes two warm blocks
    taker.advance(fresh)
    finder = cache.open()
    assert finder.share_prefix(newer + [1]) == 32                       # the newer prefix is whole
    finder.close()
    assert cache.open().share_prefix(older + [1]) == 0                  # the older one was given up


def test_bad_token_ids_and_empty_prompts_are_refused(story_model):
    with pytest.raises(MinitorchError, match="token id 5000 is outside the vocabulary"):
        story_model.logits([1, 5000])
    with pytest.raises(MinitorchError, match="token id -3 is outside the vocabulary"):
        story_model.logits([1, -3])
    sequences = [story_model.kv_cache.open() for _ in range(2)]
    for sequence in sequences:
        sequence.reserve(1)
    with pytest.raises(MinitorchError, match="token id -1 is outside the vocabulary"):
        story_model.step(sequences, [[5], [-1]])
    for sequence in sequences:
        sequence.close()
    with pytest.raises(MinitorchError, match="empty"):
        story_model.logits([])


def test_a_kv_budget_under_one_block_or_not_a_size_is_refused_at_load():
    with pytest.raises(ContextOverflowError, match=r"KV memory '1KiB' holds 1 positions \(1.0 KiB each\), less than "
                                                   r"one block of 16"):
        minitorch_infer.load(require_model("story"), kv_memory="1KiB")
    with pytest.raises(MinitorchError, match=r"KV memory 'lots' is not a size"):
        minitorch_infer.load(require_model("story"), kv_memory="lots")


def test_q_and_k_rows_are_stored_in_rope_pair_order(story_model):
    """Each head's rows go (0, D/2, 1, D/2+1, ...): RoPE then rotates adjacent pairs, one complex multiply."""
    from minitorch_infer.formats.safetensors_file import read_safetensors

    stored = dict(read_safetensors(require_model("story") / "model.safetensors"))
    head_dim = story_model.config.head_dim
    hf_q = stored["model.layers.0.self_attn.q_proj.weight"]
    ours = np.asarray(story_model.weights["layers.0.attn.q"])     # held in panels with AVX-512
    np.testing.assert_array_equal(ours[0], hf_q[0])
    np.testing.assert_array_equal(ours[1], hf_q[head_dim // 2])
    np.testing.assert_array_equal(ours[head_dim + 3], hf_q[head_dim + head_dim // 2 + 1])
    np.testing.assert_array_equal(story_model.weights["layers.0.attn.v"], stored["model.layers.0.self_attn.v_proj.weight"])


def test_the_default_kv_pool_holds_whole_blocks_even_for_a_tiny_context():
    """Found by the GGUF fuzzer: a context of 1 made a default pool of 4 positions, less than one block."""
    model = minitorch_infer.load(require_model("story"), context=1)
    assert model.kv_cache.capacity_tokens == model.kv_block_size
    assert model.generate([1], max_new_tokens=3).finish_reason == "context"
