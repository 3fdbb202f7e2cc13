"""The batched engine: requests in, one model step for many sequences at a time, streamed results out.

Threading model: every model step runs on one thread, the one that drives the engine. Either the caller
drives it (`run()`, or waiting on a handle of an engine that was not started, as `generate_batch` does),
or `start()` runs a background thread that steps while there is work and sleeps when there is none.
`submit`, `cancel` and reading handles are safe from any thread; the model, its KV cache and the
scheduler are touched only under the engine's lock, from the stepping thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence

from ..backends.rope import is_position_dependent
from ..errors import KVCacheFullError, SamplingError
from ..generation.loop import (Decoder, GenerationResult, GenerationStats, check_max_new_tokens, check_prompt,
                               fit_to_context, sampling_params)
from ..generation.stopping import FinishReason
from .scheduler import Request, Scheduler

DEFAULT_MAX_BATCH_TOKENS = 256
_DONE = object()     # ends a handle's stream of pieces


class RequestHandle:
    """A submitted request: iterate `stream()` for its text as it is produced, `result()` to wait for the
    whole GenerationResult, `cancel()` to stop it (finish_reason "interrupted")."""

    def __init__(self, engine: Engine, request: Request):
        self._engine = engine
        self._request = request
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stream(self) -> Iterator[str]:
        while True:
            piece = self._next_piece()
            if piece is _DONE:
                return
            yield piece

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._engine.running_in_background:
            self._engine.run(until=self._done.is_set)
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self._request.number} did not finish within {timeout} s")
        return self._result

    def cancel(self) -> None:
        self._engine.cancel(self)

    def _next_piece(self):
        if not self._engine.running_in_background:
            self._engine.run(until=lambda: not self._pieces.empty())
        return self._pieces.get()

    def _emit(self, piece: str) -> None:
        self._pieces.put(piece)

    def _finish(self, result: GenerationResult) -> None:
        self._result = result
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
        self.scheduler = Scheduler(model.kv_cache, self.max_batch_tokens, sequences)
        self._handles: dict[Request, RequestHandle] = {}
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._numbers = iter(range(1 << 62))
        self.steps = 0

    # --- requests ---------------------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], max_new_tokens: int = 128, stop: str | Sequence[str] = (),
               ignore_eos: bool = False, greedy: bool = False, truncate_prompt: str = "error",
               **sampling) -> RequestHandle:
        """Queue a request; settings as Model.generate's. Everything is checked here, before any work."""
        params = sampling_params(greedy=greedy, **sampling)
        check_max_new_tokens(max_new_tokens)
        encoded = self.model.encode(prompt)
        check_prompt(self.model, encoded)
        prompt_ids = fit_to_context(self.model, encoded, max_new_tokens, truncate_prompt)
        cache = self.model.kv_cache
        if len(prompt_ids) > cache.capacity_tokens:
            raise KVCacheFullError(f"the prompt is {len(prompt_ids)} tokens, more than the whole KV pool holds "
                                   f"({cache.capacity_tokens} positions); raise the KV memory (--kv-memory, kv_memory=)")
        decoder = Decoder(self.model, prompt_ids, max_new_tokens, stop, ignore_eos, params)
        with self._lock:
            request = Request(next(self._numbers), prompt_ids, decoder, pending=list(prompt_ids))
            handle = RequestHandle(self, request)
            self._handles[request] = handle
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
            batch = self.scheduler.schedule()
            if not batch:
                return self._unblock()
            logits = self.model.step([r.sequence for r, _ in batch], [r.pending[:n] for r, n in batch])
            now = time.perf_counter()
            self.steps += 1
            for row, (request, count) in enumerate(batch):
                del request.pending[:count]
                if request.pending:
                    continue                     # still prefilling: its next chunk comes in a later step
                piece, finished = request.decoder.accept(logits[row])
                request.token_times.append(now)
                if piece:
                    self._handles[request]._emit(piece)
                if finished is None and request.sequence.free == 0:
                    finished = FinishReason.CONTEXT.value
                if finished is None:
                    request.pending = [request.decoder.new_ids[-1]]
                else:
                    self._finish(request, finished)
            return True

    def run(self, until=None) -> None:
        """Step until there is no work left (or `until()` is true), on the calling thread."""
        while (until is None or not until()) and self.step():
            pass

    def _unblock(self) -> bool:
        """Nothing could be scheduled. If requests wait while none runs, the head of the queue cannot fit in
        the whole pool even alone (it grew past it): it ends with finish_reason "context"."""
        scheduler = self.scheduler
        if scheduler.waiting and not scheduler.running:
            self._finish(scheduler.waiting[0], FinishReason.CONTEXT.value)
            return True
        return False

    def _finish(self, request: Request, reason: str) -> None:
        self.scheduler.retire(request)
        decoder = request.decoder
        tail = decoder.tail(reason) if reason != FinishReason.INTERRUPTED.value else ""
        handle = self._handles.pop(request)
        if tail:
            handle._emit(tail)
        handle._finish(GenerationResult(decoder.text, decoder.new_ids, reason, request.prompt_ids,
                                        _stats(request)))

    # --- a background thread ----------------------------------------------------------------------
    @property
    def running_in_background(self) -> bool:
        return self._thread is not None

    def start(self) -> Engine:
        """Step on a background thread from now on (until stop())."""
        with self._lock:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="minitorch-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.scheduler.has_work:
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

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
    return stats
