"""StepLayout: where each row of a step belongs, for the two ops that touch the KV cache.

A step carries the new tokens of one or more sequences, flattened into the S rows of the graph (vLLM's
variable-length layout): sequence 0's rows first, then sequence 1's, and so on. Every op but `kv_write` and
`attention` is row-wise and never needs to know. Those two learn from the layout, per sequence:

- which rows of the step are its new tokens (`row_starts`, `row_stops`), and how many positions it holds
  after the step (`totals`);
- where its positions live in the paged KV pool ([kv_heads, slots, head_dim] per layer): when they fill one
  contiguous run of slots, `key_starts` gives its first slot and attention reads a view of the pool; when not,
  `slots` lists the slot of every position and attention gathers them. A decode step of several sequences
  reads every sequence's keys in place instead, from `padded_slots`, in the compiled paged kernel.

`write_start` (or, when the new rows' slots are not one run, `write_slots`) is where kv_write stores the
step's rows; `last_rows` are the rows whose logits are wanted, each sequence's newest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StepLayout:
    __slots__ = ("row_starts", "row_stops", "totals", "key_starts", "slots", "write_start", "write_slots",
                 "last_rows", "_derived")

    def __init__(self, row_starts: list[int], row_stops: list[int], totals: list[int],
                 key_starts: list[int | None], slots: list[np.ndarray | None], write_start: int | None,
                 write_slots: np.ndarray | None, last_rows: np.ndarray):
        self.row_starts = row_starts
        self.row_stops = row_stops
        self.totals = totals
        self.key_starts = key_starts
        self.slots = slots
        self.write_start = write_start
        self.write_slots = write_slots
        self.last_rows = last_rows
        self._derived: dict = {}        # what every layer's attention would otherwise rebuild, built once a step

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
        if all(n == 1 for n in new_tokens):
            return cls.decode(totals, key_starts,
                              [None if k is not None else np.asarray(s, np.intp) for k, s in zip(key_starts, slots)],
                              [int(s[-1]) for s in slots])
        stops = np.cumsum(new_tokens)
        row_starts, row_stops = [int(stop - n) for stop, n in zip(stops, new_tokens)], [int(s) for s in stops]
        write_slots = np.concatenate([s[total - n:] for s, n, total in zip(slots, new_tokens, totals)])
        write_start = run_start(write_slots)
        return cls(row_starts, row_stops, totals, list(key_starts),
                   [None if k is not None else np.asarray(s, np.intp) for k, s in zip(key_starts, slots)],
                   write_start, None if write_start is not None else write_slots.astype(np.intp, copy=False),
                   np.asarray(stops - 1, dtype=np.intp))

    @classmethod
    def decode(cls, totals: list[int], key_starts: list[int | None], slots: list[np.ndarray | None],
               write_slots: list[int], padded_slots: np.ndarray | None = None) -> StepLayout:
        """A decode step: row i is sequence i's one new token, written at slot write_slots[i]; sequence i holds
        totals[i] positions after the step, in one run from key_starts[i] or (when that is None) at the slots
        slots[i] (an intp array). Python lists in, no validation and no cumulative sums: the batched engine
        builds one every step (the model's layout of 16 decoding sequences took 16 against 32 us by `of`, which
        now hands its decode steps here too). `padded_slots`, when the caller has them at hand, are what
        padded_slots() would build."""
        rows = len(totals)
        first = write_slots[0]
        consecutive = rows == 1 or (write_slots[-1] == first + rows - 1
                                    and write_slots == list(range(first, first + rows)))
        layout = cls(list(range(rows)), list(range(1, rows + 1)), totals, key_starts, slots,
                     first if consecutive else None, None if consecutive else np.array(write_slots, np.intp),
                     _row_numbers(rows))
        if padded_slots is not None:
            layout._derived["slots"] = padded_slots
        return layout

    @classmethod
    def single(cls, new_tokens: int, total: int, first_slot: int = 0) -> StepLayout:
        """One sequence whose positions sit in consecutive slots from `first_slot` (a contiguous cache)."""
        last_row = _FIRST_ROW if new_tokens == 1 else np.array([new_tokens - 1], dtype=np.intp)
        return cls([0], [new_tokens], [total], [first_slot], [None], first_slot + total - new_tokens, None, last_row)

    @property
    def sequences(self) -> int:
        return len(self.totals)

    @property
    def rows(self) -> int:
        return self.row_stops[-1]

    def padded_slots(self) -> np.ndarray:
        """[R, T_max]: sequence i's slots in row i, up to its total. Past it a row holds anything: the paged
        kernels read a row only up to its sequence's total."""
        if "slots" not in self._derived:
            if None not in self.key_starts:
                # Every sequence's slots are one run (the usual case): one broadcast instead of a row each.
                padded = np.add.outer(np.asarray(self.key_starts, np.intp), np.arange(max(self.totals)))
            else:
                padded = np.zeros((len(self.totals), max(self.totals)), np.intp)
                for i, total in enumerate(self.totals):
                    padded[i, :total] = self.positions_of(i)
            self._derived["slots"] = padded
        return self._derived["slots"]

    def totals_array(self) -> np.ndarray:
        """The totals as an array (for the compiled paged attention)."""
        if "totals" not in self._derived:
            self._derived["totals"] = np.asarray(self.totals, np.intp)
        return self._derived["totals"]

    def positions_of(self, sequence: int) -> np.ndarray:
        """The cache slot of each position of sequence i (a range when they are one run)."""
        start = self.key_starts[sequence]
        return np.arange(start, start + self.totals[sequence]) if start is not None else self.slots[sequence]


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
