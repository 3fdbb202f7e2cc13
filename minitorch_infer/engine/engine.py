"""The batched engine: requests in, one model step for many sequences at a time, streamed results out.

Threading model: every model step runs on one thread, the one that drives the engine. Either the caller
drives it (`run()`, or waiting on a handle of an engine that was not started, as `generate_batch` does),
or `start()` runs a background thread that steps while there is work and sleeps when there is none.
`submit`, `cancel` and reading handles are safe from any thread: the engine touches the model, its KV cache
and the scheduler only under its lock. The model's own calls (generate, chat sessions, logits) take no such
lock: while an engine's background thread runs, do not call them from another thread, since they share the
program's buffers and the pool's bookkeeping.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence

from ..backends.rope import is_position_dependent
from ..errors import KVCacheFullError, MinitorchError, SamplingError
from ..generation.loop import (Decoder, GenerationResult, GenerationStats, check_max_new_tokens, check_prompt,
                               fit_to_context, sampling_params)
from ..generation.speculative import speculation_settings
from ..generation.stopping import FinishReason
from .scheduler import Request, Scheduler

DEFAULT_MAX_BATCH_TOKENS = 256
_DONE = object()     # ends a handle's stream of pieces
_POLL_SECONDS = 0.05  # how often a waiting handle checks that a background thread still steps the engine


class RequestHandle:
    """A submitted request: iterate `stream()` for its text as it is produced, `result()` to wait for the
    whole GenerationResult, `cancel()` to stop it (finish_reason "interrupted"). A request the engine could
    not serve (the KV pool held by others, a failed step) raises its error from `stream()` and `result()`.

    Waiting on a handle of an engine with no background thread (never started, or stopped) steps the engine
    on the waiting thread."""

    def __init__(self, engine: Engine, request: Request):
        self._engine = engine
        self._request = request
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        """Whether the request has finished (by a stop, its length, the context, cancel or a failure)."""
        return self._done.is_set()

    def stream(self) -> Iterator[str]:
        """Yield the continuation's text as the engine produces it; the pieces join to result().text."""
        while True:
            piece = self._next_piece()
            if piece is _DONE:
                self._raise_error()
                return
            yield piece

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait (at most `timeout` seconds, if given) for the request to finish; its GenerationResult."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"request {self._request.number} did not finish within {timeout} s")
            if self._engine.running_in_background:
                self._done.wait(_POLL_SECONDS)
            elif not self._engine.step() and not self._done.is_set():
                raise self._stuck()
        self._raise_error()
        return self._result

    def cancel(self) -> None:
        """End the request now, keeping what it produced so far (see Engine.cancel)."""
        self._engine.cancel(self)

    def _next_piece(self):
        while True:
            background = self._engine.running_in_background
            try:
                return self._pieces.get(block=background, timeout=_POLL_SECONDS if background else None)
            except queue.Empty:
                if not background and not self._engine.step() and self._pieces.empty():
                    raise self._stuck() from None

    def _stuck(self) -> MinitorchError:
        return MinitorchError(f"request {self._request.number} cannot finish: the engine has nothing it can run")

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _emit(self, piece: str) -> None:
        self._pieces.put(piece)

    def _finish(self, result: GenerationResult | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._pieces.put(_DONE)
        self._done.set()


class Engine:
    """Continuous batching over one Model: each step mixes prefill chunks and decode tokens of many requests
    into the S rows of one graph, within `max_batch_tokens` tokens and the model's `max_batch` sequences."""

    def __init__(self, model, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise SamplingError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}")
        self.model = model
        # A step's rows are the graph's S: at most the prefill chunk the program was planned for.
        self.max_batch_tokens = min(max_batch_tokens, model.prefill_chunk)
        sequences = min(model.max_batch, model.prefill_chunk)
        if is_position_dependent(model.config.rope_scaling):
            # Dynamic NTK derives the rotary frequencies from the step's longest position: sequences sharing a
            # step would change each other's rotations, so each step runs one sequence.
            sequences = 1
        if sequences > 1:
            model.program.warm_up_batched_steps()
        self.scheduler = Scheduler(model.kv_cache, self.max_batch_tokens, sequences)
        self._handles: dict[Request, RequestHandle] = {}
        # Called as finish_observer(request, result) when a request ends (e.g. a server's metrics).
        self.finish_observers: list = []
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop_thread: threading.Event | None = None   # each background thread has its own
        self._numbers = iter(range(1 << 62))
        self._speculating = 0                  # requests not yet finished that speculate (most steps have none)
        self.steps = 0

    # --- requests ---------------------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], max_new_tokens: int = 128, stop: str | Sequence[str] = (),
               ignore_eos: bool = False, greedy: bool = False, truncate_prompt: str = "error",
               logprobs: int | None = None, add_bos: bool | None = None, speculate: str | None = None,
               draft_max: int | None = None, ngram: int | None = None, draft_model=None, **sampling) -> RequestHandle:
        """Queue a request; settings as Model.generate's. Everything is checked here, before any work."""
        params = sampling_params(greedy=greedy, **sampling)
        speculation = speculation_settings(speculate, draft_max, ngram, draft_model)
        check_max_new_tokens(max_new_tokens)
        encoded = self.model.encode(prompt, add_bos=add_bos)
        check_prompt(self.model, encoded)
        prompt_ids = fit_to_context(self.model, encoded, max_new_tokens, truncate_prompt)
        cache = self.model.kv_cache
        if len(prompt_ids) > cache.capacity_tokens:
            raise KVCacheFullError(f"the prompt is {len(prompt_ids)} tokens, more than the whole KV pool holds "
                                   f"({cache.capacity_tokens} positions); raise the KV memory "
                                   "(--kv-memory, kv_memory=)")
        decoder = Decoder(self.model, prompt_ids, max_new_tokens, stop, ignore_eos, params, logprobs, speculation)
        with self._lock:
            request = Request(next(self._numbers), prompt_ids, decoder, pending=list(prompt_ids))
            handle = RequestHandle(self, request)
            self._handles[request] = handle
            if decoder.speculator is not None:
                self._speculating += 1
            if max_new_tokens == 0:
                self._finish(request, FinishReason.LENGTH.value)
            else:
                self.scheduler.add(request)
            self._wake.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """End the request now, keeping what it produced; its blocks go back to the pool."""
        with self._lock:
            if not handle.done:
                self._finish(handle._request, FinishReason.INTERRUPTED.value)

    # --- running ----------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one step; False when there was nothing to do."""
        with self._lock:
            if self.model.kv_cache is not self.scheduler.kv_cache:
                raise MinitorchError("the model was recompiled after this engine was made: make a new engine")
            self._draft()
            batch = self.scheduler.schedule()
            if not batch:
                return self._unblock()
            sequences = [request.sequence for request, _ in batch]
            tokens = [request.pending[:count] for request, count in batch]
            rows_wanted = [request.logit_rows for request, _ in batch]
            began = time.perf_counter()
            logits = self.model.step(sequences, tokens, rows_wanted)
            now = time.perf_counter()
            self.steps += 1
            self._record_step_cost(batch, now - began)
            # Greedy requests take their tokens from one argmax over every row: one call, not one per request
            # (16 story-model requests: ~5 against ~35 us a step). A step of sampled requests skips it.
            greedy = len(batch) > 1 and any(request.decoder.sampler.plain_argmax for request, _ in batch)
            argmaxes = logits.argmax(axis=1).tolist() if greedy else None
            row = 0
            for (request, count), wanted in zip(batch, rows_wanted):
                first_row, row = row, row + wanted
                del request.pending[:count]
                if request.pending:
                    continue                     # still prefilling: its next chunk comes in a later step
                self._advance(request, logits, first_row, now, argmaxes)
            return True

    def _draft(self) -> None:
        """Give each decoding request that speculates its guesses for this step, as many as the step's
        sequences leave room for (each guess is a row of logits, and a step has max_sequences of those)."""
        if not self._speculating:
            return
        scheduler = self.scheduler
        spare_rows = None                        # counted at the first request that speculates, if any does
        for request in scheduler.running:
            if request.decoder.speculator is None or len(request.pending) != 1 or request.draft:
                continue
            if spare_rows is None:
                spare_rows = scheduler.max_sequences - sum(r.logit_rows for r in scheduler.running)
            if spare_rows <= 0:
                return
            request.draft = request.decoder.draft(min(request.sequence.free - 1, spare_rows))
            request.pending += request.draft
            spare_rows -= len(request.draft)

    @staticmethod
    def _record_step_cost(batch, seconds: float) -> None:
        """A step of one decoding request alone tells what its kind of step costs (speculation decides by it)."""
        if len(batch) != 1:
            return
        request, count = batch[0]
        speculator = request.decoder.speculator
        if speculator is not None and count == len(request.pending) == request.logit_rows:
            if request.draft:
                speculator.costs.record_verify(len(request.draft), seconds)
            else:
                speculator.costs.record_plain(seconds)

    def _advance(self, request: Request, logits, first_row: int, now: float, argmaxes: list[int] | None) -> None:
        """Take the request's next tokens from its rows of the step's logits, from first_row on (a verified draft
        gives several), emit them one at a time (so stop strings and max_new_tokens cut where plain decoding
        would), and queue the next. `argmaxes`, when given, holds every row's argmax: a plain greedy request's
        token. A row is sliced out only for what reads it (a view costs ~0.2 us, a 16-request step ~3 us)."""
        decoder, draft = request.decoder, request.draft
        if draft:
            tokens = decoder.verify(logits[first_row:first_row + len(draft) + 1], draft)
            request.sequence.truncate(request.sequence.length - len(draft) + len(tokens) - 1)
            request.draft = []
        elif argmaxes is not None and decoder.sampler.plain_argmax:
            tokens = [argmaxes[first_row]]
        else:
            tokens = [decoder.choose(logits[first_row])]
        finished = None
        handle = self._handles[request]
        for row, token in enumerate(tokens, first_row):
            piece, finished = decoder.emit(token, logits[row] if decoder.logprobs is not None else None)
            request.token_times.append(now)
            if piece:
                handle._emit(piece)
            if finished is not None:
                break
        sequence = request.sequence
        if finished is None and sequence.length == sequence.context:
            finished = FinishReason.CONTEXT.value
        if finished is None:
            request.pending = [decoder.new_ids[-1]]
        else:
            self._finish(request, finished)

    def run(self) -> None:
        """Step until there is no work left, on the calling thread."""
        while self.step():
            pass

    def _unblock(self) -> bool:
        """Nothing could be scheduled although requests wait and none runs: the head of the queue cannot get
        the blocks it needs. If the rest of the pool is free, it has outgrown the whole pool and ends with
        finish_reason "context"; if sequences outside this engine (sessions, streams, another engine) hold
        blocks, it fails with KVCacheFullError, as generate would."""
        scheduler = self.scheduler
        if not scheduler.waiting or scheduler.running:
            return False
        request = scheduler.waiting[0]
        cache = self.model.kv_cache
        if cache.used_blocks == 0:
            self._finish(request, FinishReason.CONTEXT.value)
        else:
            self._fail(request, KVCacheFullError(
                f"the KV cache is full: {cache.used_blocks} of its {cache.num_blocks} blocks are held outside "
                f"this engine (sessions, streams, another engine), and request {request.number} needs more; close "
                "them, or raise the KV memory (--kv-memory, kv_memory=)"))
        return True

    def _finish(self, request: Request, reason: str) -> None:
        self._retire(request)
        decoder = request.decoder
        tail = decoder.tail(reason) if reason != FinishReason.INTERRUPTED.value else ""
        handle = self._handles.pop(request)
        if tail:
            handle._emit(tail)
        stats = _stats(request)
        decoder.record_speculation(stats)
        result = GenerationResult(decoder.text, decoder.new_ids, reason, request.prompt_ids, stats, decoder.logprobs)
        for observe in self.finish_observers:
            observe(request, result)
        handle._finish(result)

    # --- a background thread ----------------------------------------------------------------------
    @property
    def running_in_background(self) -> bool:
        return self._thread is not None

    def start(self) -> Engine:
        """Step on a background thread from now on (until stop())."""
        with self._lock:
            if self._thread is None:
                self._stop_thread = threading.Event()
                self._thread = threading.Thread(target=self._loop, args=(self._stop_thread,),
                                                name="minitorch-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """End the background thread after its current step. Unfinished requests stay queued; waiting on
        their handles steps the engine from then on."""
        with self._lock:
            if self._stop_thread is not None:
                self._stop_thread.set()
            self._wake.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _loop(self, stop: threading.Event) -> None:
        while True:
            with self._lock:
                while not stop.is_set() and not self.scheduler.has_work:
                    self._wake.wait()
                if stop.is_set():
                    return
            try:
                self.step()
            except BaseException as error:         # a failed step fails every request, never hangs them
                self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            for request in list(self._handles):
                self._fail(request, error)

    def _fail(self, request: Request, error: BaseException) -> None:
        """End a request with an error, which its handle raises; its blocks go back to the pool."""
        self._retire(request)
        self._handles.pop(request)._finish(None, error)

    def _retire(self, request: Request) -> None:
        """The request leaves the scheduler, returning its blocks, and its decoder what it holds."""
        self.scheduler.retire(request)
        request.decoder.close()
        if request.decoder.speculator is not None:
            self._speculating -= 1

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _stats(request: Request) -> GenerationStats:
    times = request.token_times
    stats = GenerationStats(prompt_tokens=len(request.prompt_ids) - request.cached_tokens,
                            new_tokens=len(request.decoder.new_ids))
    if times:
        stats.time_to_first_token = times[0] - request.submitted_at
        stats.prefill_seconds = stats.time_to_first_token
        stats.decode_seconds = times[-1] - times[0]
        stats.decode_steps = len(dict.fromkeys(times)) - 1    # a verified draft's tokens share their step's time
    return stats
