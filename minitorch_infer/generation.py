"""The generation loop: prefill the prompt, then decode token by token, sampling, detokenising and stopping.

`TextStream` is one generation in progress: iterate it for text pieces; afterwards `.result` holds the
whole GenerationResult. `generate` and `stream` are the Model methods' bodies. A run borrows a KV-cache
sequence: a fresh one for generate/stream, a session's own for chat turns.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .detokenizer import IncrementalDetokenizer
from .errors import SamplingError
from .kv_cache import KVSequence
from .sampling import Sampler, SamplingParams
from .stopping import FinishReason, StopStringMatcher

if TYPE_CHECKING:
    from .model import Model

# Sampled generation defaults, as llama.cpp's CLI sets them; greedy=True (or temperature=0) overrides.
DEFAULT_SAMPLING = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
SAMPLING_FIELDS = {f for f in SamplingParams.__dataclass_fields__}


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0
    peak_rss_bytes: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first new token comes from the prefill's logits; the decode steps make the rest.
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def __str__(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens, {self.prefill_tokens_per_second:,.0f} tok/s prefill; "
                f"{self.new_tokens} new tokens, {self.decode_tokens_per_second:,.1f} tok/s decode; "
                f"first token after {self.time_to_first_token * 1e3:.1f} ms; peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")


@dataclass
class GenerationResult:
    text: str                        # the new text only, stop strings removed
    token_ids: list[int]             # the new tokens only (an EOS that ended the run included)
    finish_reason: str               # "stop" (EOS or stop string), "length" (max_new_tokens), "context" (cache full)
    prompt_ids: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


class _NoText:
    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def sampling_params(greedy: bool = False, **settings) -> SamplingParams:
    """SamplingParams from keyword settings over DEFAULT_SAMPLING; unknown names are refused."""
    unknown = set(settings) - SAMPLING_FIELDS
    if unknown:
        raise SamplingError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(SAMPLING_FIELDS))}")
    params = replace(DEFAULT_SAMPLING, greedy=greedy, **{k: v for k, v in settings.items() if v is not None})
    params.validate()
    return params


class TextStream:
    """One generation: iterate for text pieces as they are produced; `.result` once it has finished.

    `history` is what the sequence's cache already holds; `new_ids` are fed before the first new token.
    The last sampled token is never run through the model (nothing needs its logits); a chat session
    feeds it at the start of the next turn.
    """

    def __init__(self, model: Model, sequence: KVSequence, history: Sequence[int], new_ids: Sequence[int],
                 max_new_tokens: int = 128, stop: Sequence[str] = (), ignore_eos: bool = False,
                 sampling: SamplingParams | None = None, on_finish=None):
        if max_new_tokens < 0:
            raise SamplingError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.model = model
        self.sequence = sequence
        self.prompt_ids = list(history) + list(new_ids)
        self.new_ids = list(new_ids)          # tokens the cache has not seen yet
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(sampling or DEFAULT_SAMPLING, model.config.vocab_size)
        self.stops = StopStringMatcher(stop)
        self.eos_ids = frozenset(() if ignore_eos else model.config.eos_token_ids)
        # Without a tokenizer (a bare weights folder) the run still produces token ids, just no text.
        self.detokenizer = (IncrementalDetokenizer(model.tokenizer.backend, self.prompt_ids)
                            if model.tokenizer is not None else _NoText())
        self.on_finish = on_finish
        self.result: GenerationResult | None = None
        self._iterator = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._iterator

    def __next__(self) -> str:
        return next(self._iterator)

    def finish(self) -> GenerationResult:
        """Run to the end (if not already) and return the result."""
        for _ in self._iterator:
            pass
        return self.result

    def _run(self) -> Iterator[str]:
        model, sequence = self.model, self.sequence
        history = np.zeros(len(self.prompt_ids) + self.max_new_tokens, dtype=np.int64)
        history[:len(self.prompt_ids)] = self.prompt_ids
        known = len(self.prompt_ids)
        stats = GenerationStats(prompt_tokens=len(self.new_ids))
        new_ids: list[int] = []
        pieces: list[str] = []
        finish = FinishReason.LENGTH
        began = time.perf_counter()
        try:
            if self.max_new_tokens == 0:
                return
            logits = model.forward(sequence, self.new_ids)
            stats.prefill_seconds = time.perf_counter() - began
            decode_began = time.perf_counter()
            while True:
                token = self.sampler.sample(logits, history[:known])
                if not new_ids:
                    stats.time_to_first_token = time.perf_counter() - began
                new_ids.append(token)
                history[known] = token
                known += 1
                if token in self.eos_ids:
                    finish = FinishReason.STOP
                    break
                piece, stopped = self.stops.push(self.detokenizer.push(token))
                if piece:
                    pieces.append(piece)
                    yield piece
                if stopped:
                    finish = FinishReason.STOP
                    break
                if len(new_ids) >= self.max_new_tokens:
                    break
                if sequence.free == 0:
                    finish = FinishReason.CONTEXT
                    break
                logits = model.decode_step(sequence, token)
            stats.decode_seconds = time.perf_counter() - decode_began
            if finish != FinishReason.STOP or not self.stops.stopped:
                tail, _ = self.stops.push(self.detokenizer.flush())
                tail += self.stops.flush()
                if tail:
                    pieces.append(tail)
                    yield tail
        finally:
            stats.new_tokens = len(new_ids)
            stats.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.result = GenerationResult("".join(pieces), new_ids, finish.value, self.prompt_ids, stats)
            if self.on_finish is not None:
                self.on_finish(self)


def start(model: Model, prompt: str | Sequence[int], max_new_tokens: int = 128, stop: Sequence[str] = (),
          ignore_eos: bool = False, greedy: bool = False, **sampling) -> TextStream:
    """A TextStream over a fresh KV-cache sequence, released when the stream finishes."""
    params = sampling_params(greedy=greedy, **sampling)
    prompt_ids = model.encode(prompt)
    sequence = model.kv_cache.open()
    try:
        sequence.reserve(len(prompt_ids))
    except Exception:
        sequence.close()
        raise
    return TextStream(model, sequence, [], prompt_ids, max_new_tokens, stop, ignore_eos, params,
                      on_finish=lambda s: s.sequence.close())


def generate(model: Model, prompt: str | Sequence[int], **settings) -> GenerationResult:
    return start(model, prompt, **settings).finish()


def stream(model: Model, prompt: str | Sequence[int], **settings) -> TextStream:
    return start(model, prompt, **settings)
