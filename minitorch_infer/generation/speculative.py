"""Speculative decoding: guess the next few tokens cheaply, check them all in one model step, keep what holds.

A decode step of one sequence reads every weight to produce one token; a step over k+1 rows of the same
sequence reads them once too, so checking k guessed tokens in one step can turn every accepted guess into a
token that cost little. How little depends on the machine (BLAS's products with a few rows are much slower
than the matrix-vector product's memory speed on some), so the budget measures it. The pieces here:

- drafters, which guess: `NgramDrafter` (prompt lookup: the tokens that followed the last n tokens where
  they occurred before, in the prompt or the text so far) and `DraftModelDrafter` (a smaller model sharing
  the tokenizer, decoding greedily);
- `accept_prefix`, the speculative-sampling rule for a deterministic drafter: each guess is checked against
  plain decoding's own choice at its position, so greedy and seeded sampled runs give plain decoding's tokens;
- `DraftBudget`, which sizes each guess from the acceptance seen so far and what verify steps cost on this
  machine (`StepCosts`), and drafts only when it pays;
- `Speculator`, one request's drafter and budget, which the per-request Decoder drives.

Verifying and rolling back the KV cache past rejected guesses is the caller's (the generation loop's and
the engine's): they feed [last token, guesses...] in one step, ask for every row's logits, and truncate the
sequence to what was accepted.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.rope import is_position_dependent
from ..errors import SamplingError, shown

SPECULATION_MODES = ("ngram", "draft")
DEFAULT_DRAFT_MAX = 15          # the budget drafts fewer whenever fewer pay more
DEFAULT_NGRAM = 3
MAX_DRAFT = 15                  # a verify step carries draft + 1 rows, within the model's sequences per step

# What a verify step costs until it has been measured, in one-row decode steps: 1 + FIXED_COST + ROW_COST * k
# for k guesses. On the story model and SmolLM2 (2 cores, OpenBLAS, a loaded machine) a step of 2 rows cost
# 1.8-2.2 one-row steps and one of 9 rows 2.5-4.5 (one row has the lean matrix-vector path, several rows the
# general one).
FIXED_COST = 0.8
ROW_COST = 0.15
_PRIOR_ACCEPTED, _PRIOR_REJECTED = 4.0, 1.0   # a model's first request: as if 4 of 5 guesses held
_START_WEIGHT = 5.0                            # a request starts from the model's acceptance, as this many guesses
_MODEL_MEMORY = 0.95                           # the model's acceptance weighs past verifies by this
_MEMORY = 0.6                                  # each verify weighs the past by this: the last few count most
_FORGET = 0.95                                 # each step without drafting forgets this much of the rejections
_IDLE_STRIDE = 8                               # steps a budget's answer stands when no news comes
_HOPELESS_STRIDE = 256                         # ... when drafting could not pay even if every guess held
_REALIZED_START = 1.5                          # a model starts as if its verifies paid half a step more
_START_PAUSE = 32                              # a new request waits at most this long before trying
_REALIZED_WEIGHT = 0.25                        # a verify's weight in the model's yield per cost: one run
                                               # of luck on free text must not look like a text that repeats
_UNVERIFIED_GUESS = 4                          # tokens of a guess checked without verifying; all holding
                                               # ends a pause
_MARGIN = 1.3                                  # draft only for an expected yield this much above a plain step's
_TIMING_WEIGHT = 0.1                           # a new timing's weight in its moving average
_TIMING_CLIP = 10.0                            # a timing counts as at most this many times the average: a
                                               # machine's hiccup is cut short, a verify's recurring stalls are not


@dataclass(frozen=True)
class SpeculationSettings:
    """How a request speculates: `mode` "ngram" (prompt lookup) or "draft" (a draft model); `draft_max` tokens
    at most per step; `ngram` tokens to match (ngram mode); `draft_model` a loaded Model or its path/name."""

    mode: str
    draft_max: int = DEFAULT_DRAFT_MAX
    ngram: int = DEFAULT_NGRAM
    draft_model: Any = None


def speculation_settings(speculate: str | None = None, draft_max: int | None = None, ngram: int | None = None,
                         draft_model: Any = None) -> SpeculationSettings | None:
    """Checked settings from generate's keywords; None when the request does not speculate. A draft model
    alone means speculate="draft"."""
    if speculate is None and draft_model is not None:
        speculate = "draft"
    if speculate is None:
        if draft_max is not None or ngram is not None:
            raise SamplingError("draft_max and ngram need speculate='ngram' (or a draft model)")
        return None
    if speculate not in SPECULATION_MODES:
        raise SamplingError(f"speculate must be one of {', '.join(map(repr, SPECULATION_MODES))} or None, "
                            f"got {shown(speculate)}")
    if speculate == "draft" and draft_model is None:
        raise SamplingError("speculate='draft' needs a draft model (draft_model=, --draft-model PATH)")
    if speculate == "ngram" and draft_model is not None:
        raise SamplingError("speculate='ngram' drafts from the text itself: it takes no draft model")
    draft_max = DEFAULT_DRAFT_MAX if draft_max is None else draft_max
    ngram = DEFAULT_NGRAM if ngram is None else ngram
    _check_count("draft_max", draft_max, 1, MAX_DRAFT)
    _check_count("ngram", ngram, 1, 64)
    return SpeculationSettings(speculate, draft_max, ngram, draft_model)


def _check_count(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= value <= high:
        raise SamplingError(f"{name} must be an integer from {low} to {high}, got {shown(value)}")


# --- the acceptance rule -----------------------------------------------------------------------------------

def accept_prefix(draft: Sequence[int], choose: Callable[[int], int]) -> list[int]:
    """The tokens a verify step yields: the guesses that hold, then one token of the model's own.

    `choose(i)` is plain decoding's choice of the token at draft position i (row i of the verify step's logits),
    made with the guesses before i taken as the text so far: the argmax when greedy, a draw from the
    processed distribution p when sampling. A guess holds when that choice equals it; the first choice that
    differs replaces it, and when every guess holds, choose(len(draft)) adds the token after them.

    For sampling this is the speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) for a
    deterministic drafter, whose q puts all its mass on the guess d: keep d with probability min(1, p(d)/q(d))
    = p(d), else draw from the residual max(0, p - q), normalised, which is p without d. Drawing x from p and
    keeping d exactly when x = d does both with one draw: P(x = d) = p(d), and x given x != d is distributed as
    that residual. So each token is distributed as plain sampling's, and with the same random generator it is
    the very token plain sampling would draw: a seeded run gives plain decoding's tokens, however much it
    guessed.
    """
    tokens = []
    for i, guess in enumerate(draft):
        tokens.append(choose(i))
        if tokens[-1] != guess:
            return tokens
    tokens.append(choose(len(draft)))
    return tokens


# --- drafters ----------------------------------------------------------------------------------------------

class NgramDrafter:
    """Prompt lookup: find the most recent earlier occurrence of the last `ngram` tokens and propose the
    tokens that followed it. No model, and a dictionary lookup a step: it pays when the output repeats its
    input (quoting, rewriting, summarising a given text, code edits) and proposes nothing otherwise.

    The index maps every n-gram that has a token after it to where its most recent such occurrence ends; it
    grows with the history, which within one request only ever grows."""

    free = True            # a guess costs a lookup: the budget may check guesses it does not verify

    def __init__(self, ngram: int):
        self.ngram = ngram
        self._tokens: list[int] = []
        self._follows: dict[tuple[int, ...], int] = {}

    def propose(self, history: np.ndarray, count: int) -> list[int]:
        n, tokens = self.ngram, self._tokens
        if len(history) < len(tokens):                     # not the history it has seen: start over
            tokens.clear()
            self._follows.clear()
        indexed = len(tokens)
        tokens += history[indexed:].tolist()
        # The n-grams that now have a token after them: those ending before the last token.
        for end in range(max(indexed, n), len(tokens)):
            self._follows[tuple(tokens[end - n:end])] = end
        follow = self._follows.get(tuple(tokens[-n:])) if len(tokens) > n else None
        return tokens[follow:follow + count] if follow is not None else []

    def close(self) -> None:
        pass


class DraftModelDrafter:
    """A smaller model with the same vocabulary guesses greedily. It keeps its own KV-cache sequence in step
    with the request's tokens: each call truncates it to what the history still shares and feeds the rest."""

    free = False           # a guess costs draft-model steps

    def __init__(self, draft_model, target_model):
        check_same_vocabulary(draft_model, target_model)
        self.model = draft_model
        self.sequence = draft_model.kv_cache.open()

    def propose(self, history: np.ndarray, count: int) -> list[int]:
        sequence, model = self.sequence, self.model
        count = min(count, model.context - len(history))   # the draft's own context bounds its guesses
        if count < 1:
            return []
        held = np.asarray(sequence.tokens[:len(history) - 1], dtype=np.int64)   # feed at least one token
        differ = np.flatnonzero(held != history[:len(held)])
        common = int(differ[0]) if len(differ) else len(held)
        sequence.truncate(common)
        logits = model.forward(sequence, history[common:])
        proposal = []
        while True:
            proposal.append(int(np.argmax(logits)))
            if len(proposal) == count:
                return proposal
            logits = model.decode_step(sequence, proposal[-1])

    def close(self) -> None:
        self.sequence.close()


def check_same_vocabulary(draft_model, target_model) -> None:
    """A draft must number tokens exactly as the model does, or its guesses mean other words."""
    draft_size, target_size = draft_model.config.vocab_size, target_model.config.vocab_size
    differs = draft_size != target_size
    if not differs and draft_model.tokenizer is not None and target_model.tokenizer is not None:
        differs = draft_model.tokenizer.backend.get_vocab() != target_model.tokenizer.backend.get_vocab()
    if differs:
        raise SamplingError(
            f"the draft model {draft_model.source} (vocabulary of {draft_size} tokens) does not share the "
            f"vocabulary of {target_model.source} ({target_size} tokens): a draft model must use the same tokenizer")


def resolve_draft_model(draft_model, target_model):
    """The draft as a loaded model: a Model is used as it is; a path or name is loaded once per target model,
    with the target's context."""
    if hasattr(draft_model, "config"):
        return draft_model
    if not isinstance(draft_model, str):
        raise SamplingError(f"draft_model must be a loaded model or a path or name, got {shown(draft_model)}")
    loaded = target_model.__dict__.setdefault("_draft_models", {})
    if draft_model not in loaded:
        from ..loading import load

        loaded[draft_model] = load(draft_model, context=target_model.context)
    return loaded[draft_model]


# --- how much to draft -------------------------------------------------------------------------------------

class StepCosts:
    """What a verify step of k guesses costs, in plain decode steps, as measured for one model on this machine
    (drafting, the step and verifying, against a plain step with its sampling), and what the model's recent
    requests saw, which is where a new request's budget starts: how often guesses held, what verifies
    yielded per cost, and how long drafting pauses after a verify that did not pay.

    Until a size has been measured, a size measured nearby is scaled by the default model, or the default
    model answers alone: 1 + FIXED_COST + ROW_COST * k. Timings move averages slowly and one outlier (a
    machine busy for a moment) moves them only so far; the first step of each size is not counted, since it also
    binds the program for that many rows. Where drafting happens never changes the tokens (see
    accept_prefix), so adapting to the machine's speed is safe."""

    def __init__(self):
        self.plain: float | None = None
        self.verify: list[float | None] = [None] * (MAX_DRAFT + 1)
        self._bound = [False] * (MAX_DRAFT + 1)
        self._nearest: list[int | None] = [None] * (MAX_DRAFT + 1)   # the measured size that stands for each
        self.accepted, self.rejected = _PRIOR_ACCEPTED, _PRIOR_REJECTED
        self.realized = _REALIZED_START
        self.pause = _IDLE_STRIDE

    @staticmethod
    def default(k: int) -> float:
        return 1 + FIXED_COST + ROW_COST * k

    def record_plain(self, seconds: float) -> None:
        self.plain = _moving_average(self.plain, seconds)

    def record_verify(self, k: int, seconds: float) -> None:
        if not self._bound[k]:         # the first step of a size also binds the program's kernels for it
            self._bound[k] = True
            return
        if self.verify[k] is None:     # a size measured for the first time: the nearest measured size for each
            measured = [size for size in range(1, MAX_DRAFT + 1) if self.verify[size] is not None] + [k]
            self._nearest = [min(measured, key=lambda size: abs(size - j)) for j in range(MAX_DRAFT + 1)]
        self.verify[k] = _moving_average(self.verify[k], seconds)

    def record_guesses(self, accepted: float, rejected: float) -> None:
        self.accepted = self.accepted * _MODEL_MEMORY + accepted
        self.rejected = self.rejected * _MODEL_MEMORY + rejected

    def relative(self, k: int) -> float:
        near = self._nearest[k]
        if self.plain is None or near is None:
            return self.default(k)
        return self.verify[near] / self.plain * self.default(k) / self.default(near)


def _moving_average(average: float | None, sample: float) -> float:
    if average is None:
        return sample
    return average + _TIMING_WEIGHT * (min(sample, _TIMING_CLIP * average) - average)


_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_costs(model) -> StepCosts:
    """The model's StepCosts, shared by every request it runs."""
    if model not in _COSTS:
        _COSTS[model] = StepCosts()
    return _COSTS[model]


class DraftBudget:
    """How many tokens to draft next, from the acceptance seen so far and what verify steps cost.

    With a chance a that each guess holds (given the ones before it held), a verify of k guesses yields
    1 + a + ... + a^k tokens for the cost of costs.relative(k) plain steps. The budget picks the k that yields
    most per cost, and 0 (plain decoding) when no k beats one token per step by _MARGIN (an estimate that
    promises little is as likely to lose as to win). Its answer stands for _IDLE_STRIDE steps unless news of
    the guesses comes sooner, so a request that does not draft pays almost nothing for being able to.

    News of the guesses comes from verify steps and, with a free drafter (prompt lookup), from its guesses
    made while not drafting, checked against the tokens plain decoding chose (record_unverified): the
    estimate follows the text at no cost. A drafter that costs steps to ask (a draft model) gets no such
    news, so while the budget does not draft it forgets a little of the rejections, to try again later.

    Guesses come in runs (a quoted passage holds for many tokens, then nothing does), which the estimate of a
    follows only after the fact. So the model's StepCosts also keep what verifies really yielded per cost:
    while that falls short of a plain step, drafting pauses, twice as long after each verify that still falls
    short, and goes back to pausing briefly once one pays.
    """

    def __init__(self, draft_max: int, costs: StepCosts, checks_unverified: bool = False):
        self.draft_max = draft_max
        self.costs = costs
        self.checks_unverified = checks_unverified
        self.hopeless = False      # verify steps cost so much that even guesses that always hold would not pay
        # Start from the model's recent acceptance, weighted as a few guesses, so the request's own soon count.
        share = costs.accepted / (costs.accepted + costs.rejected)
        self.accepted, self.rejected = _START_WEIGHT * share, _START_WEIGHT * (1 - share)
        # ... and paused a while if the model's recent verifies did not pay.
        self._idle = min(costs.pause, _START_PAUSE) if costs.realized < 1 else 0
        self._size, self._standing = 0, 0       # the last answer, and for how many more steps it stands

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def size(self) -> int:
        """Guesses to draft now (0: decode plainly this step)."""
        if self._idle:
            self._idle -= 1
            return 0
        if self._standing:
            self._standing -= 1
            return self._size
        a = self.acceptance
        best_size, best_yield, tokens, power = 0, _MARGIN, 1.0, 1.0
        for k in range(1, self.draft_max + 1):
            power *= a
            tokens += power
            value = tokens / self.costs.relative(k)
            if value > best_yield:
                best_size, best_yield = k, value
            elif best_size:
                break                # the yield per cost rises to one peak, then falls
        self._size, self._standing = best_size, _IDLE_STRIDE - 1
        self.hopeless = not best_size and self.draft_max + 1 <= self.costs.relative(self.draft_max)
        if not best_size:
            # Rarely rechecked when even guesses that always hold would not pay (verify steps are that dear).
            stride = _HOPELESS_STRIDE if self.hopeless else _IDLE_STRIDE
            if not self.checks_unverified:       # with no other news of the guesses, hope a little
                self.rejected *= _FORGET ** stride
            self._standing = stride - 1
        return best_size

    def record(self, drafted: int, accepted: int) -> None:
        self._standing = 0
        rejected = int(accepted < drafted)
        self.accepted = self.accepted * _MEMORY + accepted
        self.rejected = self.rejected * _MEMORY + rejected
        self.costs.record_guesses(accepted, rejected)
        costs = self.costs
        costs.realized += _REALIZED_WEIGHT * ((accepted + 1) / costs.relative(drafted) - costs.realized)
        if costs.realized < 1:
            self._idle = costs.pause
            costs.pause = min(2 * costs.pause, _HOPELESS_STRIDE)
        else:
            costs.pause = _IDLE_STRIDE

    def record_unverified(self, held: int, failed: bool) -> None:
        """A guess the drafter made while the budget did not draft, checked against the tokens plain decoding
        chose: `held` guesses matched, then one did not (`failed`) or the guess ran out. It is news of the
        acceptance that costs no verify step, so a text that starts to repeat itself is seen at once (a guess
        that held throughout ends a pause), and one that does not is never drafted on in hope."""
        self.accepted = self.accepted * _MEMORY + held
        self.rejected = self.rejected * _MEMORY + failed
        self.costs.record_guesses(held, failed)
        self._standing = 0
        if not failed:
            self._idle = 0


class Speculator:
    """One request's speculation: its drafter, its budget and the counts a benchmark reports."""

    def __init__(self, settings: SpeculationSettings, model):
        if is_position_dependent(model.config.rope_scaling):
            # Its rotations follow the step's last position, so a row verified beside later ones would not be
            # computed as plain decoding computes it.
            raise SamplingError(f"speculative decoding cannot run {model.source}: its rope scaling (dynamic NTK) "
                                "depends on the step's positions")
        if settings.mode == "ngram":
            self.drafter = NgramDrafter(settings.ngram)
        else:
            self.drafter = DraftModelDrafter(resolve_draft_model(settings.draft_model, model), model)
        self.costs = step_costs(model)
        self.budget = DraftBudget(settings.draft_max, self.costs, checks_unverified=self.drafter.free)
        self.drafted = self.accepted = self.verify_steps = 0
        # A free drafter's guess made while not drafting, the tokens of it still to be checked, and how many
        # of it held so far; checked one token a step against what plain decoding chose.
        self._unverified: list[int] = []
        self._unverified_held = 0
        self._checked_length = -1     # the history's length when the guess was made

    def propose(self, history: np.ndarray, room: int) -> list[int]:
        """Up to `room` guessed tokens to follow `history` (none when drafting does not pay or finds nothing)."""
        size = self.budget.size()
        if size and room > 0:
            self._unverified = []
            return self.drafter.propose(history, min(size, room))
        if self.budget.checks_unverified:
            self._check_unverified(history)
        return []

    def _check_unverified(self, history: np.ndarray) -> None:
        """Check the last unverified guess against the token plain decoding has added since, and guess anew
        once it is settled."""
        if self._unverified and len(history) == self._checked_length + 1:
            if int(history[-1]) == self._unverified[0]:
                self._unverified_held += 1
                del self._unverified[0]
                if self._unverified:
                    self._checked_length += 1
                    return
                self.budget.record_unverified(self._unverified_held, failed=False)
            else:
                self.budget.record_unverified(self._unverified_held, failed=True)
        if self.budget.hopeless:
            self._unverified = []
            return
        self._unverified = self.drafter.propose(history, _UNVERIFIED_GUESS)
        self._unverified_held, self._checked_length = 0, len(history)

    def record(self, drafted: int, accepted: int) -> None:
        self.budget.record(drafted, accepted)
        self.drafted += drafted
        self.accepted += accepted
        self.verify_steps += 1

    def close(self) -> None:
        self.drafter.close()
