"""Many sequences per step over the paged KV cache: each sequence's logits and tokens equal its run alone,
whatever shares its steps, however its blocks are placed, whatever is preempted or cancelled."""

import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minitorch_infer
from conftest import require_model
from minitorch_infer.errors import KVCacheFullError, PromptError
from oracle import tiny_models
from test_differential import CACHE_CONSISTENT, config_id, write_config

STORY_PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park. They", "One day, a cat",
                 "Lily had a red ball", "The sun"]


def solo_logits(model, ids: list[int]) -> np.ndarray:
    return model.logits(ids)[-1]


def run_mixed_steps(model, prompts: list[list[int]], chunk: int) -> list[list[np.ndarray]]:
    """Feed every prompt through model.step in chunks of `chunk`, all sequences in the same steps (some
    prefilling while others have finished their prompt and decode their own tokens), and return each
    sequence's logits after each of its steps."""
    sequences = [model.kv_cache.open() for _ in prompts]
    fed = [0] * len(prompts)
    seen: list[list[np.ndarray]] = [[] for _ in prompts]
    try:
        while any(f < len(p) for f, p in zip(fed, prompts)):
            active = [i for i, p in enumerate(prompts) if fed[i] < len(p)]
            chunks = [prompts[i][fed[i]:fed[i] + chunk] for i in active]
            for i, ids in zip(active, chunks):
                sequences[i].reserve(len(ids))
            logits = model.step([sequences[i] for i in active], chunks)
            for row, (i, ids) in enumerate(zip(active, chunks)):
                fed[i] += len(ids)
                seen[i].append(logits[row].copy())
    finally:
        for sequence in sequences:
            sequence.close()
    return seen


def test_a_mixed_step_gives_each_sequence_its_own_logits(story_model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 2048, size=n).tolist() for n in (1, 5, 17, 40, 3)]
    seen = run_mixed_steps(story_model, prompts, chunk=6)
    for ids, logits in zip(prompts, seen):
        for step, row in enumerate(logits):
            prefix = ids[:min(len(ids), (step + 1) * 6)]
            np.testing.assert_allclose(row, solo_logits(story_model, prefix), atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=CACHE_CONSISTENT[::3], ids=lambda i: config_id(i))
def tiny(request, tmp_path_factory):
    return write_config(request.param, tmp_path_factory)


def test_random_configs_batched_equal_alone(tiny):
    """GQA, MQA, sliding windows, biases: a batch of mixed lengths equals each sequence alone within 1e-4."""
    config, _, ids, folder = tiny
    model = minitorch_infer.load(folder, context=64, prefill_chunk=32, kv_block_size=4)
    prompts = [ids[:n] for n in (3, 11, len(ids))]
    seen = run_mixed_steps(model, prompts, chunk=5)
    scale = max(np.abs(solo_logits(model, p)).max() for p in prompts)
    for prompt, logits in zip(prompts, seen):
        for step, row in enumerate(logits):
            prefix = prompt[:min(len(prompt), (step + 1) * 5)]
            assert np.abs(row - solo_logits(model, prefix)).max() / scale < 1e-4


def test_generate_batch_equals_generate_alone_greedy_and_seeded(story_model):
    solo = [story_model.generate(p, max_new_tokens=40, greedy=True) for p in STORY_PROMPTS]
    batch = story_model.generate_batch(STORY_PROMPTS, max_new_tokens=40, greedy=True)
    assert [r.token_ids for r in batch] == [r.token_ids for r in solo]
    assert [r.text for r in batch] == [r.text for r in solo]
    sampled = [story_model.generate(p, max_new_tokens=30, seed=11, temperature=1.0) for p in STORY_PROMPTS]
    assert [r.text for r in story_model.generate_batch(STORY_PROMPTS, max_new_tokens=30, seed=11,
                                                        temperature=1.0)] == [r.text for r in sampled]


def test_smollm2_batch_equals_alone(smollm2_model):
    prompts = ["What is the capital of France?", "Name three colours.", "Say hello."]
    solo = [smollm2_model.generate(p, max_new_tokens=12, greedy=True) for p in prompts]
    batch = smollm2_model.generate_batch(prompts, max_new_tokens=12, greedy=True)
    assert [r.token_ids for r in batch] == [r.token_ids for r in solo]


def test_a_pool_too_small_for_everyone_preempts_and_still_gives_every_answer():
    model = minitorch_infer.load(require_model("story"), context=128, kv_memory="160tokens", kv_block_size=8)
    solo = [model.generate(p, max_new_tokens=48, greedy=True, ignore_eos=True) for p in STORY_PROMPTS]
    engine = model.engine(max_batch_tokens=32)
    handles = [engine.submit(p, max_new_tokens=48, greedy=True, ignore_eos=True) for p in STORY_PROMPTS]
    while engine.step():
        # Running requests stay oldest first, a preempted one back in its place: each step serves them so.
        numbers = [request.number for request in engine.scheduler.running]
        assert numbers == sorted(numbers)
    assert engine.scheduler.preemptions > 0
    assert [h.result().token_ids for h in handles] == [r.token_ids for r in solo]
    assert model.kv_cache.used_blocks == 0 and model.kv_cache.open_sequences == 0


def test_a_request_alone_larger_than_the_pool_ends_with_context_and_a_prompt_larger_is_refused():
    model = minitorch_infer.load(require_model("story"), context=128, kv_memory="32tokens", kv_block_size=8)
    result = model.generate_batch(["Once upon a time"], max_new_tokens=100, greedy=True, ignore_eos=True)[0]
    assert result.finish_reason == "context" and len(result.token_ids) > 20
    with pytest.raises(KVCacheFullError, match="more than the whole KV pool holds"):
        model.engine().submit(list(range(3, 40)))
    assert model.kv_cache.used_blocks == 0


def test_a_shared_preamble_is_computed_once(story_model):
    preamble = ("Once upon a time, there was a little girl named Lily. She loved to play with her red ball in the "
                "garden. Every morning she ran outside with her dog Max, and they played until the sun was high. "
                "Her mother watched them from the kitchen window and smiled. ")
    first = story_model.generate(preamble + "One day", max_new_tokens=4, greedy=True)
    second = story_model.generate(preamble + "The next day", max_new_tokens=4, greedy=True)
    alone = minitorch_infer.load(require_model("story")).generate(preamble + "The next day", max_new_tokens=4,
                                                                  greedy=True)
    assert second.token_ids == alone.token_ids
    assert len(second.prompt_ids) >= 48 and first.stats.prompt_tokens == len(first.prompt_ids)
    assert second.stats.prompt_tokens <= len(second.prompt_ids) - 32        # two full blocks came from the first


def test_a_list_of_prompts_given_to_generate_points_at_generate_batch(story_model):
    with pytest.raises(PromptError, match="generate_batch"):
        story_model.generate(["a", "b"])


def test_the_engine_serves_threads_streams_and_cancels(story_model):
    expected = {p: story_model.generate(p, max_new_tokens=30, greedy=True).text for p in STORY_PROMPTS}
    with story_model.engine().start() as engine:
        streamed: dict[str, str] = {}

        def client(prompt: str) -> None:
            handle = engine.submit(prompt, max_new_tokens=30, greedy=True)
            streamed[prompt] = "".join(handle.stream())
            assert handle.result().text == streamed[prompt]

        threads = [threading.Thread(target=client, args=(p,)) for p in STORY_PROMPTS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cancelled = engine.submit("Once upon a time", max_new_tokens=400, greedy=True, ignore_eos=True)
        cancelled.cancel()
        assert cancelled.result(timeout=10).finish_reason == "interrupted"
    assert streamed == expected
    assert story_model.kv_cache.open_sequences == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_arrivals_lengths_cancels_and_block_sizes(data):
    block_size = data.draw(st.sampled_from([1, 3, 8, 16]))
    pool = data.draw(st.integers(96, 320))
    model = _tiny_story(block_size, pool)
    requests = data.draw(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 24), st.booleans(),
                                            st.integers(0, 4)), min_size=1, max_size=7))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    shared = rng.integers(3, 2048, size=20).tolist()            # some prompts share a prefix
    prompts = [(shared[:length // 2] + rng.integers(3, 2048, size=length - length // 2).tolist()) for length, *_ in
               requests]
    engine = model.engine(max_batch_tokens=data.draw(st.integers(4, 64)))
    handles = []
    for (length, new_tokens, cancel, arrive_after), prompt in zip(requests, prompts):
        for _ in range(arrive_after):                            # arrivals between steps
            engine.step()
            _check_slot_rows(engine)
        handles.append(engine.submit(prompt, max_new_tokens=new_tokens, greedy=True, ignore_eos=True))
        if cancel:
            handles[-1].cancel()
    while engine.step():
        _check_slot_rows(engine)
    for handle, prompt, (length, new_tokens, cancel, _) in zip(handles, prompts, requests):
        result = handle.result()
        if cancel:
            assert result.finish_reason == "interrupted"
            continue
        alone = model.generate(prompt, max_new_tokens=new_tokens, greedy=True, ignore_eos=True)
        assert result.token_ids == alone.token_ids[:len(result.token_ids)]
        assert result.finish_reason == alone.finish_reason or result.finish_reason == "context"
    assert model.kv_cache.used_blocks == 0 and model.kv_cache.open_sequences == 0
    # The mask the pool keeps of registered blocks (to find cold ones at once) is the registry itself.
    assert set(np.flatnonzero(model.kv_cache._is_registered)) == set(model.kv_cache._key_of)
    assert sorted(model.kv_cache._free_rows) == list(range(len(model.kv_cache._slot_table)))   # every row back


def _check_slot_rows(engine) -> None:
    """Each running request's row of the slot table holds its blocks' slots, and its run start is right."""
    size = engine.model.kv_cache.block_size
    for request in engine.scheduler.running:
        sequence = request.sequence
        expected = (np.asarray(sequence.blocks)[:, None] * size + np.arange(size)).ravel()
        np.testing.assert_array_equal(engine.model.kv_cache.slot_rows([sequence], len(expected))[0], expected)
        in_one_run = sequence.blocks == list(range(sequence.blocks[0], sequence.blocks[0] + len(sequence.blocks)))
        assert sequence.run_start == (sequence.blocks[0] * size if in_one_run else None)


_TINY_MODELS: dict = {}


def _tiny_story(block_size: int, pool: int):
    key = (block_size, pool // block_size)
    if key not in _TINY_MODELS:
        _TINY_MODELS[key] = minitorch_infer.load(require_model("story"), context=96, prefill_chunk=64,
                                                 kv_memory=f"{pool}tokens", kv_block_size=block_size)
    return _TINY_MODELS[key]


def test_a_rollback_into_a_shared_block_copies_it_before_writing(story_model):
    """Two sequences share a prompt's full blocks; one rolls back into the shared block and writes other
    tokens there. The other sequence's keys and values, and its logits, must not change."""
    prompt = list(range(3, 3 + 40))                             # two full blocks of 16, and 8 more
    first = story_model.kv_cache.open()
    second = story_model.kv_cache.open()
    try:
        story_model.forward(first, prompt)
        assert second.share_prefix(prompt) == 32 and second.blocks[:2] == first.blocks[:2]
        story_model.forward(second, prompt[32:])
        before = {name: array[:, first.slots(40)].copy() for name, array in story_model.kv_cache.arrays.items()}
        second.truncate(20)                                     # into the second shared block
        story_model.forward(second, [900, 901, 902])
        assert second.blocks[1] != first.blocks[1]              # copied before the write
        for name, array in story_model.kv_cache.arrays.items():
            np.testing.assert_array_equal(array[:, first.slots(40)], before[name])
        np.testing.assert_allclose(story_model.forward(first, [77]), solo_logits(story_model, prompt + [77]),
                                   atol=1e-4, rtol=0)
        np.testing.assert_allclose(story_model.forward(second, [78]),
                                   solo_logits(story_model, prompt[:20] + [900, 901, 902, 78]), atol=1e-4, rtol=0)
    finally:
        first.close()
        second.close()


def test_dynamic_ntk_models_run_one_sequence_per_step(tmp_path):
    """Their rotary frequencies follow the step's longest position, so sequences must not share a step."""
    config = dict(tiny_models.random_configs()[0], rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                  max_position_embeddings=16)
    tiny_models.write_tiny_model(tmp_path, config, seed=3)
    model = minitorch_infer.load(tmp_path, context=48)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30, 31, 32]]
    solo = [model.generate(p, max_new_tokens=8, greedy=True, ignore_eos=True).token_ids for p in prompts]
    engine = model.engine()
    assert engine.scheduler.max_sequences == 1
    assert [r.token_ids for r in model.generate_batch(prompts, max_new_tokens=8, greedy=True,
                                                      ignore_eos=True)] == solo


def test_an_engine_blocked_by_sequences_outside_it_raises_kv_cache_full():
    model = minitorch_infer.load(require_model("story"), context=128, kv_memory="64tokens")
    outside = model.kv_cache.open()
    model.forward(outside, list(range(3, 40)))                  # 3 of the 4 blocks
    handle = model.engine().submit(list(range(50, 70)), max_new_tokens=8, greedy=True, ignore_eos=True)
    with pytest.raises(KVCacheFullError, match="3 of its 4 blocks are held outside this engine"):
        handle.result()
    outside.close()
    assert model.kv_cache.used_blocks == 0


def test_a_closed_sequence_refuses_to_run_and_keeps_nothing(story_model):
    sequence = story_model.kv_cache.open()
    story_model.forward(sequence, [1, 80, 147])
    sequence.close()
    assert sequence.length == 0 and sequence.blocks == []
    with pytest.raises(minitorch_infer.MinitorchError, match="was closed"):
        story_model.forward(sequence, [201])


def test_stopping_the_background_thread_leaves_streams_to_finish_on_their_own_thread(story_model):
    engine = story_model.engine().start()
    handle = engine.submit("Once upon a time", max_new_tokens=100, greedy=True, ignore_eos=True)
    pieces = []
    reader = threading.Thread(target=lambda: pieces.extend(handle.stream()))
    reader.start()
    engine.stop()
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert "".join(pieces) == handle.result().text and len(handle.result().token_ids) == 100


def test_an_engine_refuses_to_run_after_the_model_is_recompiled():
    model = minitorch_infer.load(require_model("story"))
    engine = model.engine()
    handle = engine.submit("Once upon a time", max_new_tokens=4)
    model.compile()
    with pytest.raises(minitorch_infer.MinitorchError, match="recompiled after this engine was made"):
        handle.result()


@pytest.mark.parametrize("kernel", ["paged_decode_attention", "paged_decode_attention_threaded"])
@pytest.mark.parametrize("heads, kv_heads, window, head_dim, scale",
                         [(4, 4, 0, 16, 0.25), (6, 2, 0, 24, 0.25), (4, 1, 5, 16, 0.25), (8, 4, 1, 16, 0.25),
                          (9, 3, 0, 64, 4.0), (4, 2, 0, 32, 0.25), (3, 3, 6, 128, 0.1)])
def test_paged_attention_kernel_equals_attention_written_plainly(kernel, heads, kv_heads, window, head_dim,
                                                                 scale):
    """The compiled paged kernels (one thread, and the sequences shared out among threads) against
    softmax(q·kᵀ·scale)·v over each sequence's own slots, one at a time: scattered slots, totals from 1,
    grouped (pairs of heads, and an odd one) and multi-query heads, sliding windows down to one key, and
    scores spread wide enough that most weights underflow. Each row of slots ends in a slot past its total
    whose key and value would swamp the result if read."""
    from minitorch_infer.backends import attention_kernels

    paged_decode_attention = getattr(attention_kernels, kernel)

    rng = np.random.default_rng(heads * 10 + kv_heads + window)
    capacity, totals = 256, [1, 7, 40, 3]
    k_pool, v_pool = (rng.standard_normal((kv_heads, capacity, head_dim)).astype(np.float32) for _ in range(2))
    poison = capacity - 1
    k_pool[:, poison], v_pool[:, poison] = 1e4, 1e4
    q = rng.standard_normal((len(totals), heads, head_dim)).astype(np.float32)
    slots = np.full((len(totals), max(totals)), poison, np.intp)
    for r, (total, picked) in enumerate(zip(totals, np.split(rng.permutation(poison)[:sum(totals)],
                                                               np.cumsum(totals)[:-1]))):
        slots[r, :total] = picked
    scale = np.float32(scale)
    out = np.empty_like(q)
    paged_decode_attention(q, k_pool, v_pool, slots, np.asarray(totals, np.intp), window, scale, out)
    for r, total in enumerate(totals):
        seen = slots[r, max(0, total - window) if window else 0:total]
        for h in range(heads):
            g = h // (heads // kv_heads)
            scores = k_pool[g, seen].astype(np.float64) @ q[r, h] * scale
            weights = np.exp(scores - scores.max())
            expected = weights @ v_pool[g, seen] / weights.sum()
            np.testing.assert_allclose(out[r, h], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["paged_decode_attention", "paged_decode_attention_threaded"])
def test_paged_attention_kernel_takes_a_strided_query(kernel):
    """A query that is a view into a wider array (a fused q|k|v's columns, as GPT-2's attention gets it) gives
    what its contiguous copy gives: the 16-wide heads' vector path reads contiguous rows."""
    from minitorch_infer.backends import attention_kernels

    paged_decode_attention = getattr(attention_kernels, kernel)
    rng = np.random.default_rng(7)
    k_pool, v_pool = (rng.standard_normal((2, 64, 16)).astype(np.float32) for _ in range(2))
    fused = rng.standard_normal((3, 4, 48)).astype(np.float32)
    q = fused[:, :, :16]
    slots = rng.permutation(64)[:3 * 20].reshape(3, 20).astype(np.intp)
    totals = np.array([20, 9, 17], np.intp)
    out, expected = np.empty((3, 4, 16), np.float32), np.empty((3, 4, 16), np.float32)
    paged_decode_attention(q, k_pool, v_pool, slots, totals, 0, np.float32(0.25), out)
    paged_decode_attention(np.ascontiguousarray(q), k_pool, v_pool, slots, totals, 0, np.float32(0.25), expected)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("first, total", [(0, 1), (0, 16), (3, 40), (17, 18), (5, 69)])
def test_the_sixteen_lane_softmax_is_numpys(first, total):
    """largest, then exponentials, then the division by their sum, over scores[row, first:total]: a short last
    chunk, scores spread past exp's clamp at -87, and zeros (not stale numbers) in the lanes written past total."""
    from numba import njit

    from minitorch_infer.backends.vector_lanes import exponentials, largest

    @njit
    def softmax(scores, first, total):
        peak = largest(scores, 1, first, total)
        inverse = 1 / exponentials(scores, 1, first, total, peak)
        for t in range(first, total):
            scores[1, t] *= inverse
        return peak

    rng = np.random.default_rng(total)
    scores = (rng.standard_normal((2, total + 16)) * 40).astype(np.float32)
    other_row = scores[0].copy()
    row = scores[1].astype(np.float64)[first:total]
    expected = np.exp(row - row.max())
    expected /= expected.sum()
    assert softmax(scores, first, total) == scores.dtype.type(row.max())
    np.testing.assert_allclose(scores[1, first:total], expected, rtol=1e-5, atol=1e-30)   # float32 score - max
    end = first + -(-(total - first) // 16) * 16
    assert not scores[1, total:end].any()
    np.testing.assert_array_equal(scores[0], other_row)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 300), st.booleans()), min_size=1, max_size=20))
def test_a_decode_layout_is_what_its_sequences_say(sequences):
    """A decode step's layout (StepLayout.of with one new row per sequence takes a shortcut), field by field
    against the layout written out plainly, some sequences with their slots in one run and some scattered; and
    the padded slots, broadcast from run starts or gathered sequence by sequence, against each sequence's slots."""
    from minitorch_infer.backends.layout import StepLayout

    rng = np.random.default_rng(len(sequences))
    slots = [np.arange(start, start + total) if run else rng.permutation(6000)[:total]
             for start, total, run in sequences]
    starts = [start if run else None for start, _, run in sequences]
    layout = StepLayout.of([1] * len(sequences), slots, starts)
    rows = len(sequences)
    last_slots = np.array([s[-1] for s in slots])
    assert layout.row_starts == list(range(rows))
    assert layout.row_stops == list(range(1, rows + 1))
    assert layout.totals == [len(s) for s in slots]
    assert layout.key_starts == starts
    if rows == 1:
        assert layout.write_start == last_slots[0] and layout.write_slots is None
    else:
        assert layout.write_start is None
        np.testing.assert_array_equal(layout.write_slots, last_slots)
    np.testing.assert_array_equal(layout.last_rows, np.arange(rows))
    np.testing.assert_array_equal(layout.totals_array(), layout.totals)
    for i, sequence_slots in enumerate(slots):
        np.testing.assert_array_equal(layout.positions_of(i), sequence_slots)
    gathered = StepLayout.of([1] * len(sequences), slots, [None] * len(sequences))
    # A step with a prompt row has no padded slots made up front: when every sequence is one run, they are
    # broadcast from the run starts on demand.
    runs = [np.arange(s[0], s[0] + len(s)) for s in slots]
    broadcast = StepLayout.of([1] * (len(runs) - 1) + [min(2, len(runs[-1]))], runs)
    for padded, expected in ((layout.padded_slots(), slots), (gathered.padded_slots(), slots),
                             (broadcast.padded_slots(), runs)):
        assert padded.shape == (rows, max(len(s) for s in slots))
        for row, sequence_slots in zip(padded, expected):
            np.testing.assert_array_equal(row[:len(sequence_slots)], sequence_slots)


@pytest.mark.parametrize("new_tokens", [[1, 1, 1, 1], [5, 1, 12, 1], [1] * 12],
                         ids=["decode", "mixed", "decode-12"])
def test_batched_kernels_equal_the_reference_backend_on_scattered_slots(story_model, new_tokens):
    """The fast backend's kv_write, attention (per sequence and the paged kernel) and last_row against the plain
    reference interpreter, on one layout with every sequence's positions scattered over the pool."""
    from minitorch_infer.backends import numpy as numpy_backend, reference
    from minitorch_infer.backends.layout import StepLayout

    rng = np.random.default_rng(len(new_tokens) + sum(new_tokens))
    graph = story_model.graph
    pool = {name: rng.standard_normal(array.shape).astype(np.float32)
            for name, array in story_model.kv_cache.arrays.items()}
    capacity = next(iter(pool.values())).shape[1]
    totals = [n + int(rng.integers(0, 60)) for n in new_tokens]
    slots = np.split(rng.permutation(capacity)[:sum(totals)], np.cumsum(totals)[:-1])
    layout = StepLayout.of(new_tokens, slots)
    assert all(start is None for start in layout.key_starts)           # every sequence gathered
    inputs = {"tokens": rng.integers(3, 2048, size=sum(new_tokens)),
              "positions": np.concatenate([np.arange(t - n, t) for n, t in zip(new_tokens, totals)])}
    params = {name: story_model.weights[name] for name in graph.params}
    expected_pool = {name: array.copy() for name, array in pool.items()}
    (expected,) = reference.run(graph, params, inputs, expected_pool, {"S": sum(new_tokens), "T": max(totals)},
                                layout)
    program = numpy_backend.compile(graph, story_model.memory_plan, story_model.weights)
    (found,) = program.run(inputs, pool, layout)
    np.testing.assert_allclose(found, expected, atol=1e-4, rtol=1e-4)
    for name in pool:
        np.testing.assert_allclose(pool[name], expected_pool[name], atol=1e-5, rtol=1e-5)


def test_logprobs_are_the_log_softmax_of_the_logits_alone_and_in_a_batch(story_model):
    result = story_model.generate("Once upon a time", max_new_tokens=4, greedy=True, logprobs=3)
    ids = result.prompt_ids + result.token_ids
    logits = story_model.logits(ids).astype(np.float64)
    for step, entry in enumerate(result.logprobs):
        row = logits[len(result.prompt_ids) - 1 + step]
        log_softmax = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert entry.token_id == result.token_ids[step]
        assert entry.logprob == pytest.approx(log_softmax[entry.token_id], abs=1e-4)
        assert [t for t, _ in entry.top] == np.argsort(-log_softmax, kind="stable")[:3].tolist()
    batched = story_model.generate_batch(["Once upon a time", "The sun"], max_new_tokens=4, greedy=True, logprobs=3)
    assert [e.token_id for e in batched[0].logprobs] == result.token_ids
    assert [e.logprob for e in batched[0].logprobs] == pytest.approx([e.logprob for e in result.logprobs], abs=1e-4)
    with pytest.raises(minitorch_infer.SamplingError, match="logprobs must be an integer from 0 to 20"):
        story_model.generate("Once", logprobs=21)


def resident_bytes(array: np.ndarray) -> int:
    """How much of the memory that holds `array` is resident: the Rss of every mapping it overlaps, per
    Linux's /proc/self/smaps (the kernel splits a mapping where its pages differ, e.g. huge and small)."""
    start = array.__array_interface__["data"][0]
    stop = start + array.nbytes
    resident, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(bound, 16) for bound in head.split("-"))
                inside = low < stop and start < high
            elif inside and head == "Rss:":
                resident += int(line.split()[1]) * 1024
    return resident


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_a_short_generation_commits_only_the_kv_blocks_it_writes():
    """The pool is reserved, not committed: with transparent huge pages on, a first write near a page would
    commit 2 MiB of each K and V array, hundreds of MB for a big model's first token."""
    model = minitorch_infer.load(require_model("story"), kv_memory="64MiB")
    model.generate("Once upon a time", max_new_tokens=4, greedy=True)
    pool = model.kv_cache.arrays.values()
    written = model.kv_cache.block_size * model.kv_cache.bytes_per_token
    resident = sum(resident_bytes(array) for array in pool)
    # A block's slots lie in each array's kv_heads rows: at most a few small pages per head per array.
    heads = sum(array.shape[0] for array in pool)
    assert resident <= written + heads * 2 * 4096, f"{resident:,} bytes resident for one {written:,}-byte block"
