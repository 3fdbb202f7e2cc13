"""The scheduler: which requests run in the next step, and how many of their tokens.

Continuous batching, as vLLM schedules it: every step first gives each running request its next tokens
(one for a request that is decoding, a chunk of its prompt for one still prefilling), oldest first, then
admits waiting requests first come, first served, while the step's token budget (`max_batch_tokens`) and
sequence limit last. A long prompt is thus cut into chunks that share steps with the streams already
running, instead of freezing them.

KV memory is reserved as tokens are scheduled. When the pool runs out, the newest running request is
preempted: its blocks go back to the pool and it returns to the head of the queue, to be recomputed
later from its prompt and the tokens it has generated (its sampler keeps its state, so a seeded request
still gives the same text). Admission never skips the queue's head, so no request starves.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import KVCacheFullError
from ..generation.loop import Decoder
from ..kv_cache import KVCache, KVSequence


@dataclass(eq=False)
class Request:
    """One request on its way through the engine."""

    number: int                            # arrival order: smaller is older
    prompt_ids: list[int]
    decoder: Decoder
    sequence: KVSequence | None = None
    pending: list[int] = field(default_factory=list)   # tokens to feed before the next sample
    draft: list[int] = field(default_factory=list)     # speculative guesses, the end of pending, to verify
    finish_reason: str | None = None
    cached_tokens: int = 0                 # prompt positions served from shared prefix blocks
    preemptions: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)

    def all_tokens(self) -> list[int]:
        return self.prompt_ids + self.decoder.new_ids

    @property
    def logit_rows(self) -> int:
        """Rows of logits the next step gives this request (one per sequence of the step's layout)."""
        return 1 + len(self.draft)


class Scheduler:
    def __init__(self, kv_cache: KVCache, max_batch_tokens: int, max_sequences: int):
        self.kv_cache = kv_cache
        self.max_batch_tokens = max_batch_tokens
        self.max_sequences = max_sequences
        self.waiting: deque[Request] = deque()
        # Oldest first (by number), as every step serves them. Appending keeps that order: admission is first come
        # first served, and a preempted request is the newest running one, queued again at the head.
        self.running: list[Request] = []
        self.preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Request, int]]:
        """The next step: (request, how many of its pending tokens) in row order; KV room is reserved.

        A request verifying a draft needs all of it in the step: if the budget cuts it, the draft is cut."""
        batch: list[tuple[Request, int]] = []
        budget, rows = self.max_batch_tokens, 0
        for request in list(self.running):
            if budget == 0:
                break
            if request.sequence is None:              # preempted while making room for an older one
                continue
            count = min(len(request.pending), budget)
            if request.draft and count < len(request.pending):
                del request.draft[max(count - 1, 0):]
                del request.pending[count:]
            try:
                request.sequence.reserve(count)
            except KVCacheFullError:
                if not self._preempt_for(request, count, batch):
                    continue
            batch.append((request, count))
            budget -= count
            rows += 1 + len(request.draft)            # its logit_rows
        while self.waiting and budget and rows < self.max_sequences:
            request = self.waiting[0]
            sequence = self.kv_cache.open()
            cached = sequence.share_prefix(request.pending)
            count = min(len(request.pending) - cached, budget)
            try:
                sequence.reserve(count)
            except KVCacheFullError:
                sequence.close()                        # a waiting request holds no blocks
                break                                   # it waits at the head until blocks come back
            request.sequence = sequence
            del request.pending[:cached]
            if not request.preemptions:
                request.cached_tokens = cached
            self.waiting.popleft()
            self.running.append(request)
            batch.append((request, count))
            budget -= count
            rows += 1
        return batch

    def _preempt_for(self, request: Request, count: int, batch: list[tuple[Request, int]]) -> bool:
        """Room for `count` more positions of a running request the pool refused, preempting newer requests
        while needed. False if the request itself had to be preempted."""
        while True:
            victim = max((r for r in self.running if all(r is not b for b, _ in batch)), key=lambda r: r.number)
            self.preempt(victim)
            if victim is request:
                return False
            try:
                request.sequence.reserve(count)
                return True
            except KVCacheFullError:
                pass

    def preempt(self, request: Request) -> None:
        """Free the request's blocks and queue it first, to recompute what it had."""
        self.running.remove(request)
        request.sequence.close()
        request.sequence = None
        request.pending = request.all_tokens()
        request.draft = []
        request.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(request)

    def retire(self, request: Request) -> None:
        """A finished or cancelled request leaves, returning its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.sequence is not None:
            request.sequence.close()
            request.sequence = None
