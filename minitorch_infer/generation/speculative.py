"""Speculative decoding: guess the next few tokens cheaply, check them all in one model step, keep what holds.

A decode step of one sequence reads every weight to produce one token; a step over k+1 rows of the same
sequence costs little more (the weights are read once), so checking k guessed tokens at once turns every
accepted guess into a token that cost almost nothing. The pieces here:

- drafters, which guess: `NgramDrafter` (prompt lookup: the tokens that followed the last n tokens where
  they occurred before, in the prompt or the text so far) and `DraftModelDrafter` (a smaller model sharing
  the tokenizer, decoding greedily);
- `accept_or_resample`, the speculative-sampling rule that decides each guess against the model's own
  distribution, so the output is distributed exactly as plain sampling's (greedy: exactly the same tokens);
- `DraftBudget`, which sizes each guess from the acceptance seen so far and drafts only when it pays;
- `Speculator`, one request's drafter and budget, which the per-request Decoder drives.

Verifying and rolling back the KV cache past rejected guesses is the caller's (the generation loop's and
the engine's): they feed [last token, guesses...] in one step, ask for every row's logits, and truncate the
sequence to what was accepted.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.rope import is_position_dependent
from ..errors import SamplingError, shown

SPECULATION_MODES = ("ngram", "draft")
DEFAULT_DRAFT_MAX = 8
DEFAULT_NGRAM = 3
MAX_DRAFT = 15                  # a verify step carries draft + 1 rows, within the model's sequences per step

# What one extra row costs a step, as a fraction of a one-row decode step. Measured on the story model and
# SmolLM2 (2 cores, OpenBLAS): 8 rows cost 2-3.5x one row. A constant, not a timing, so that where drafting
# happens (and with it a seeded run's random draws) never depends on how busy the machine is.
ROW_COST = 0.25
_PRIOR_ACCEPTED, _PRIOR_REJECTED = 4.0, 1.0   # start as if 4 of 5 guesses held: draft a few, then learn
_MEMORY = 0.6                                  # each verify weighs the past by this: the last few count most
_FORGET = 0.9                                  # a step without drafting forgets this much of the rejections


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


# --- the acceptance rule --------------------------------------------------------------------------------

def accept_or_resample(p: np.ndarray, q: np.ndarray | None, draft: int, rng: np.random.Generator
                       ) -> tuple[int, bool]:
    """Decide one drafted token by the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023).

    p is the model's probability of every token at this position (the distribution plain sampling would draw
    from), q the drafter's (None for a deterministic drafter: all of q's mass on `draft`). The draft is kept
    with probability min(1, p[draft] / q[draft]); otherwise a token is drawn from the residual
    max(0, p - q), normalised. Either way the token returned is distributed exactly as p. Returns (token,
    whether the draft was kept); uses one uniform from `rng` to decide and one more to resample.
    """
    q_draft = 1.0 if q is None else float(q[draft])
    if rng.random() * q_draft < p[draft]:                   # u < p/q, without dividing by a zero q
        return draft, True
    if q is None:
        residual = p.copy()
        residual[draft] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    if not total > 0:           # p == q up to rounding: acceptance was certain in exact arithmetic
        residual, total = p, p.sum()
    running = np.cumsum(residual)
    token = int(np.searchsorted(running, rng.random() * total, side="right"))
    return min(token, int(np.flatnonzero(residual)[-1])), False   # rounding never picks a token of weight 0


# --- drafters ----------------------------------------------------------------------------------------------

class NgramDrafter:
    """Prompt lookup: find the most recent earlier occurrence of the last `ngram` tokens and propose the
    tokens that followed it. Costs a scan of the history and no model: it pays when the output repeats its
    input (quoting, rewriting, summarising a given text, code edits) and proposes nothing otherwise."""

    def __init__(self, ngram: int):
        self.ngram = ngram

    def propose(self, history: np.ndarray, count: int) -> list[int]:
        n, length = self.ngram, len(history)
        if length <= n or count < 1:
            return []
        tail = history[length - n:]
        # Every window that ends before the last token, so a match has at least one token after it.
        windows = np.lib.stride_tricks.sliding_window_view(history[:length - 1], n)
        matches = np.flatnonzero((windows == tail).all(axis=1))
        if not len(matches):
            return []
        follow = int(matches[-1]) + n
        return [int(t) for t in history[follow:follow + count]]

    def close(self) -> None:
        pass


class DraftModelDrafter:
    """A smaller model with the same vocabulary guesses greedily. It keeps its own KV-cache sequence in step
    with the request's tokens: each call truncates it to what the history still shares and feeds the rest."""

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

class DraftBudget:
    """How many tokens to draft next, from the acceptance seen so far.

    With a chance a that each guess holds (given the ones before it held), a verify of k guesses yields
    1 + a + ... + a^k tokens for the cost of a step with k more rows (1 + ROW_COST * k steps). The budget
    picks the k that yields most per cost, and 0 (plain decoding) when no k beats one token per step. A step
    without drafting forgets a little of the rejections, so drafting is tried again later. Everything here
    counts tokens, never time: the same run drafts the same way on any machine.
    """

    def __init__(self, draft_max: int, row_cost: float = ROW_COST):
        self.draft_max = draft_max
        self.row_cost = row_cost
        self.accepted, self.rejected = _PRIOR_ACCEPTED, _PRIOR_REJECTED

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def size(self) -> int:
        a = self.acceptance
        best_size, best_yield = 0, 1.0
        for k in range(1, self.draft_max + 1):
            tokens = k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
            value = tokens / (1 + self.row_cost * k)
            if value > best_yield:
                best_size, best_yield = k, value
        return best_size

    def record(self, drafted: int, accepted: int) -> None:
        self.accepted = self.accepted * _MEMORY + accepted
        self.rejected = self.rejected * _MEMORY + (accepted < drafted)

    def idle(self) -> None:
        self.rejected *= _FORGET


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
        self.budget = DraftBudget(settings.draft_max)
        self.drafted = self.accepted = self.verify_steps = 0

    def propose(self, history: np.ndarray, room: int) -> list[int]:
        """Up to `room` guessed tokens to follow `history` (none when drafting does not pay or finds nothing)."""
        size = self.budget.size()
        if size < 1:
            self.budget.idle()
            return []
        return self.drafter.propose(history, min(size, room)) if room > 0 else []

    def record(self, drafted: int, accepted: int) -> None:
        self.budget.record(drafted, accepted)
        self.drafted += drafted
        self.accepted += accepted
        self.verify_steps += 1

    def close(self) -> None:
        self.drafter.close()
