"""Turning one step's logits into the next token: a pipeline of logits processors, then a seeded draw.

The pipeline works on `Candidates`, the token ids still in the running and their logits (llama.cpp's
`llama_token_data_array`). It starts as the whole vocabulary; penalties and temperature adjust logits in
place, and truncation processors (top-k, top-p, min-p) shrink the candidate list, so every later step,
the softmax and the draw only touch the survivors. `build_processors` lays them out in the order
transformers uses:

    repetition penalty → presence/frequency penalty → temperature → top-k → top-p → min-p → draw

Truncation comes after temperature, so top-p and min-p see the tempered distribution (as in
transformers and vLLM; llama.cpp's default chain tempers last instead).

Greedy decoding (`greedy=True`, `temperature=0` or `top_k=1`) applies the penalties and takes the argmax
(lowest id on ties); it never touches the random generator.

Ties: wherever a truncation must choose among equal logits, the lower token id wins, so the result is
deterministic and `top_k=1` is exactly the argmax. (transformers' top-k keeps every token tied with the
k-th; its top-p cuts ties in whatever order torch's sort left them.)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import SamplingError

# How many candidates top-p looks at before looking at more: trained models usually put 0.9 of the mass
# on a few hundred tokens at most, so one partial partition settles it; flat distributions need a sort.
_TOP_P_TRY_SIZES = (256, 4096)

# Block length for running sums: NumPy's cumsum is a scalar loop (~3 ns a token, 150 us over a 49k
# vocabulary), while block totals are vectorised, so only the one block that matters gets a running sum.
_RUNNING_SUM_BLOCK = 512


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. The defaults sample from the model's plain softmax.

    `temperature=0` means greedy, as does `top_k=1`. The repetition penalty (transformers' semantics)
    covers the whole history, prompt included; presence and frequency penalties (OpenAI/llama.cpp
    semantics) cover the last `penalty_last_n` tokens of the history (None: all of it), as llama.cpp's
    `repeat_last_n` does. `seed=None` seeds from the operating system: draws differ from run to run.
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int | None = 64
    seed: int | None = None

    @property
    def is_greedy(self) -> bool:
        """True when the choice is the argmax of the penalised logits."""
        return self.greedy or self.temperature == 0 or self.top_k == 1

    def validate(self) -> None:
        """Raise SamplingError naming the first setting that is out of range."""
        # Each check negates what is allowed (`not (0 < x <= 1)`, not `x <= 0 or x > 1`), so NaN fails it.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            _reject("temperature must be >= 0", self.temperature)
        if not (isinstance(self.top_k, numbers.Integral) and self.top_k >= 0):
            _reject("top_k must be an integer >= 0 (0 = off)", self.top_k)
        if not (0 < self.top_p <= 1):
            _reject("top_p must be in (0, 1]", self.top_p)
        if not (0 <= self.min_p <= 1):
            _reject("min_p must be in [0, 1]", self.min_p)
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            _reject("repetition_penalty must be > 0", self.repetition_penalty)
        if not math.isfinite(self.presence_penalty):
            _reject("presence_penalty must be finite", self.presence_penalty)
        if not math.isfinite(self.frequency_penalty):
            _reject("frequency_penalty must be finite", self.frequency_penalty)
        if self.penalty_last_n is not None and not (
            isinstance(self.penalty_last_n, numbers.Integral) and self.penalty_last_n >= 1
        ):
            _reject("penalty_last_n must be an integer >= 1 or None (whole history)", self.penalty_last_n)
        if self.seed is not None and not (isinstance(self.seed, numbers.Integral) and self.seed >= 0):
            _reject("seed must be an integer >= 0 or None", self.seed)


def _reject(rule: str, value: object) -> None:
    raise SamplingError(f"{rule}, got {value!r}")


@dataclass
class Candidates:
    """The tokens still in the running: ids in ascending order and their float32 logits, aligned."""

    ids: np.ndarray
    logits: np.ndarray

    def keep(self, positions: np.ndarray) -> Candidates:
        """The candidates at `positions` (ascending), a new, smaller set."""
        return Candidates(self.ids[positions], self.logits[positions])

    def locate(self, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of those `token_ids` that are candidates, and a mask saying which ids those were."""
        positions = np.searchsorted(self.ids, token_ids)
        present = positions < len(self.ids)
        present[present] = self.ids[positions[present]] == token_ids[present]
        return positions[present], present


class LogitsProcessor(Protocol):
    """One pipeline step. It owns the candidates it is given: it may edit them in place or return new ones."""

    def __call__(self, candidates: Candidates, history: np.ndarray) -> Candidates: ...


class RepetitionPenalty:
    """transformers' repetition penalty: each token seen in the history, however often, has a positive
    logit divided by `penalty` and any other logit multiplied by it."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, candidates: Candidates, history: np.ndarray) -> Candidates:
        positions, _ = candidates.locate(np.unique(history))
        seen = candidates.logits[positions]
        candidates.logits[positions] = np.where(seen > 0, seen / self.penalty, seen * self.penalty)
        return candidates


class PresenceFrequencyPenalty:
    """OpenAI's presence and frequency penalties over the last `last_n` history tokens (None: all):
    logit -= presence * (count > 0) + frequency * count."""

    def __init__(self, presence: float, frequency: float, last_n: int | None):
        self.presence = presence
        self.frequency = frequency
        self.last_n = last_n

    def __call__(self, candidates: Candidates, history: np.ndarray) -> Candidates:
        window = history if self.last_n is None else history[-self.last_n :]
        tokens, counts = np.unique(window, return_counts=True)
        positions, present = candidates.locate(tokens)
        penalty = counts[present].astype(np.float32) * np.float32(self.frequency) + np.float32(self.presence)
        candidates.logits[positions] -= penalty
        return candidates


class Temperature:
    """Divide the logits by the temperature (> 0): below 1 sharpens the distribution, above 1 flattens it."""

    def __init__(self, temperature: float):
        if not temperature > 0:
            raise SamplingError(f"Temperature needs a temperature > 0 (use greedy for 0), got {temperature!r}")
        self.temperature = temperature

    def __call__(self, candidates: Candidates, history: np.ndarray) -> Candidates:
        np.divide(candidates.logits, np.float32(self.temperature), out=candidates.logits)
        return candidates


class TopK:
    """Keep the `k` highest logits."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, candidates: Candidates, history: np.ndarray) -> Candidates:
        return candidates.keep(kept_by_top_k(candidates.logits, self.k))


class TopP:
    """Nucleus sampling: keep the smallest set of most probable tokens whose probability reaches `top_p`."""

    def __init__(self, top_p: float):
        self.top_p = top_p

    def __call__(self, candidates: Candidates, history: np.ndarray) -> Candidates:
        return candidates.keep(kept_by_top_p(candidates.logits, self.top_p))


class MinP:
    """Keep the tokens whose probability is at least `min_p` times the top token's."""

    def __init__(self, min_p: float):
        self.min_p = min_p

    def __call__(self, candidates: Candidates, history: np.ndarray) -> Candidates:
        return candidates.keep(kept_by_min_p(candidates.logits, self.min_p))


def kept_by_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Ascending positions of the `k` largest logits (all of them when k is 0 or covers them all)."""
    if k <= 0:
        return np.arange(len(logits))
    return _largest(logits, k)


def kept_by_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Ascending positions of the smallest set of largest logits whose softmax mass reaches `top_p`.

    A token is kept when the mass of the tokens ranked above it is below `top_p`, which is
    transformers' TopPLogitsWarper (it drops a token when the mass at and below it is <= 1 - top_p).
    """
    n = len(logits)
    if top_p >= 1.0:
        return np.arange(n)
    # Unnormalised weights: comparing their running sum with top_p * total skips a division.
    target = top_p * np.exp(logits - logits.max()).sum()
    for size in [*(size for size in _TOP_P_TRY_SIZES if size < n), n]:
        values = _largest_values_descending(logits, size)
        weights = np.exp(values - values[0])
        # Over the whole vocabulary, rounding can leave the sum a hair under the target: keep everything.
        if weights.sum() >= target or size == n:
            break
    count = min(_search_running_sum(weights, target, side="left") + 1, size)
    return _largest(logits, count, threshold=values[count - 1])


def kept_by_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Ascending positions of the tokens with probability >= min_p * the top probability.

    In logits that is `logit >= max + log(min_p)`: no softmax needed.
    """
    if min_p <= 0:
        return np.arange(len(logits))
    return np.flatnonzero(logits >= logits.max() + math.log(min_p))


def _largest(logits: np.ndarray, count: int, threshold: np.float32 | None = None) -> np.ndarray:
    """Ascending positions of the `count` largest logits; among equal logits the lower position wins.

    `threshold` is the count-th largest logit, if the caller already knows it.
    """
    n = len(logits)
    if count >= n:
        return np.arange(n)
    if threshold is None:
        # A partial partition finds the count-th largest value without sorting the vocabulary.
        threshold = np.partition(logits, n - count)[n - count]
    keep = logits > threshold
    ties = np.flatnonzero(logits == threshold)
    keep[ties[: count - np.count_nonzero(keep)]] = True
    return np.flatnonzero(keep)


def _largest_values_descending(logits: np.ndarray, size: int) -> np.ndarray:
    """The `size` largest logits, largest first."""
    n = len(logits)
    if size >= n:
        return np.sort(logits)[::-1]
    return np.sort(np.partition(logits, n - size)[n - size :])[::-1]


def draw(candidates: Candidates, rng: np.random.Generator) -> int:
    """Draw one token from the softmax of the candidates' logits, using exactly one uniform from `rng`."""
    # Inverse CDF on unnormalised weights: subtracting the maximum keeps exp() from overflowing, and
    # scaling the uniform by the total replaces the division of a softmax.
    weights = np.exp(candidates.logits - candidates.logits.max())
    u = rng.random() * weights.sum()
    return int(candidates.ids[_search_running_sum(weights, u, side="right")])


def _search_running_sum(weights: np.ndarray, value: float, side: str) -> int:
    """`np.searchsorted(np.cumsum(weights), value, side)` for weights >= 0, but never past the last
    positive weight (so rounding cannot pick a token of probability 0), computed block by block."""
    starts = np.arange(0, len(weights), _RUNNING_SUM_BLOCK)
    block_ends = np.cumsum(np.add.reduceat(weights, starts))
    block = min(np.searchsorted(block_ends, value, side), _last_increase(block_ends))
    before = block_ends[block - 1] if block > 0 else 0
    inside = np.cumsum(weights[starts[block] : starts[block] + _RUNNING_SUM_BLOCK])
    return int(starts[block] + min(np.searchsorted(inside, value - before, side), _last_increase(inside)))


def _last_increase(running_sum: np.ndarray) -> int:
    """Index of the last positive weight behind a running sum (where it first reaches its final value)."""
    return int(np.searchsorted(running_sum, running_sum[-1], side="left"))


def build_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """The standard pipeline for `params`, skipping every step that would do nothing."""
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(params.repetition_penalty))
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        processors.append(
            PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty, params.penalty_last_n)
        )
    if params.is_greedy:
        return processors  # temperature and truncation cannot change the argmax
    if params.temperature != 1.0:
        processors.append(Temperature(params.temperature))
    if params.top_k > 0:
        processors.append(TopK(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopP(params.top_p))
    if params.min_p > 0.0:
        processors.append(MinP(params.min_p))
    return processors


class Sampler:
    """Picks tokens for one generation: the pipeline is built once, the generator seeded once.

    Pass `processors` to run a pipeline of your own instead of the one built from `params`; `params`
    then still decides greedy versus sampled and the seed.
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        processors: Sequence[LogitsProcessor] | None = None,
    ):
        params.validate()
        if vocab_size < 1:
            raise SamplingError(f"vocab_size must be >= 1, got {vocab_size}")
        self.params = params
        self.vocab_size = vocab_size
        self.processors = list(processors) if processors is not None else build_processors(params)
        self._all_ids = np.arange(vocab_size)
        self._all_ids.flags.writeable = False  # shared by every step's initial Candidates
        self._rng = np.random.default_rng(params.seed)
        # Greedy with nothing editing the logits: a token is the row's argmax, which a caller holding many
        # requests' rows may take for all of them at once (the batched engine).
        self.plain_argmax = params.is_greedy and not self.processors

    def sample(self, logits: np.ndarray, history: np.ndarray) -> int:
        """The next token, given this step's logits [vocab] and every token id so far (prompt + output)."""
        if logits.shape != (self.vocab_size,):
            raise SamplingError(f"logits must have shape ({self.vocab_size},), got {logits.shape}")
        if self.plain_argmax:
            # Nothing to edit: no copy (a greedy decode step's common case); the method skips np.argmax's
            # dispatch (1.2 against 3.6 us).
            return int(logits.argmax())
        # One private float32 copy: processors edit it in place and the caller's buffer stays intact.
        candidates = Candidates(self._all_ids, np.array(logits, dtype=np.float32))
        history = np.asarray(history, dtype=np.int64)
        for processor in self.processors:
            candidates = processor(candidates, history)
        if self.params.is_greedy:
            return int(candidates.ids[np.argmax(candidates.logits)])
        return draw(candidates, self._rng)
