"""The KV cache: every K/V byte, planned once from the graph's state declarations and a sequence count.

Each sequence (a generate call, a chat session) borrows one slot: per layer a K and a V array
[kv_heads, context, head_dim]. A slot knows how many positions it holds and can be truncated (rolled back)
to any earlier length. Requests that would not fit are refused before any work starts.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .errors import ContextOverflowError
from .ir import TensorType


class KVSequence:
    """One sequence's cache slot: its arrays and how many positions are filled."""

    def __init__(self, cache: KVCache, slot: int, arrays: dict[str, np.ndarray]):
        self.cache = cache
        self.slot = slot
        self.arrays = arrays
        self.length = 0

    @property
    def context(self) -> int:
        return self.cache.context

    @property
    def free(self) -> int:
        return self.context - self.length

    def reserve(self, new_tokens: int) -> None:
        """Refuse, before any work, a step that would run past the planned context."""
        if self.length + new_tokens > self.context:
            raise ContextOverflowError(
                f"{new_tokens} new tokens do not fit: the KV cache holds {self.length} of {self.context} "
                f"positions (raise the context length, or start a new session)")

    def advance(self, new_tokens: int) -> None:
        self.reserve(new_tokens)
        self.length += new_tokens

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (the values stay but are never read again)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def close(self) -> None:
        self.cache.release(self)


class KVCache:
    def __init__(self, states: Mapping[str, TensorType], max_sequences: int = 1, budget_bytes: int | None = None):
        if max_sequences < 1:
            raise ValueError(f"max_sequences must be at least 1, got {max_sequences}")
        self.states = dict(states)
        self.max_sequences = max_sequences
        self.context = min(t.concrete_shape()[1] for t in self.states.values()) if self.states else 0
        self.bytes_per_sequence = sum(t.nbytes() for t in self.states.values())
        if budget_bytes is not None and self.bytes_per_sequence * max_sequences > budget_bytes:
            raise ContextOverflowError(
                f"KV cache for {max_sequences} sequence(s) of {self.context} positions needs "
                f"{self.bytes_per_sequence * max_sequences / 2**20:.1f} MiB, over the budget of {budget_bytes / 2**20:.1f} MiB")
        self._slots: list[KVSequence | None] = [None] * max_sequences
        self._arrays: list[dict[str, np.ndarray] | None] = [None] * max_sequences

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_sequence // max(self.context, 1)

    @property
    def planned_bytes(self) -> int:
        return self.bytes_per_sequence * self.max_sequences

    @property
    def open_sequences(self) -> int:
        return sum(slot is not None for slot in self._slots)

    def open(self) -> KVSequence:
        for slot, holder in enumerate(self._slots):
            if holder is None:
                if self._arrays[slot] is None:
                    # np.zeros maps fresh pages lazily: memory is committed only as positions are written.
                    self._arrays[slot] = {name: np.zeros(t.concrete_shape(), t.np_dtype) for name, t in self.states.items()}
                sequence = KVSequence(self, slot, self._arrays[slot])
                self._slots[slot] = sequence
                return sequence
        raise ContextOverflowError(
            f"all {self.max_sequences} KV-cache sequence slots are in use; close a session or load the model "
            "with more max_sequences")

    def release(self, sequence: KVSequence) -> None:
        if self._slots[sequence.slot] is sequence:
            self._slots[sequence.slot] = None
