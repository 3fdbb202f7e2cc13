"""Sampling: seeded reproducibility, greedy equivalences, the draw's distribution, and each processor's
definition checked against an independent float64 reference."""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minitorch_infer.errors import SamplingError
from minitorch_infer.generation.sampling import (
    Candidates,
    MinP,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    Sampler,
    SamplingParams,
    Temperature,
    TopK,
    TopP,
    build_processors,
    kept_by_min_p,
    kept_by_top_k,
    kept_by_top_p,
)

NO_HISTORY = np.zeros(0, dtype=np.int64)

logit_vectors = hnp.arrays(
    np.float32,
    st.integers(1, 300),
    elements=st.floats(-30, 30, width=32),
)
# Integer-valued logits from a small range: ties everywhere.
tied_logit_vectors = hnp.arrays(np.float32, st.integers(1, 50), elements=st.integers(-3, 3).map(float))


# --- independent references, float64, full sorts ---------------------------------------------------------


def reference_probs(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    return shifted / shifted.sum()


def reference_order(logits: np.ndarray) -> np.ndarray:
    """Token positions by descending logit, lower position first among ties."""
    return np.lexsort((np.arange(len(logits)), -logits.astype(np.float64)))


def mass_before_each(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, probability mass of the tokens ranked above each token in that order)."""
    order = reference_order(logits)
    sorted_probs = reference_probs(logits)[order]
    return order, np.cumsum(sorted_probs) - sorted_probs


def assert_top_p_matches_reference(logits: np.ndarray, top_p: float, tolerance: float = 1e-5) -> None:
    """transformers' TopPLogitsWarper keeps a token unless the mass at and below it is <= 1 - top_p, i.e.
    while the mass ranked above it is < top_p. Float32 may place the cut differently from this float64
    reference only across tokens whose mass-above lies within `tolerance` of top_p."""
    order, before = mass_before_each(logits)
    kept = kept_by_top_p(logits, top_p)
    expected_count = int(np.count_nonzero(before < top_p))
    np.testing.assert_array_equal(kept, np.sort(order[: len(kept)]))  # the highest-ranked tokens
    disputed = before[min(len(kept), expected_count) : max(len(kept), expected_count)]
    assert np.all(np.abs(disputed - top_p) <= tolerance), (len(kept), expected_count)


def chi_square_critical(degrees_of_freedom: int, z: float) -> float:
    """Upper critical value of chi-square (Wilson–Hilferty); z is the standard normal quantile."""
    k = degrees_of_freedom
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


Z_ONE_IN_A_THOUSAND = 3.090232  # standard normal upper 0.001 quantile


def draw_counts(sampler: Sampler, logits: np.ndarray, draws: int) -> np.ndarray:
    counts = np.zeros(len(logits), dtype=np.int64)
    for _ in range(draws):
        counts[sampler.sample(logits, NO_HISTORY)] += 1
    return counts


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    assert expected.min() >= 5, "too few expected draws per token for a chi-square test"
    return float(((counts - expected) ** 2 / expected).sum())


# --- reproducibility and greedy ---------------------------------------------------------------------------


def run_sequence(params: SamplingParams, steps: int = 60, vocab: int = 1000) -> list[int]:
    logits_rng = np.random.default_rng(7)
    sampler = Sampler(params, vocab)
    history: list[int] = [1, 2, 3]
    for _ in range(steps):
        logits = (logits_rng.standard_normal(vocab) * 3).astype(np.float32)
        history.append(sampler.sample(logits, np.array(history)))
    return history[3:]


def test_same_seed_gives_the_same_draws_and_other_seeds_differ():
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=1234)
    first = run_sequence(params)
    assert run_sequence(params) == first
    assert run_sequence(SamplingParams(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=99)) != first


@given(tied_logit_vectors)
def test_greedy_temperature_zero_and_top_k_one_are_the_argmax(logits):
    argmax = int(np.argmax(logits))
    for params in (SamplingParams(greedy=True), SamplingParams(temperature=0.0), SamplingParams(top_k=1, seed=0)):
        assert Sampler(params, len(logits)).sample(logits, NO_HISTORY) == argmax


@given(tied_logit_vectors, st.floats(0.05, 5.0))
def test_top_k_one_processor_in_a_sampled_pipeline_is_the_argmax(logits, temperature):
    # A hand-built pipeline skips the greedy shortcut, so this exercises TopK's lower-id tie-break and the draw.
    sampler = Sampler(SamplingParams(seed=3), len(logits), processors=[Temperature(temperature), TopK(1)])
    assert sampler.sample(logits, NO_HISTORY) == int(np.argmax(logits))


def test_greedy_applies_penalties_first():
    logits = np.array([1.0, 5.0, 4.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(greedy=True, repetition_penalty=2.0), 3)
    assert sampler.sample(logits, np.array([1])) == 2  # 5 / 2 < 4


def test_sample_leaves_the_callers_logits_alone():
    logits = np.array([1.0, -2.0, 3.0, 0.5], dtype=np.float32)
    before = logits.copy()
    Sampler(SamplingParams(temperature=0.5, repetition_penalty=1.3, presence_penalty=0.4, seed=0), 4).sample(
        logits, np.array([0, 1, 2])
    )
    np.testing.assert_array_equal(logits, before)


def test_sample_rejects_logits_of_the_wrong_size():
    with pytest.raises(SamplingError, match="logits must have shape"):
        Sampler(SamplingParams(), 10).sample(np.zeros(11, dtype=np.float32), NO_HISTORY)


# --- the draw's distribution ------------------------------------------------------------------------------

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], dtype=np.float32)
DRAWS = 20_000


@pytest.mark.parametrize(
    "params, expected_probs",
    [
        (SamplingParams(seed=11), reference_probs(LOGITS)),
        (SamplingParams(temperature=0.5, seed=12), reference_probs(LOGITS / 0.5)),
        # top-k 3 keeps ids 0, 6, 1; the draw renormalises over them.
        (SamplingParams(top_k=3, seed=13), np.where(np.isin(np.arange(8), [0, 1, 6]), reference_probs(LOGITS), 0)),
    ],
    ids=["plain softmax", "temperature 0.5", "top-k 3"],
)
def test_draw_frequencies_match_the_softmax(params, expected_probs):
    expected_probs = expected_probs / expected_probs.sum()
    counts = draw_counts(Sampler(params, len(LOGITS)), LOGITS, DRAWS)
    kept = expected_probs > 0
    assert counts[~kept].sum() == 0
    critical = chi_square_critical(int(kept.sum()) - 1, Z_ONE_IN_A_THOUSAND)
    assert chi_square(counts[kept], expected_probs[kept]) < critical
    # The same test rejects a nearby wrong distribution, so it has the power to catch a biased draw.
    wrong = reference_probs(np.log(expected_probs[kept]) * 1.15)
    assert chi_square(counts[kept], wrong) > critical


def test_draw_frequencies_match_the_softmax_across_a_large_vocabulary():
    # The same eight logits scattered over 3,000 tokens (the rest masked), so the draw's running-sum
    # search has to cross blocks.
    positions = np.array([5, 600, 601, 1023, 1024, 1900, 2500, 2999])
    logits = np.full(3000, -np.inf, dtype=np.float32)
    logits[positions] = LOGITS
    counts = draw_counts(Sampler(SamplingParams(seed=21), len(logits)), logits, DRAWS)
    assert counts.sum() == counts[positions].sum()
    critical = chi_square_critical(len(positions) - 1, Z_ONE_IN_A_THOUSAND)
    assert chi_square(counts[positions], reference_probs(LOGITS)) < critical


def test_wilson_hilferty_matches_tabulated_chi_square_quantiles():
    # Tabulated upper 0.001 critical values; the approximation errs high (safe) at few degrees of freedom.
    for df, tabulated in ((2, 13.816), (7, 24.322), (30, 59.703)):
        assert chi_square_critical(df, Z_ONE_IN_A_THOUSAND) == pytest.approx(tabulated, rel=0.03)


def test_draw_never_picks_a_masked_token():
    logits = np.full(5000, -np.inf, dtype=np.float32)
    logits[[17, 4000]] = [0.0, 3.0]
    sampler = Sampler(SamplingParams(seed=5), len(logits))
    assert {sampler.sample(logits, NO_HISTORY) for _ in range(2000)} == {17, 4000}


# --- truncation: kept sets against their definitions -------------------------------------------------------


@given(logit_vectors, st.integers(0, 320))
def test_top_k_keeps_the_k_largest_lower_ids_first_on_ties(logits, k):
    expected = np.arange(len(logits)) if k == 0 else np.sort(reference_order(logits)[:k])
    np.testing.assert_array_equal(kept_by_top_k(logits, k), expected)


@given(tied_logit_vectors, st.integers(1, 50))
def test_top_k_on_tied_logits(logits, k):
    np.testing.assert_array_equal(kept_by_top_k(logits, k), np.sort(reference_order(logits)[:k]))


@given(st.one_of(logit_vectors, tied_logit_vectors), st.floats(0.001, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, top_p):
    assert_top_p_matches_reference(logits, top_p)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 8.0], ids=lambda s: f"logit-std-{s}")
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_on_a_large_vocabulary(scale, top_p):
    # Scales from nearly flat to peaked, so the answer needs 256, 4096 or all candidates.
    logits = (np.random.default_rng(int(scale * 10)).standard_normal(20_000) * scale).astype(np.float32)
    assert_top_p_matches_reference(logits, top_p)


def test_top_p_boundary_and_ties_follow_transformers():
    logits = np.zeros(4, dtype=np.float32)  # four tokens of probability 0.25
    # Two tokens reach exactly 0.5: transformers drops a token when the mass at and below it is <= 0.5.
    np.testing.assert_array_equal(kept_by_top_p(logits, 0.5), [0, 1])
    np.testing.assert_array_equal(kept_by_top_p(logits, 0.51), [0, 1, 2])
    np.testing.assert_array_equal(kept_by_top_p(logits, 1e-6), [0])
    np.testing.assert_array_equal(kept_by_top_p(logits, 1.0), [0, 1, 2, 3])


@given(st.one_of(logit_vectors, tied_logit_vectors), st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_with_at_least_min_p_times_the_top_probability(logits, min_p):
    relative = reference_probs(logits) / reference_probs(logits).max()
    # Tokens within rounding of the threshold have no one right answer, except at min_p = 1 for exact ties with
    # the top logit: a logit 3e-29 below the top rounds to the top's probability, yet is below it.
    near = np.abs(relative - min_p) <= 1e-5 * max(min_p, 1e-30)
    if min_p == 1.0:
        near &= logits != logits.max()
    assume(min_p == 0.0 or not near.any())
    expected = np.flatnonzero(relative >= min_p) if min_p > 0 else np.arange(len(logits))
    np.testing.assert_array_equal(kept_by_min_p(logits, min_p), expected)


def test_truncation_processors_keep_ids_and_logits_aligned():
    ids = np.array([3, 8, 20, 41])
    candidates = Candidates(ids, np.array([0.5, 3.0, -1.0, 2.0], dtype=np.float32))
    kept = MinP(0.2)(TopP(0.99)(TopK(3)(candidates, NO_HISTORY), NO_HISTORY), NO_HISTORY)
    np.testing.assert_array_equal(kept.ids, [8, 41])  # top-k drops 20; min-p drops 3 (e^-2.5 < 0.2)
    np.testing.assert_array_equal(kept.logits, [3.0, 2.0])


# --- penalties: hand examples -------------------------------------------------------------------------------


def test_repetition_penalty_matches_transformers_formula():
    candidates = Candidates(np.arange(5), np.array([2.0, -1.0, 0.5, 3.0, -4.0], dtype=np.float32))
    # Token 1 appears twice: still penalised once. Token 7 is outside the vocabulary candidates: ignored.
    RepetitionPenalty(2.0)(candidates, np.array([0, 1, 1, 4, 7]))
    np.testing.assert_array_equal(candidates.logits, [1.0, -2.0, 0.5, 3.0, -8.0])


def test_presence_and_frequency_penalties_subtract_once_and_per_occurrence():
    history = np.array([1, 1, 2, 4, 4, 4])
    candidates = Candidates(np.arange(5), np.zeros(5, dtype=np.float32))
    PresenceFrequencyPenalty(presence=0.5, frequency=0.25, last_n=None)(candidates, history)
    np.testing.assert_array_equal(candidates.logits, [0.0, -1.0, -0.75, 0.0, -1.25])

    recent_only = Candidates(np.arange(5), np.zeros(5, dtype=np.float32))
    PresenceFrequencyPenalty(presence=0.5, frequency=0.25, last_n=2)(recent_only, history)
    np.testing.assert_array_equal(recent_only.logits, [0.0, 0.0, 0.0, 0.0, -1.0])


def test_penalties_find_tokens_in_a_truncated_candidate_list():
    candidates = Candidates(np.array([2, 5, 9]), np.array([1.0, 1.0, 1.0], dtype=np.float32))
    PresenceFrequencyPenalty(presence=1.0, frequency=0.0, last_n=None)(candidates, np.array([0, 5, 10]))
    np.testing.assert_array_equal(candidates.logits, [1.0, 0.0, 1.0])


# --- the pipeline and its settings ---------------------------------------------------------------------------


def test_build_processors_order_is_penalties_temperature_then_truncation():
    params = SamplingParams(
        temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, frequency_penalty=0.1
    )
    assert [type(p) for p in build_processors(params)] == [
        RepetitionPenalty,
        PresenceFrequencyPenalty,
        Temperature,
        TopK,
        TopP,
        MinP,
    ]
    assert build_processors(SamplingParams()) == []
    assert [type(p) for p in build_processors(SamplingParams(greedy=True, top_k=5, repetition_penalty=1.2))] == [
        RepetitionPenalty
    ]


@pytest.mark.parametrize(
    "settings_, setting",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(presence_penalty=float("inf")), "presence_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(penalty_last_n=0), "penalty_last_n"),
        (dict(seed=-3), "seed"),
    ],
)
def test_validate_rejects_out_of_range_settings_by_name(settings_, setting):
    params = SamplingParams(**settings_)
    value = next(iter(settings_.values()))
    with pytest.raises(SamplingError, match=rf"^{setting} .*got {value!r}$"):
        params.validate()
    with pytest.raises(SamplingError, match=setting):
        Sampler(params, 10)


def test_validate_accepts_the_edges_of_each_range():
    for params in (
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=1.0, min_p=1.0, top_k=0),
        SamplingParams(min_p=0.0, repetition_penalty=0.5, penalty_last_n=None, seed=0),
    ):
        params.validate()


@settings(max_examples=50)
@given(logit_vectors, st.integers(0, 2**32))
def test_sampled_token_is_always_one_the_truncation_kept(logits, seed):
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.8, min_p=0.1, seed=seed)
    kept = Candidates(np.arange(len(logits)), logits.copy())
    for processor in build_processors(params):
        kept = processor(kept, NO_HISTORY)
    assert Sampler(params, len(logits)).sample(logits, NO_HISTORY) in set(kept.ids.tolist())
