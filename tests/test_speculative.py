"""Speculative decoding: greedy output identical to plain decoding wherever decoding runs (generate, streams,
chat sessions, the engine, the server), the acceptance rule's output distributed as the model's (chi-squared
over many seeded draws), the KV cache rolled back exactly, and the drafters and the draft budget alone."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minitorch_infer
from conftest import reference, require_model
from oracle.tiny_models import random_configs, write_tiny_model
from minitorch_infer.errors import SamplingError
from minitorch_infer.generation.loop import Decoder
from minitorch_infer.generation.sampling import Candidates, SamplingParams, Sampler
from minitorch_infer.generation import speculative
from minitorch_infer.generation.speculative import (DraftBudget, NgramDrafter, SpeculationSettings, Speculator,
                                                    StepCosts, accept_prefix, speculation_settings)

# Chi-squared critical values at p = 0.001 (degrees of freedom -> value): a correct rule fails one run in a
# thousand, and every test here is seeded, so a pass stays a pass.
CHI2_CRITICAL_0001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124,
                      9: 27.877, 10: 29.588, 11: 31.264}
REPETITIVE = "Tom had a red ball. He liked the red ball. Tom had a red ball. One day"


@pytest.fixture(autouse=True)
def costs_that_do_not_depend_on_the_machine(monkeypatch):
    """Where drafting happens depends on measured step times; here it must not (tests never depend on the
    machine's speed), so verify steps cost a fixed little (so that the tests verify wherever guesses hold at
    all), and every request starts from the same acceptance, whatever ran before it."""
    monkeypatch.setattr(StepCosts, "default", staticmethod(lambda k: 1 + 0.05 * k))
    monkeypatch.setattr(StepCosts, "record_plain", lambda self, seconds: None)
    monkeypatch.setattr(StepCosts, "record_verify", lambda self, k, seconds: None)
    monkeypatch.setattr(StepCosts, "record_guesses", lambda self, accepted, rejected: None)
    monkeypatch.setattr(speculative, "step_costs", lambda model: StepCosts())   # nothing carried between requests


def chi_squared(counts: np.ndarray, probabilities: np.ndarray) -> float:
    expected = counts.sum() * probabilities
    return float(((counts - expected) ** 2 / expected).sum())


# --- the acceptance rule -------------------------------------------------------------------------------------

def categorical(p: np.ndarray, rng: np.random.Generator) -> int:
    return int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"))


def draws_of_the_rule(p: np.ndarray, guess: int, draws: int, rule, seed: int = 0):
    """Counts of the first token a verify yields, split by whether the guess held, over seeded draws."""
    rng = np.random.default_rng(seed)
    kept, replaced = 0, np.zeros(len(p))
    for _ in range(draws):
        tokens = rule([guess, guess], lambda i: categorical(p, rng))
        if tokens[0] == guess:
            kept += 1
        else:
            replaced[tokens[0]] += 1
    return kept, replaced


def test_a_guess_is_kept_with_probability_p_and_otherwise_replaced_by_a_draw_from_the_residual():
    """The rule for a point-mass drafter: keep the guess d with probability min(1, p(d)/1), else draw from
    max(0, p - q) normalised (p without d). Checked on its two parts, and on the token it yields overall."""
    p = np.random.default_rng(5).dirichlet(np.ones(6))
    guess, draws = 2, 20000
    kept, replaced = draws_of_the_rule(p, guess, draws, accept_prefix)
    assert abs(kept / draws - p[guess]) < 4 * np.sqrt(p[guess] * (1 - p[guess]) / draws)
    residual = np.delete(p, guess) / (1 - p[guess])
    assert replaced[guess] == 0
    assert chi_squared(np.delete(replaced, guess), residual) < CHI2_CRITICAL_0001[4]
    overall = replaced.copy()
    overall[guess] = kept
    assert chi_squared(overall, p) < CHI2_CRITICAL_0001[5]


def test_the_chi_squared_check_catches_a_wrong_rule():
    """The statistical test has teeth: a rule that, on rejection, draws again from p (not the residual) lets
    the guess come back, and yields too much of it."""
    def resample_from_p(draft, choose):
        first = choose(0)
        return [first] if first == draft[0] else [choose(0)]

    p = np.random.default_rng(5).dirichlet(np.ones(6))
    kept, replaced = draws_of_the_rule(p, 2, 20000, resample_from_p)
    overall = replaced.copy()
    overall[2] += kept
    assert chi_squared(overall, p) > CHI2_CRITICAL_0001[5]


def test_accept_prefix_stops_at_the_first_guess_that_fails():
    choices = [7, 8, 9, 10]
    assert accept_prefix([7, 8, 3], choices.__getitem__) == [7, 8, 9]
    assert accept_prefix([7, 8, 9], choices.__getitem__) == [7, 8, 9, 10]
    assert accept_prefix([1], choices.__getitem__) == [7]
    assert accept_prefix([], choices.__getitem__) == [7]


# --- the decoder's verify, through the real sampling pipeline ------------------------------------------------

class FakeModel:
    """What a Decoder needs of a model, for verify() on logits made up by the test."""

    def __init__(self, vocab: int):
        self.config = SimpleNamespace(vocab_size=vocab, eos_token_ids=(), rope_scaling=())
        self.tokenizer, self.context = None, 64


def processed_distribution(params: SamplingParams, logits: np.ndarray, history: list[int]) -> np.ndarray:
    """The distribution plain sampling draws from: the sampler's own processors, then a softmax (float64)."""
    sampler = Sampler(params, len(logits))
    candidates = Candidates(np.arange(len(logits)), logits.astype(np.float32).copy())
    for processor in sampler.processors:
        candidates = processor(candidates, np.array(history))
    weights = np.exp(candidates.logits.astype(np.float64) - candidates.logits.max())
    p = np.zeros(len(logits))
    p[candidates.ids] = weights / weights.sum()
    return p


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5, top_p=0.9, min_p=0.02, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.2),
])
def test_verified_tokens_follow_plain_samplings_distribution_and_equal_its_draws(params):
    """Over many seeded requests: the first token of a verify is distributed as the processed distribution
    (temperature, truncation, penalties); so is the second, given the first guess held, under the history
    that includes it. And each seeded verify yields exactly the tokens plain sampling draws with that seed."""
    vocab, draws = 12, 4000
    rows = np.random.default_rng(3).normal(0, 1.5, size=(3, vocab)).astype(np.float32)
    prompt = [1, 4, 4, 7]
    first_p = processed_distribution(params, rows[0], prompt)
    draft = [int(np.argsort(first_p)[-2])]                    # a guess that holds often, but far from always
    second_p = processed_distribution(params, rows[1], prompt + draft)
    draft.append(int(np.argmax(second_p)))
    first, second = np.zeros(vocab), np.zeros(vocab)
    for seed in range(draws):
        seeded = SamplingParams(**{**params.__dict__, "seed": seed})
        decoder = Decoder(FakeModel(vocab), prompt, max_new_tokens=8, sampling=seeded,
                          speculation=speculation_settings("ngram"))
        tokens = decoder.verify(rows, draft)
        first[tokens[0]] += 1
        if tokens[0] == draft[0]:
            second[tokens[1]] += 1
        if seed < 200:
            plain, history = Sampler(seeded, vocab), list(prompt)
            for row, token in zip(rows, tokens):
                assert plain.sample(row, np.array(history)) == token
                history.append(token)
    for counts, p in ((first, first_p), (second, second_p)):
        seen = p > 0
        assert counts[~seen].sum() == 0                      # nothing the pipeline drops ever comes out
        assert chi_squared(counts[seen], p[seen]) < CHI2_CRITICAL_0001[seen.sum() - 1]


def test_greedy_verify_keeps_guesses_while_they_are_the_argmax():
    rows = np.zeros((4, 10), np.float32)
    rows[0, 3] = rows[1, 5] = rows[2, 8] = rows[3, 1] = 1.0
    decoder = Decoder(FakeModel(10), [0], sampling=SamplingParams(greedy=True), speculation=speculation_settings("ngram"))
    assert decoder.verify(rows, [3, 5, 9]) == [3, 5, 8]          # two held, the third replaced by the argmax
    decoder = Decoder(FakeModel(10), [0], sampling=SamplingParams(greedy=True), speculation=speculation_settings("ngram"))
    assert decoder.verify(rows, [3, 5, 8]) == [3, 5, 8, 1]       # all held, plus the model's next token


# --- drafters and the budget ---------------------------------------------------------------------------------

def test_ngram_drafter_proposes_what_followed_the_most_recent_match():
    drafter = NgramDrafter(2)
    history = np.array([5, 6, 7, 8, 1, 5, 6, 9, 4, 5, 6])
    assert drafter.propose(history, 3) == [9, 4, 5]              # [5, 6] last came before 9, 4, 5
    assert drafter.propose(np.array([1, 2, 3, 4]), 3) == []      # [3, 4] never came before
    assert NgramDrafter(1).propose(np.array([1, 2, 1]), 5) == [2, 1]   # as much as follows, up to the end


def test_the_budget_drafts_more_as_guesses_hold_and_stops_when_they_fail(monkeypatch):
    monkeypatch.undo()                           # the default cost model, as on a machine not measured yet
    budget = DraftBudget(draft_max=8, costs=StepCosts())
    start = budget.size()
    for _ in range(10):
        budget.record(budget.size(), budget.size())
    assert budget.size() == 8 > start
    for _ in range(10):
        budget.record(budget.size() or 1, 0)
    assert budget.size() == 0                                    # drafting does not pay any more
    idle_steps = 1
    while budget.size() == 0:
        idle_steps += 1
    assert 8 < idle_steps < 600                                  # but is tried again, after pauses that grow


def test_the_budget_follows_what_verify_steps_cost(monkeypatch):
    monkeypatch.undo()                           # this test feeds timings of its own, not the machine's
    cheap, dear = StepCosts(), StepCosts()
    for costs, verify_seconds in ((cheap, 1.1), (dear, 4.0)):
        costs.plain = 1.0
        for k in range(1, 16):
            for _ in range(2):                   # the first step of each size binds its program: not counted
                costs.record_verify(k, verify_seconds + 0.01 * k)
    sizes = {}
    for name, costs in (("cheap", cheap), ("dear", dear)):
        budget = DraftBudget(draft_max=15, costs=costs)
        budget.accepted, budget.rejected = 6.0, 4.0              # three guesses in five hold
        sizes[name] = budget.size()
    assert sizes["cheap"] > 3 and sizes["dear"] == 0      # at most 2.5 tokens a verify: 4 steps never pay


@pytest.mark.parametrize("settings, words", [
    ({"speculate": "beam"}, "speculate must be one of"),
    ({"speculate": "ngram", "draft_max": 0}, "draft_max must be an integer from 1 to 15"),
    ({"speculate": "ngram", "draft_max": 99}, "draft_max must be an integer from 1 to 15"),
    ({"speculate": "ngram", "ngram": 0}, "ngram must be an integer"),
    ({"speculate": "ngram", "ngram": 2.5}, "ngram must be an integer"),
    ({"draft_max": 3}, "need speculate='ngram'"),
    ({"speculate": "draft"}, "needs a draft model"),
])
def test_bad_speculation_settings_are_refused_naming_them(story_model, settings, words):
    with pytest.raises(SamplingError, match=words):
        story_model.generate("Once", max_new_tokens=2, **settings)


# --- one step over several rows of a sequence ----------------------------------------------------------------

def test_a_step_with_several_logit_rows_equals_one_decode_step_per_token(story_model):
    model = story_model
    sequence = model.kv_cache.open()
    try:
        model.forward(sequence, model.encode("Once upon a time"))
        held = sequence.length
        tokens = [80, 147, 201, 282, 57]
        sequence.reserve(len(tokens))
        rows = model.step([sequence], [tokens], [len(tokens)]).copy()
        sequence.truncate(held)
        one_by_one = [model.decode_step(sequence, t).copy() for t in tokens]
        np.testing.assert_allclose(rows, np.array(one_by_one), atol=1e-4, rtol=1e-4)
    finally:
        sequence.close()


# --- greedy: the same tokens as plain decoding ---------------------------------------------------------------

def golden_prompts(name: str) -> list[list[int]]:
    data = reference(name)
    return [data["prompt_ids"], data["prompts"]["short_ids"], data["prompts"]["prefill_ids"]]


@pytest.mark.parametrize("draft_max, ngram", [(8, 3), (1, 1), (15, 2)])
def test_story_greedy_speculation_gives_plain_decodings_tokens_for_every_golden_prompt(story_model, draft_max, ngram):
    data = reference("story")
    for prompt in golden_prompts("story") + [story_model.encode(REPETITIVE)]:
        plain = story_model.generate(prompt, max_new_tokens=96, greedy=True, ignore_eos=True)
        fast = story_model.generate(prompt, max_new_tokens=96, greedy=True, ignore_eos=True, speculate="ngram",
                                    draft_max=draft_max, ngram=ngram)
        assert fast.token_ids == plain.token_ids and fast.text == plain.text
        if prompt == data["prompt_ids"]:
            assert fast.token_ids[:32] == data["greedy_ids"]               # and transformers' tokens
    assert story_model.kv_cache.open_sequences == 0


def test_speculation_drafts_and_accepts_on_repetitive_text(story_model):
    result = story_model.generate(REPETITIVE, max_new_tokens=96, greedy=True, ignore_eos=True, speculate="ngram")
    s = result.stats
    assert s.accepted_tokens > 0 and s.decode_steps < len(result.token_ids) - 1
    assert s.tokens_per_step > 1 and 0 < s.acceptance_rate <= 1


def test_smollm2_greedy_speculation_gives_plain_decodings_tokens_for_every_golden_prompt():
    model = minitorch_infer.load(require_model("smollm2-135m-instruct"), context=512)
    data = reference("smollm2")
    for prompt in golden_prompts("smollm2"):
        fast = model.generate(prompt, max_new_tokens=24, greedy=True, ignore_eos=True, speculate="ngram", ngram=2)
        plain = model.generate(prompt, max_new_tokens=24, greedy=True, ignore_eos=True)
        assert fast.token_ids == plain.token_ids
        if prompt == data["prompt_ids"]:
            assert fast.token_ids == data["greedy_ids"][:24]


@pytest.mark.parametrize("index", range(0, 24, 2))
def test_random_configs_greedy_speculation_gives_plain_decodings_tokens(tmp_path, index):
    overrides = random_configs()[index]
    write_tiny_model(tmp_path, overrides, seed=index)
    model = minitorch_infer.load(tmp_path, context=64)
    prompt = [3, 5, 7, 3, 5, 7, 3, 5]
    if "dynamic" in json.dumps(overrides):
        with pytest.raises(SamplingError, match="depends on the step's positions"):
            model.generate(prompt, max_new_tokens=4, speculate="ngram")
        return
    for ngram in (1, 2):
        plain = model.generate(prompt, max_new_tokens=40, greedy=True, ignore_eos=True)
        fast = model.generate(prompt, max_new_tokens=40, greedy=True, ignore_eos=True, speculate="ngram", ngram=ngram)
        assert fast.token_ids == plain.token_ids


# --- sampling: seeded runs reproduce ------------------------------------------------------------------------

def test_seeded_speculative_sampling_gives_plain_samplings_tokens(story_model):
    for seed in (11, 12):
        settings = dict(max_new_tokens=64, seed=seed, temperature=0.9, ignore_eos=True)
        fast = story_model.generate(REPETITIVE, speculate="ngram", ngram=1, **settings)
        assert fast.token_ids == story_model.generate(REPETITIVE, **settings).token_ids
        assert fast.stats.drafted_tokens > 0


# --- stops, limits, streaming, logprobs: cut exactly where plain decoding cuts --------------------------------

@settings(max_examples=25, deadline=None)
@given(max_new_tokens=st.integers(1, 70), stop_at=st.none() | st.integers(0, 60), stop_length=st.integers(1, 8),
       draft_max=st.integers(1, 15))
def test_stops_and_max_new_tokens_cut_speculative_runs_where_plain_runs_stop(story_model, max_new_tokens, stop_at,
                                                                             stop_length, draft_max):
    full = story_model.generate(REPETITIVE, max_new_tokens=70, greedy=True, ignore_eos=True).text
    stop = [full[stop_at:stop_at + stop_length]] if stop_at is not None and full[stop_at:stop_at + stop_length] else []
    kwargs = dict(max_new_tokens=max_new_tokens, greedy=True, stop=stop, logprobs=2)
    plain_stream = story_model.stream(REPETITIVE, **kwargs)
    plain_pieces = list(plain_stream)
    fast_stream = story_model.stream(REPETITIVE, speculate="ngram", draft_max=draft_max, ngram=2, **kwargs)
    fast_pieces = list(fast_stream)
    plain, fast = plain_stream.result, fast_stream.result
    assert fast_pieces == plain_pieces                      # the same pieces, one token at a time
    assert (fast.text, fast.token_ids, fast.finish_reason) == (plain.text, plain.token_ids, plain.finish_reason)
    assert [(t.token_id, t.top[0][0]) for t in fast.logprobs] == [(t.token_id, t.top[0][0]) for t in plain.logprobs]
    np.testing.assert_allclose([t.logprob for t in fast.logprobs], [t.logprob for t in plain.logprobs], atol=1e-4)


# --- chat sessions -------------------------------------------------------------------------------------------

def test_chat_sessions_with_speculation_reuse_the_cache_as_plain_ones_do():
    # Two models, so neither session finds the other's blocks in a shared pool.
    plain, fast = (minitorch_infer.load(require_model("smollm2-135m-instruct"), context=512).chat() for _ in range(2))
    turns = ["Repeat after me: the cat sat on the mat, the cat sat on the mat.", "Say it once more."]
    for text in turns:
        expected = plain.send(text, greedy=True, max_new_tokens=20)
        got = fast.send(text, greedy=True, max_new_tokens=20, speculate="ngram", ngram=2)
        assert got.token_ids == expected.token_ids
        assert got.stats.prompt_tokens == expected.stats.prompt_tokens     # only the new turn was prefilled
        assert fast.cached_tokens == plain.cached_tokens
    fast.rollback()
    plain.rollback()
    assert fast.send(turns[1], greedy=True, max_new_tokens=12, speculate="ngram").token_ids == \
        plain.send(turns[1], greedy=True, max_new_tokens=12).token_ids


# --- the engine and the server -------------------------------------------------------------------------------

def test_engine_runs_speculating_requests_beside_plain_ones(story_model):
    prompts = [REPETITIVE, "Once upon a time", "The little dog. The little dog", "Lily and Ben"]
    greedy = [story_model.generate(p, max_new_tokens=60, greedy=True) for p in prompts]
    seeded = [story_model.generate(p, max_new_tokens=60, seed=4, speculate="ngram") for p in prompts]
    engine = story_model.engine()
    mixed = [engine.submit(p, max_new_tokens=60, greedy=True, **({"speculate": "ngram", "ngram": 1} if i % 2 == 0 else {}))
             for i, p in enumerate(prompts)]
    sampled = [engine.submit(p, max_new_tokens=60, seed=4, speculate="ngram") for p in prompts]
    engine.run()
    assert [h.result().token_ids for h in mixed] == [r.token_ids for r in greedy]
    assert [h.result().token_ids for h in sampled] == [r.token_ids for r in seeded]
    assert mixed[0].result().stats.drafted_tokens > 0 and mixed[1].result().stats.drafted_tokens == 0
    assert story_model.kv_cache.used_blocks == 0


def test_engine_speculation_fits_the_steps_sequence_limit():
    model = minitorch_infer.load(require_model("story"), max_batch=4)
    prompts = [REPETITIVE, "The little dog. The little dog", REPETITIVE + " Tom", "Once upon a time"]
    expected = [model.generate(p, max_new_tokens=50, greedy=True).token_ids for p in prompts]
    results = model.generate_batch(prompts, max_new_tokens=50, greedy=True, speculate="ngram", draft_max=15)
    assert [r.token_ids for r in results] == expected


def test_server_speculation_is_an_extension_field(story_model):
    import openai
    from minitorch_infer.serving.app import serving_in_thread

    with serving_in_thread(minitorch_infer.load(require_model("story")), "story") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        plain = client.completions.create(model="story", prompt=REPETITIVE, temperature=0, max_tokens=40)
        fast = client.completions.create(model="story", prompt=REPETITIVE, temperature=0, max_tokens=40,
                                         extra_body={"speculate": "ngram", "draft_max": 6})
        assert fast.choices[0].text == plain.choices[0].text
        assert plain.choices[0].text == story_model.generate(REPETITIVE, greedy=True, max_new_tokens=40).text
        with pytest.raises(openai.BadRequestError, match="draft_max must be an integer"):
            client.completions.create(model="story", prompt="x", extra_body={"speculate": "ngram", "draft_max": 0})
        with pytest.raises(openai.BadRequestError, match="speculate must be"):
            client.completions.create(model="story", prompt="x", extra_body={"speculate": "draft"})


# --- a draft model -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_story_draft(tmp_path_factory):
    """A tiny random model with the story model's vocabulary and tokenizer (built here, never committed)."""
    story = require_model("story")
    folder = tmp_path_factory.mktemp("draft")
    write_tiny_model(folder, {"vocab_size": 2048, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                              "tie_word_embeddings": True})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(story / name, folder / name)
    return folder


def test_a_draft_model_gives_plain_decodings_tokens(story_model, tiny_story_draft):
    for prompt in golden_prompts("story")[:2] + [REPETITIVE]:
        plain = story_model.generate(prompt, max_new_tokens=48, greedy=True, ignore_eos=True)
        random_draft = story_model.generate(prompt, max_new_tokens=48, greedy=True, ignore_eos=True,
                                            draft_model=str(tiny_story_draft), draft_max=3)
        assert random_draft.token_ids == plain.token_ids and random_draft.stats.drafted_tokens > 0
    # The story model drafting for itself: every guess holds, so verify steps carry many tokens.
    itself = minitorch_infer.load(require_model("story"))
    same = story_model.generate(REPETITIVE, max_new_tokens=48, greedy=True, ignore_eos=True, draft_model=itself)
    assert same.token_ids == story_model.generate(REPETITIVE, max_new_tokens=48, greedy=True, ignore_eos=True).token_ids
    assert same.stats.acceptance_rate > 0.9 and same.stats.tokens_per_step > 3
    assert itself.kv_cache.open_sequences == 0                    # the draft's sequence was closed with the run


def test_a_draft_model_in_the_engine_and_in_sampling(story_model, tiny_story_draft):
    itself = minitorch_infer.load(require_model("story"))
    prompts = ["Once upon a time", REPETITIVE]
    expected = [story_model.generate(p, max_new_tokens=30, greedy=True).token_ids for p in prompts]
    results = story_model.generate_batch(prompts, max_new_tokens=30, greedy=True, draft_model=itself)
    assert [r.token_ids for r in results] == expected
    sampled = [story_model.generate(REPETITIVE, max_new_tokens=30, seed=5, draft_model=itself).token_ids
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_a_draft_with_another_vocabulary_is_refused_naming_both(story_model, tmp_path):
    write_tiny_model(tmp_path, {"vocab_size": 101})
    other = minitorch_infer.load(tmp_path, context=64)
    with pytest.raises(SamplingError) as refused:
        story_model.generate("Once", max_new_tokens=4, draft_model=other)
    message = str(refused.value)
    assert str(tmp_path) in message and story_model.source in message and "101" in message and "2048" in message


def test_guesses_checked_without_verifying_start_drafting_when_the_text_repeats(monkeypatch):
    monkeypatch.undo()                           # the default cost model: drafting pays only when guesses hold
    speculator = Speculator(SpeculationSettings("ngram", draft_max=8, ngram=2), FakeModel(50))
    speculator.budget.accepted, speculator.budget.rejected = 1.0, 4.0   # so far, guesses failed
    passage = list(range(10, 40))
    history = [1, 2, 3, *passage, 4]
    for position, token in enumerate(passage):    # the text repeats the passage: guesses hold, unverified
        drafted = speculator.propose(np.array(history), room=8)
        if drafted:
            break
        history.append(token)
    assert drafted == passage[position:position + len(drafted)] and position < 20
    assert speculator.budget.acceptance > 0.7 and speculator.verify_steps == 0
