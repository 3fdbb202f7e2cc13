"""StepLayout: where each row of a step belongs, for the two ops that touch the KV cache.

A step carries the new tokens of one or more sequences, flattened into the S rows of the graph (vLLM's
variable-length layout): sequence 0's rows first, then sequence 1's, and so on. Every op but `kv_write` and
`attention` is row-wise and never needs to know. Those two learn from the layout, per sequence:

- which rows of the step are its new tokens (`row_starts`, `row_stops`), and how many positions it holds
  after the step (`totals`);
- where its positions live in the paged KV pool ([kv_heads, slots, head_dim] per layer): when they fill one
  contiguous run of slots, `key_starts` gives its first slot and attention reads a view of the pool; when not,
  row i of `padded_slots()` lists the slot of each of its positions and attention gathers them. A decode step
  of several sequences reads every sequence's keys in place instead, from `padded_slots()`, in the compiled
  paged kernel.

`write_start` (or, when the new rows' slots are not one run, `write_slots`) is where kv_write stores the
step's rows; `last_rows` are the rows whose logits are wanted, each sequence's newest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StepLayout:
    __slots__ = ("row_starts", "row_stops", "totals", "key_starts", "write_start", "write_slots", "last_rows",
                 "_padded", "_totals_array")

    def __init__(self, row_starts: list[int], row_stops: list[int], totals: list[int],
                 key_starts: list[int | None], padded: np.ndarray | None, write_start: int | None,
                 write_slots: np.ndarray | None, last_rows: np.ndarray):
        self.row_starts = row_starts
        self.row_stops = row_stops
        self.totals = totals
        self.key_starts = key_starts
        self._padded = padded            # padded_slots(); None until asked for when every sequence is one run
        self.write_start = write_start
        self.write_slots = write_slots
        self.last_rows = last_rows
        self._totals_array: np.ndarray | None = None

    @classmethod
    def of(cls, new_tokens: Sequence[int], slots: Sequence[np.ndarray],
           key_starts: Sequence[int | None] | None = None) -> StepLayout:
        """new_tokens[i] rows of sequence i come next in the step; slots[i] holds the cache slot of each of
        its positions 0..total-1 after the step (so its total is len(slots[i])). key_starts[i], when the
        caller knows it, is the first slot of a sequence whose slots are one run (None if they are not)."""
        if not len(new_tokens):
            raise ValueError("a step needs at least one sequence")
        if len(new_tokens) != len(slots):
            raise ValueError(f"a step needs one slot array per sequence: {len(new_tokens)} sequences, "
                             f"{len(slots)} slot arrays")
        totals = [len(s) for s in slots]
        if any(not 1 <= n <= total for n, total in zip(new_tokens, totals)):
            raise ValueError(f"every sequence needs 1..total new rows, got {list(new_tokens)} for totals {totals}")
        if key_starts is None:
            key_starts = [run_start(np.asarray(s)) for s in slots]
        decode_step, padded = all(n == 1 for n in new_tokens), None
        if decode_step or None in key_starts:
            padded = np.zeros((len(slots), max(totals)), np.intp)
            for row, sequence_slots in zip(padded, slots):
                row[:len(sequence_slots)] = sequence_slots
        if decode_step:
            return cls.decode(totals, list(key_starts), padded)
        stops = np.cumsum(new_tokens)
        row_starts, row_stops = [int(stop - n) for stop, n in zip(stops, new_tokens)], [int(s) for s in stops]
        write_slots = np.concatenate([s[total - n:] for s, n, total in zip(slots, new_tokens, totals)])
        write_start = run_start(write_slots)
        return cls(row_starts, row_stops, totals, list(key_starts), padded, write_start,
                   None if write_start is not None else write_slots.astype(np.intp, copy=False),
                   np.asarray(stops - 1, dtype=np.intp))

    @classmethod
    def decode(cls, totals: list[int], key_starts: list[int | None], padded: np.ndarray) -> StepLayout:
        """A decode step: row i is sequence i's one new token; sequence i holds totals[i] positions after it,
        at the slots padded[i, :totals[i]] ([R, >= max(totals)] intp; past a sequence's total, anything), which
        are one run from key_starts[i] where that is not None. No validation: the batched engine builds one
        every step, and each slot is read from `padded`, not from the sequence (16 sequences: ~7 against ~19 us
        with each sequence's row sliced and joined)."""
        rows = len(totals)
        totals_array = np.array(totals, np.intp)
        write_slots = padded[_row_numbers(rows), totals_array - 1]
        layout = cls(list(range(rows)), list(range(1, rows + 1)), totals, key_starts, padded,
                     int(write_slots[0]) if rows == 1 else None, None if rows == 1 else write_slots,
                     _row_numbers(rows))
        layout._totals_array = totals_array
        return layout

    @classmethod
    def single(cls, new_tokens: int, total: int, first_slot: int = 0) -> StepLayout:
        """One sequence whose positions sit in consecutive slots from `first_slot` (a contiguous cache)."""
        last_row = _FIRST_ROW if new_tokens == 1 else np.array([new_tokens - 1], dtype=np.intp)
        return cls([0], [new_tokens], [total], [first_slot], None, first_slot + total - new_tokens, None, last_row)

    @property
    def sequences(self) -> int:
        return len(self.totals)

    @property
    def rows(self) -> int:
        return self.row_stops[-1]

    def padded_slots(self) -> np.ndarray:
        """[R, >= T_max]: sequence i's slots in row i, up to its total. Past it a row holds anything: the paged
        kernels read a row only up to its sequence's total."""
        if self._padded is None:
            # Every sequence's slots are one run (else the layout was made with them): one broadcast.
            self._padded = np.add.outer(np.asarray(self.key_starts, np.intp), np.arange(max(self.totals)))
        return self._padded

    def totals_array(self) -> np.ndarray:
        """The totals as an array (for the compiled paged attention)."""
        if self._totals_array is None:
            self._totals_array = np.asarray(self.totals, np.intp)
        return self._totals_array

    def positions_of(self, sequence: int) -> np.ndarray:
        """The cache slot of each position of sequence i (a range when they are one run)."""
        start, total = self.key_starts[sequence], self.totals[sequence]
        return np.arange(start, start + total) if start is not None else self.padded_slots()[sequence, :total]


_FIRST_ROW = np.zeros(1, dtype=np.intp)
_FIRST_ROW.flags.writeable = False
_ROW_NUMBERS: dict[int, np.ndarray] = {}


def _row_numbers(rows: int) -> np.ndarray:
    """0..rows-1, read-only and made once per count (a decode step's last rows are all its rows)."""
    numbers = _ROW_NUMBERS.get(rows)
    if numbers is None:
        numbers = _ROW_NUMBERS[rows] = np.arange(rows)
        numbers.flags.writeable = False
    return numbers


def run_start(slots: np.ndarray) -> int | None:
    """The first slot if `slots` are consecutive (a view of the pool can stand for them), else None."""
    if len(slots) == 0:
        return None
    first = int(slots[0])
    if int(slots[-1]) - first == len(slots) - 1 and (len(slots) < 3 or bool(np.all(np.diff(slots) == 1))):
        return first
    return None
