"""Quality of a model (and of its weight type): perplexity over sliding windows, and how far its predictions
move from a reference run of the same model (KL divergence, top-1 agreement).

Windows follow transformers' perplexity guide (llama.cpp's perplexity tool is the same idea with disjoint
windows): each window holds up to `context` tokens and starts `stride` after the last; only the tokens no
earlier window scored are scored, each predicted with all the window's tokens before it as context.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import MinitorchError

ROWS_AT_ONCE = 64          # log-softmax in float64 over this many positions at a time (memory: rows x vocab)


@dataclass
class Window:
    begin: int             # first token of the window
    end: int               # one past its last token
    first_scored: int      # tokens begin + first_scored .. end - 1 are scored


@dataclass
class EvalReport:
    model: str
    weights: str
    weights_mib: float
    weight_types: str                # what the weights are held as, e.g. "210 q4_1, 61 f32, 1 q8_0 tensors"
    tokens: int
    context: int
    stride: int
    windows: int
    scored: int                      # tokens whose probability was measured
    perplexity: float
    seconds: float
    reference_weights: str | None = None
    reference_perplexity: float | None = None
    kl_mean: float | None = None     # KL(reference || model) per scored token, in nats
    kl_p99: float | None = None
    top1_agreement: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"{self.model} ({self.weights}: {self.weights_mib:.1f} MiB, {self.weight_types}): {self.tokens} tokens, {self.windows} windows of up to "
                 f"{self.context} (stride {self.stride}), {self.scored} scored, {self.seconds:.1f} s",
                 f"perplexity {self.perplexity:.4f}"]
        if self.reference_weights is not None:
            lines[-1] += f" (reference {self.reference_weights}: {self.reference_perplexity:.4f})"
            lines.append(f"KL divergence from {self.reference_weights}: mean {self.kl_mean:.6f}, p99 "
                         f"{self.kl_p99:.6f}; top-1 agreement {100 * self.top1_agreement:.2f}%")
        return "\n".join(lines)


def sliding_windows(tokens: int, context: int, stride: int) -> list[Window]:
    """The windows over `tokens` tokens. No token is scored twice; a window's first token has no context, so
    it is not scored in that window (with stride == context, as in transformers' guide, it never is)."""
    if context < 2 or not 0 < stride <= context:
        raise MinitorchError(f"need context >= 2 and 0 < stride <= context, got context {context}, stride {stride}")
    if tokens < 2:
        raise MinitorchError(f"the text has {tokens} token(s); at least 2 are needed to score one")
    windows, scored_to = [], 0
    for begin in range(0, tokens, stride):
        end = min(begin + context, tokens)
        windows.append(Window(begin, end, max(scored_to - begin, 1)))
        scored_to = end
        if end == tokens:
            break
    return windows


def evaluate(model, token_ids: Sequence[int], context: int, stride: int, reference=None,
             progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Perplexity of `model` on `token_ids`; with a `reference` model (the same model at another weight type),
    also its perplexity and the per-token KL divergence and top-1 agreement between the two."""
    began = time.perf_counter()
    windows = sliding_windows(len(token_ids), context, stride)
    ids = np.asarray(token_ids)
    nll, reference_nll, kl, agree = [], [], [], []
    for done, window in enumerate(windows, start=1):
        targets = ids[window.begin + window.first_scored:window.end]
        for log_probs, reference_log_probs, rows in _scored_log_probs(model, reference, ids, window):
            picked = targets[rows]
            nll.append(-log_probs[np.arange(len(picked)), picked])
            if reference is not None:
                reference_nll.append(-reference_log_probs[np.arange(len(picked)), picked])
                kl.append((np.exp(reference_log_probs) * (reference_log_probs - log_probs)).sum(axis=-1))
                agree.append(log_probs.argmax(axis=-1) == reference_log_probs.argmax(axis=-1))
        if progress is not None:
            progress(done, len(windows))
    nll_all = np.concatenate(nll)
    size, _, types = model.weight_summary().partition(" (")
    report = EvalReport(model=model.source, weights=model.weight_type, weights_mib=float(size.split()[0]),
                        weight_types=types.rstrip(")"), tokens=len(ids), context=context,
                        stride=stride, windows=len(windows), scored=len(nll_all),
                        perplexity=math.exp(nll_all.mean()), seconds=0.0)
    if reference is not None:
        kl_all = np.concatenate(kl)
        report.reference_weights = reference.weight_type
        report.reference_perplexity = math.exp(np.concatenate(reference_nll).mean())
        report.kl_mean, report.kl_p99 = float(kl_all.mean()), float(np.percentile(kl_all, 99))
        report.top1_agreement = float(np.concatenate(agree).mean())
    report.seconds = time.perf_counter() - began
    return report


def _scored_log_probs(model, reference, ids: np.ndarray, window: Window
                      ) -> Iterator[tuple[np.ndarray, np.ndarray | None, slice]]:
    """Log-probabilities (float64) of the positions that predict the window's scored tokens, a few rows at a
    time: (the model's, the reference's or None, which scored tokens they predict)."""
    window_ids = ids[window.begin:window.end].tolist()
    logits = model.logits(window_ids)[window.first_scored - 1:-1]
    reference_logits = None if reference is None else reference.logits(window_ids)[window.first_scored - 1:-1]
    for start in range(0, len(logits), ROWS_AT_ONCE):
        rows = slice(start, start + ROWS_AT_ONCE)
        yield (_log_softmax(logits[rows]), None if reference_logits is None else _log_softmax(reference_logits[rows]),
               rows)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64)
    shifted -= shifted.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
