"""The generation loop: prefill the prompt, then decode token by token, sampling, detokenising and stopping.

`TextStream` is one generation in progress: iterate it for text pieces; afterwards `.result` holds the
whole GenerationResult. `generate` and `stream` are the Model methods' bodies. A run borrows a KV-cache
sequence: a fresh one for generate/stream, a session's own for chat turns.
"""

from __future__ import annotations

import inspect
import numbers
import resource
import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Protocol, Sequence

import numpy as np

from .detokenizer import IncrementalDetokenizer
from ..errors import ContextOverflowError, KVCacheFullError, PromptError, SamplingError, shown
from ..config import ModelConfig
from ..kv_cache import KVCache, KVSequence
from ..tokenizer import Tokenizer
from .sampling import Sampler, SamplingParams
from .speculative import SpeculationSettings, Speculator, accept_prefix, speculation_settings
from .stopping import FinishReason, StopStringMatcher


class Model(Protocol):
    """What the generation loop needs of a model (minitorch_infer.Model is one): it runs tokens through
    a KV-cache sequence and gives logits. The loop never looks inside the graph or the program."""

    config: ModelConfig
    tokenizer: Tokenizer | None
    context: int
    kv_cache: KVCache

    def encode(self, prompt: str | Sequence[int], add_bos: bool | None = None) -> list[int]: ...

    def forward(self, sequence: KVSequence, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray: ...

    def decode_step(self, sequence: KVSequence, token: int) -> np.ndarray: ...

# Sampled generation defaults, as llama.cpp's CLI sets them; greedy=True (or temperature=0) overrides.
DEFAULT_SAMPLING = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
SAMPLING_FIELDS = {f for f in SamplingParams.__dataclass_fields__}
# SamplingParams.validate checks ranges; first, these settings must be numbers at all ("0.5" is not), and
# the others (top_k, penalty_last_n, seed) integers.
_REAL_SETTINGS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}

MAX_TOP_LOGPROBS = 20
# What to do with a prompt longer than the context: refuse it, or drop tokens from its start.
TRUNCATION_POLICIES = ("error", "left")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0
    peak_rss_bytes: int = 0
    dropped_prompt_tokens: int = 0     # cut from the prompt's start to fit the context (truncate_prompt="left")
    decode_steps: int = 0              # model steps after the prefill (each verify of guesses is one)
    drafted_tokens: int = 0            # speculative decoding: tokens guessed, and how many of them held
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """New tokens per decode step: 1 for plain decoding, more when guesses hold."""
        return max(self.new_tokens - 1, 0) / self.decode_steps if self.decode_steps else 0.0

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
    finish_reason: str               # "stop" (EOS or stop string), "length" (max_new_tokens), "context" (cache
                                     # full), "interrupted" (Ctrl-C or close())
    prompt_ids: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[TokenLogprob] | None = None   # per new token, when asked for (logprobs=k)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its raw logits, before sampling's
    temperature and filters), with the `top` most likely tokens at that step as (token id, log-probability)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """Log-softmax of `logits` at `token`, and the `top` most likely tokens, most likely first (in float64)."""
    values = logits.astype(np.float64)
    peak = values.max()
    log_total = peak + np.log(np.exp(values - peak).sum())
    best = np.argpartition(-values, top - 1)[:top] if 0 < top < len(values) else np.arange(len(values))[:top]
    best = best[np.argsort(-values[best], kind="stable")]
    return TokenLogprob(int(token), float(values[token] - log_total),
                        [(int(i), float(values[i] - log_total)) for i in best])


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
    if not isinstance(greedy, bool):
        raise SamplingError(f"greedy must be True or False, got {shown(greedy)}")
    for name, value in settings.items():
        _check_number(name, value)
    params = replace(DEFAULT_SAMPLING, greedy=greedy, **{k: v for k, v in settings.items() if v is not None})
    params.validate()
    return params


def _check_number(name: str, value: object) -> None:
    """A sampling setting must be a number of the right kind (None means the default); bools are refused,
    since True where a number belongs is a slip, not a choice."""
    kind = numbers.Real if name in _REAL_SETTINGS else numbers.Integral
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        wanted = "a number" if kind is numbers.Real else "an integer"
        raise SamplingError(f"{name} must be {wanted}, got {shown(value)}")


def check_max_new_tokens(max_new_tokens: object) -> None:
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be an integer >= 0, got {shown(max_new_tokens)}")


def check_prompt(model: Model, prompt_ids: Sequence[int]) -> None:
    """Refuse, before any work, a prompt the model cannot run."""
    if not prompt_ids:
        raise PromptError("the prompt is empty: it has no tokens, and this model adds no BOS token to start "
                          "from; give at least one token of text")
    vocab_size = model.config.vocab_size
    outside = next((t for t in prompt_ids if not 0 <= t < vocab_size), None)
    if outside is not None:
        raise PromptError(f"prompt token id {outside} is outside the vocabulary (0..{vocab_size - 1})")


def fit_to_context(model: Model, prompt_ids: list[int], max_new_tokens: int, policy: str) -> list[int]:
    """The prompt as it will run: unchanged if it fits the context; if not, refused (policy "error") or cut
    from the start (policy "left").

    "left" keeps a leading BOS token and the prompt's last tokens, leaving room for max_new_tokens new
    tokens but for no more than half the context, so the cut never keeps less than half a context of
    prompt. A prompt that fits but leaves less room than max_new_tokens is not cut: generation then ends
    with finish_reason "context".
    """
    if policy not in TRUNCATION_POLICIES:
        raise SamplingError(f"truncate_prompt must be one of {', '.join(map(repr, TRUNCATION_POLICIES))}, "
                            f"got {shown(policy)}")
    context = model.context
    if len(prompt_ids) <= context:
        return prompt_ids
    if policy == "error":
        raise ContextOverflowError(
            f"the prompt is {len(prompt_ids)} tokens, longer than the context length {context}: shorten it, load "
            "the model with a longer context, or cut its start (truncate_prompt='left', --truncate-prompt left)")
    keep_bos = 1 if prompt_ids[0] == model.config.bos_token_id else 0
    kept = context - min(max_new_tokens, context // 2) - keep_bos
    return prompt_ids[:keep_bos] + prompt_ids[len(prompt_ids) - kept:]


class Decoder:
    """One request's side of decoding, whatever runs the model: from each step's logits, sample the next token,
    detokenise it, and say when the request is done (EOS, a stop string, max_new_tokens). The generation loop
    below and the batched engine both drive it, so a request gives the same text either way."""

    def __init__(self, model: Model, prompt_ids: Sequence[int], max_new_tokens: int = 128,
                 stop: str | Sequence[str] = (), ignore_eos: bool = False, sampling: SamplingParams | None = None,
                 logprobs: int | None = None, speculation: SpeculationSettings | None = None):
        check_max_new_tokens(max_new_tokens)
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise SamplingError(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} (how many of the most "
                                f"likely tokens to list beside each one), got {shown(logprobs)}")
        self.logprobs_top = logprobs
        self.logprobs: list[TokenLogprob] | None = [] if logprobs is not None else None
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, Sequence) or not all(isinstance(text, str) for text in stop):
            raise SamplingError(f"stop must be a string or a list of strings, got {shown(stop)}")
        if not isinstance(ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be True or False, got {shown(ignore_eos)}")
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(sampling or DEFAULT_SAMPLING, model.config.vocab_size)
        self.stops = StopStringMatcher(stop)
        self.eos_ids = frozenset(() if ignore_eos else model.config.eos_token_ids)
        # Without a tokenizer (a bare weights folder) the run still produces token ids, just no text.
        self.detokenizer = (IncrementalDetokenizer(model.tokenizer.backend, prompt_ids, source=model.tokenizer.source)
                            if model.tokenizer is not None else _NoText())
        # A sequence never outgrows the context, however large max_new_tokens is.
        self.history = np.zeros(len(prompt_ids) + min(max_new_tokens, model.context), dtype=np.int64)
        self.history[:len(prompt_ids)] = prompt_ids
        self.known = len(prompt_ids)
        self.new_ids: list[int] = []
        self.pieces: list[str] = []
        # Made last: a draft model's sequence is opened only once every setting has passed its checks.
        self.speculator = Speculator(speculation, model) if speculation is not None else None

    def choose(self, logits: np.ndarray) -> int:
        """Plain decoding's next token from `logits` (sampled, or the argmax when greedy); emit it with emit()."""
        return self.sampler.sample(logits, self.history[:self.known])

    # --- speculative decoding: draft(), a step over [last token, *draft] with every row's logits, verify(),
    # then emit() each token verify() returned.
    def draft(self, room: int) -> list[int]:
        """Guessed tokens to follow the text so far (none without speculation, or when guessing does not pay):
        at most `room` (what the sequence can still hold past the last token) and never more than could be
        emitted before max_new_tokens."""
        if self.speculator is None:
            return []
        room = min(room, self.max_new_tokens - len(self.new_ids) - 1)
        return self.speculator.propose(self.history[:self.known], room)

    def verify(self, rows: np.ndarray, draft: Sequence[int]) -> list[int]:
        """The tokens that follow the text so far, given the logits `rows` [len(draft) + 1, vocab] of a step that
        ran the last token and the draft: the guesses that hold, then one token of the model's own (see
        speculative.accept_prefix). Each is chosen exactly as plain decoding chooses it, with the same sampler,
        so greedy and seeded runs give plain decoding's tokens. Emit them with emit()."""
        def choose(i: int) -> int:
            token = self.sampler.sample(rows[i], self.history[:self.known + i])
            self.history[self.known + i] = token      # where emit() puts it too; the next position's history
            return token

        tokens = accept_prefix(draft, choose)
        self.speculator.record(len(draft), len(tokens) - 1)
        return tokens

    def emit(self, token: int, logits: np.ndarray | None) -> tuple[str, str | None]:
        """Add the chosen next token; returns (its text, if any, and the finish reason once done). `logits`, its
        step's row, give its logprobs: needed only when they were asked for (self.logprobs is not None)."""
        if self.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self.logprobs_top))
        self.new_ids.append(token)
        self.history[self.known] = token
        self.known += 1
        if token in self.eos_ids:
            return "", FinishReason.STOP.value
        piece, stopped = self.detokenizer.push(token), False
        if self.stops.stop_strings:            # most requests have none: no call into the matcher each token
            piece, stopped = self.stops.push(piece)
        if piece:
            self.pieces.append(piece)
        if stopped:
            return piece, FinishReason.STOP.value
        if len(self.new_ids) >= self.max_new_tokens:
            return piece, FinishReason.LENGTH.value
        return piece, None

    def tail(self, finish: str) -> str:
        """The text still held back (an incomplete character, a possible stop string's start) once the run
        ends, unless a stop string ended it."""
        if finish == FinishReason.STOP.value and self.stops.stopped:
            return ""
        tail, _ = self.stops.push(self.detokenizer.flush())
        tail += self.stops.flush()
        if tail:
            self.pieces.append(tail)
        return tail

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def close(self) -> None:
        """Release what the request holds besides its sequence (a draft model's KV-cache sequence)."""
        if self.speculator is not None:
            self.speculator.close()

    def record_speculation(self, stats: GenerationStats) -> None:
        if self.speculator is not None:
            stats.drafted_tokens = self.speculator.drafted
            stats.accepted_tokens = self.speculator.accepted


class TextStream:
    """One generation: iterate for text pieces as they are produced; `.result` once it has finished.

    `history` is what the sequence's cache already holds; `new_ids` are fed before the first new token.
    The last sampled token is never run through the model (nothing needs its logits); a chat session
    feeds it at the start of the next turn.
    """

    def __init__(self, model: Model, sequence: KVSequence, history: Sequence[int], new_ids: Sequence[int],
                 max_new_tokens: int = 128, stop: str | Sequence[str] = (), ignore_eos: bool = False,
                 sampling: SamplingParams | None = None, on_finish=None, dropped_prompt_tokens: int = 0,
                 logprobs: int | None = None, speculation: SpeculationSettings | None = None):
        self.model = model
        self.sequence = sequence
        self.prompt_ids = list(history) + list(new_ids)
        self.new_ids = list(new_ids)          # tokens the cache has not seen yet
        self.decoder = Decoder(model, self.prompt_ids, max_new_tokens, stop, ignore_eos, sampling, logprobs,
                               speculation)
        self.on_finish = on_finish
        self.dropped_prompt_tokens = dropped_prompt_tokens
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

    def close(self) -> None:
        """Stop the run where it is, as Ctrl-C does: `.result` then holds what was produced, with finish_reason
        "interrupted". Nothing happens to a run that has already ended."""
        if inspect.getgeneratorstate(self._iterator) == inspect.GEN_CREATED:
            self._iterator.close()      # a generator closed before it started never runs its `finally`
            self._finish(FinishReason.INTERRUPTED.value, GenerationStats(prompt_tokens=len(self.new_ids)))
        else:
            self._iterator.close()

    def _run(self) -> Iterator[str]:
        model, sequence, decoder = self.model, self.sequence, self.decoder
        stats = GenerationStats(prompt_tokens=len(self.new_ids))
        finish = FinishReason.LENGTH.value
        began = time.perf_counter()
        try:
            if decoder.max_new_tokens == 0:
                return
            logits = model.forward(sequence, self.new_ids)
            stats.prefill_seconds = time.perf_counter() - began
            decode_began = time.perf_counter()
            tokens, rows = [decoder.choose(logits)], logits[None]
            while True:
                # One token at a time, so a stop string or max_new_tokens cuts a verified run where plain
                # decoding would have stopped.
                for token, row in zip(tokens, rows):
                    piece, finished = decoder.emit(token, row)
                    if len(decoder.new_ids) == 1:
                        stats.time_to_first_token = time.perf_counter() - began
                    if piece:
                        yield piece
                    if finished is not None:
                        break
                if finished is not None:
                    finish = finished
                    break
                if sequence.free == 0:
                    finish = FinishReason.CONTEXT.value
                    break
                tokens, rows = self._next_tokens(decoder.new_ids[-1])
                stats.decode_steps += 1
            stats.decode_seconds = time.perf_counter() - decode_began
            tail = decoder.tail(finish)
            if tail:
                yield tail
        except (KeyboardInterrupt, GeneratorExit):
            # Ctrl-C inside a step, or close() (a consumer that stopped, e.g. on its own Ctrl-C). The cache
            # only counts steps that completed, so it ends at the last token whose step finished.
            finish = FinishReason.INTERRUPTED.value
            raise
        finally:
            if decoder.speculator is not None and decoder.new_ids:
                # Verified guesses past where the run ended stay out of the cache, which then holds what plain
                # decoding's would: everything but the last token.
                sequence.truncate(min(sequence.length, len(self.prompt_ids) + len(decoder.new_ids) - 1))
            self._finish(finish, stats)

    def _next_tokens(self, last: int) -> tuple[list[int], np.ndarray]:
        """Run the last token; returns the tokens that follow it and their logits rows. Plain decoding gives
        one; speculative decoding runs the last token with a draft in one step, keeps the tokens verify()
        returns and rolls the cache back past the guesses that failed."""
        decoder, sequence = self.decoder, self.sequence
        began = time.perf_counter()        # drafting, the step and verifying: all of it is what a step costs
        draft = decoder.draft(sequence.free - 1)
        if draft:
            try:
                sequence.reserve(len(draft) + 1)
            except KVCacheFullError:       # the pool has room for one more token, not for the guesses
                draft = []
        if not draft:
            logits = self.model.decode_step(sequence, last)
            token = decoder.choose(logits)
            if decoder.speculator is not None:
                decoder.speculator.costs.record_plain(time.perf_counter() - began)
            return [token], logits[None]
        # One sequence alone: the every-position program, whose attention takes the rows as one causal block.
        rows = self.model.forward(sequence, [last, *draft], all_logits=True)
        tokens = decoder.verify(rows, draft)
        sequence.truncate(sequence.length - len(draft) + len(tokens) - 1)   # the last token + the guesses that held
        decoder.speculator.costs.record_verify(len(draft), time.perf_counter() - began)
        return tokens, rows

    def _finish(self, finish: str, stats: GenerationStats) -> None:
        stats.new_tokens = len(self.decoder.new_ids)
        stats.dropped_prompt_tokens = self.dropped_prompt_tokens
        self.decoder.record_speculation(stats)
        self.decoder.close()
        stats.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.result = GenerationResult(self.decoder.text, self.decoder.new_ids, finish, self.prompt_ids, stats,
                                       self.decoder.logprobs)
        if self.on_finish is not None:
            self.on_finish(self)


def start(model: Model, prompt: str | Sequence[int], max_new_tokens: int = 128, stop: str | Sequence[str] = (),
          ignore_eos: bool = False, greedy: bool = False, truncate_prompt: str = "error", logprobs: int | None = None,
          add_bos: bool | None = None, speculate: str | None = None, draft_max: int | None = None,
          ngram: int | None = None, draft_model=None, **sampling) -> TextStream:
    """A TextStream over a fresh KV-cache sequence, released when the stream finishes.

    Every setting and the prompt are checked before any work; truncate_prompt ("error" or "left") says what
    to do with a prompt longer than the context (see fit_to_context). logprobs=k records each new token's
    log-probability and the k most likely alternatives (result.logprobs). add_bos: see Model.encode (None:
    as the model's tokenizer does). speculate="ngram" (or a draft_model) turns on speculative decoding, with up
    to draft_max guesses a step (see generation.speculative): the same tokens under greedy decoding, the same
    distribution under sampling. The sampling settings are SamplingParams' fields (temperature, top_k,
    top_p, min_p, penalties, seed).
    """
    params = sampling_params(greedy=greedy, **sampling)
    speculation = speculation_settings(speculate, draft_max, ngram, draft_model)
    check_max_new_tokens(max_new_tokens)
    encoded = model.encode(prompt, add_bos=add_bos)
    check_prompt(model, encoded)
    prompt_ids = fit_to_context(model, encoded, max_new_tokens, truncate_prompt)
    sequence = model.kv_cache.open()
    try:
        cached = sequence.share_prefix(prompt_ids)        # full blocks of a prompt seen before are reused
        sequence.reserve(len(prompt_ids) - cached)
        return TextStream(model, sequence, prompt_ids[:cached], prompt_ids[cached:], max_new_tokens, stop,
                          ignore_eos, params, on_finish=lambda s: s.sequence.close(),
                          dropped_prompt_tokens=len(encoded) - len(prompt_ids), logprobs=logprobs,
                          speculation=speculation)
    except BaseException:
        sequence.close()   # the stream that would have released it was never made
        raise


def generate(model: Model, prompt: str | Sequence[int], **settings) -> GenerationResult:
    """Run `start` to the end: the GenerationResult (text and ids of the new tokens, finish reason, stats)."""
    return start(model, prompt, **settings).finish()


def stream(model: Model, prompt: str | Sequence[int], **settings) -> TextStream:
    """`start`: iterate the TextStream for the text as it is produced."""
    return start(model, prompt, **settings)
