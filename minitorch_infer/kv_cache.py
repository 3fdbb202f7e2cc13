"""The paged KV cache: one pool of fixed-size blocks owns every K/V byte; sequences hold block tables.

Per layer, K and V are each one array [kv_heads, slots, head_dim] (the graph's states), cut into blocks of
`block_size` consecutive slots. A sequence (a generate call, a chat session, a batched request) takes blocks
as it grows and returns them when it is truncated, closed or dropped (a finalizer), so only the pool's size
limits how many sequences live at once.

Prefix caching: every full block is registered under (the key of the block before it, its tokens), which
names its whole prefix exactly. A new sequence whose prompt starts with registered blocks shares them
(reference counts) and computes only the rest. A freed block keeps its registration ("warm") until it is
needed for something else, so a preamble repeated later is still found. A shared or registered block is
never written: a sequence that must write into one (after a rollback into it) copies it first.

Blocks are placed to keep each sequence's slots in one run where the pool allows (a sequence grows into the
block after its last; a new one starts in the middle of the largest free gap), because attention reads a
run of slots as a view and must gather scattered ones.
"""

from __future__ import annotations

import mmap
import re
import weakref
from typing import Mapping, Sequence

import numpy as np

from .errors import ContextOverflowError, KVCacheFullError, MinitorchError
from .ir import TensorType

DEFAULT_BLOCK_SIZE = 16
_MEMORY_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_kv_memory(text: str | int) -> tuple[str, int]:
    """A KV budget as ("bytes", n) or ("tokens", n): an int is bytes; "512MiB", "1.5GB", "8192 tokens"."""
    if isinstance(text, int) and not isinstance(text, bool):
        return "bytes", text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or (unit not in _MEMORY_UNITS and unit not in ("tok", "tokens")):
        raise MinitorchError(f"KV memory {text!r} is not a size: give bytes with a unit (512MiB, 2GB) or a token "
                             "count (8192tokens)")
    if unit in ("tok", "tokens"):
        return "tokens", int(float(match.group(1)))
    return "bytes", int(float(match.group(1)) * _MEMORY_UNITS[unit])


class KVSequence:
    """One sequence's view of the pool: its block table, how many positions it holds, and their tokens."""

    def __init__(self, cache: KVCache, table_row: int):
        self.cache = cache
        self.context = cache.context           # the most positions it may hold (read every decode step)
        self.table_row = table_row             # its row of the cache's slot table
        self.blocks: list[int] = []
        self.length = 0
        self.tokens: list[int] = []            # the token at each position, for prefix sharing
        self.run_start: int | None = None      # the first slot when the blocks are consecutive in the pool, else None
        self._registered = 0                   # how many leading full blocks are registered for sharing
        self._write_block_checked = True       # False when the next write may land in a shared block
        self.closed = False
        # Releases the blocks when the sequence is closed, or dropped without close(): it holds the block list,
        # never the sequence, so the sequence can be collected.
        self._finalizer = weakref.finalize(self, cache._release_all, self.blocks, table_row)

    @property
    def free(self) -> int:
        return self.context - self.length

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return self.cache.arrays

    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more positions, or refuse before any work: past the context is a
        ContextOverflowError, past the pool a KVCacheFullError (the sequence is left as it was)."""
        length = self.length + new_tokens
        if self.closed:
            raise MinitorchError("this KV-cache sequence was closed and holds nothing; a closed chat session or "
                                 "stream cannot run again: open a new one")
        if length > self.context:
            raise ContextOverflowError(
                f"{new_tokens} new tokens do not fit: the sequence holds {self.length} of {self.context} "
                f"positions (raise the context length, or start a new session)")
        # The common case, a decode step inside a block the sequence owns alone, costs two comparisons.
        if self._write_block_checked and length <= len(self.blocks) * self.cache.block_size:
            return
        self.cache._make_room(self, length)

    def advance(self, token_ids: Sequence[int]) -> None:
        """Record that the positions after `length` now hold these tokens' keys and values."""
        self.tokens += map(int, token_ids)          # `tokens` is always `length` long
        self.length += len(token_ids)
        if self.length >= (self._registered + 1) * self.cache.block_size:
            self.cache._register_full_blocks(self)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on, returning the blocks no longer needed."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a sequence of {self.length} positions to {length}")
        self.length = length
        del self.tokens[length:]
        self._registered = min(self._registered, length // self.cache.block_size)
        self._write_block_checked = False
        self.cache._shrink(self, -(-length // self.cache.block_size))

    def share_prefix(self, token_ids: Sequence[int]) -> int:
        """On an empty sequence: take the registered blocks that hold a prefix of token_ids (leaving at least
        one token to compute, whose logits the caller needs). Returns how many positions are now cached."""
        if self.length or self.closed:
            raise ValueError("share_prefix needs an open, empty sequence")
        return self.cache._share_prefix(self, list(token_ids))

    def slots(self, total: int) -> np.ndarray:
        """The pool slot of each position 0..total-1 (a copy)."""
        if total > len(self.blocks) * self.cache.block_size:
            raise ValueError(f"a sequence of {len(self.blocks)} blocks has no slots for {total} positions")
        return self.cache.slot_rows([self], total)[0]

    def close(self) -> None:
        """Return every block (and its slot table row) to the pool; the sequence then holds nothing and
        refuses to grow."""
        self._finalizer()
        self.closed = True
        self.length = self._registered = 0
        self.tokens = []
        self.run_start = 0

    def _blocks_changed(self, first_changed: int) -> None:
        """The blocks from index first_changed on are new (or gone): write their slots into the sequence's table
        row (past its blocks the row holds anything: nothing reads a position the sequence has no block for),
        and see whether the blocks are one run."""
        size, blocks, offsets = self.cache.block_size, self.blocks, self.cache.block_offsets
        row = self.cache._slot_table[self.table_row]
        for index in range(first_changed, len(blocks)):       # mostly one: a decode step's new block
            np.add(offsets, blocks[index] * size, out=row[index * size:(index + 1) * size])
        first = blocks[0] if blocks else 0
        consecutive = blocks == list(range(first, first + len(blocks)))
        self.run_start = first * size if consecutive else None


class KVCache:
    """The pool: K and V arrays per layer, block bookkeeping, and the prefix registry."""

    def __init__(self, states: Mapping[str, TensorType], context: int, block_size: int = DEFAULT_BLOCK_SIZE):
        if block_size < 1:
            raise MinitorchError(f"KV block size must be at least 1, got {block_size}")
        self.states = dict(states)
        self.context = context
        self.block_size = block_size
        slots = min(t.concrete_shape()[1] for t in self.states.values()) if self.states else 0
        self.num_blocks = slots // block_size
        self.arrays = {name: _lazy_zeros(t.concrete_shape(), t.np_dtype) for name, t in self.states.items()}
        self.bytes_per_token = sum(t.nbytes() // max(t.concrete_shape()[1], 1) for t in self.states.values())
        self._references = np.zeros(self.num_blocks, np.int64)
        self._key_of: dict[int, tuple] = {}        # registered block -> (parent serial, tokens)
        # Per block, as arrays so that the pool is searched in one expression: whether it is registered (a key
        # of _key_of), and its serial while it is (which its children's keys name; older blocks have smaller).
        self._is_registered = np.zeros(self.num_blocks, bool)
        self._serial = np.zeros(self.num_blocks, np.int64)
        self._block_of: dict[tuple, int] = {}      # key -> registered block
        self._next_serial = 1
        self._open = 0
        # Row r: the pool slot of each position of the sequence that owns row r (KVSequence.table_row), as far as
        # its blocks reach. Every row has room for the whole context, so a decode step's padded slots are its
        # sequences' rows taken in one call (slot_rows). Grown as more sequences are open at once.
        self._slot_table = np.zeros((0, self.blocks_for(context) * block_size), np.intp)
        self.block_offsets = np.arange(block_size)
        self._free_rows: list[int] = []

    # --- accounting -------------------------------------------------------------------------------
    @property
    def planned_bytes(self) -> int:
        return self.bytes_per_token * self.num_blocks * self.block_size

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def open_sequences(self) -> int:
        return self._open

    @property
    def used_blocks(self) -> int:
        return int(np.count_nonzero(self._references))

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self.used_blocks

    def open(self) -> KVSequence:
        if not self._free_rows:
            rows = len(self._slot_table)
            grown = np.zeros((max(4, 2 * rows), self._slot_table.shape[1]), np.intp)
            grown[:rows] = self._slot_table
            self._slot_table = grown
            self._free_rows = list(range(len(grown) - 1, rows - 1, -1))    # popped lowest first
        sequence = KVSequence(self, self._free_rows.pop())
        self._open += 1
        return sequence

    def slot_rows(self, sequences: Sequence[KVSequence], width: int) -> np.ndarray:
        """[len(sequences), width]: row i holds sequence i's slots for positions 0..width-1 (past its blocks,
        anything). A decode step's padded slots: one call, where slicing and joining each sequence's own row
        cost ~0.6 us a sequence."""
        return self._slot_table[[sequence.table_row for sequence in sequences], :width]

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # --- growing and shrinking --------------------------------------------------------------------
    def _make_room(self, sequence: KVSequence, length: int) -> None:
        blocks = sequence.blocks
        taken = []
        try:
            # The block the next write lands in may be shared or registered (after a rollback into it).
            if sequence.length % self.block_size and sequence.length < len(blocks) * self.block_size:
                self._own_block(sequence, sequence.length // self.block_size)
            sequence._write_block_checked = True
            while len(blocks) * self.block_size < length:
                block = self._take_block(after=blocks[-1] if blocks else None)
                blocks.append(block)
                taken.append(block)
        except KVCacheFullError:
            for block in taken:
                blocks.remove(block)
                self._release(block)
            raise
        if taken:
            sequence._blocks_changed(len(blocks) - len(taken))

    def _own_block(self, sequence: KVSequence, index: int) -> None:
        """Make block `index` of the sequence writable: copy it if another sequence shares it, and drop its
        registration (its content is about to change)."""
        block = sequence.blocks[index]
        if self._references[block] > 1:
            copy = self._take_block(after=sequence.blocks[index - 1] if index else None)
            for array in self.arrays.values():
                array[:, self._block_slots(copy)] = array[:, self._block_slots(block)]
            self._release(block)
            sequence.blocks[index] = copy
            sequence._blocks_changed(index)
        else:
            self._unregister(block)
        sequence._registered = min(sequence._registered, index)

    def _shrink(self, sequence: KVSequence, keep_blocks: int) -> None:
        if len(sequence.blocks) > keep_blocks:
            for block in sequence.blocks[keep_blocks:]:
                self._release(block)
            del sequence.blocks[keep_blocks:]
            sequence._blocks_changed(keep_blocks)

    def _release_all(self, blocks: list[int], table_row: int) -> None:
        for block in blocks:
            self._release(block)
        blocks.clear()
        self._free_rows.append(table_row)
        self._open -= 1

    def _release(self, block: int) -> None:
        self._references[block] -= 1

    def _take_block(self, after: int | None) -> int:
        """A free block: preferably the one after `after` (the sequence stays one run), else the start of the
        largest gap (when growing) or its middle (a new sequence, leaving room on both sides). Elsewhere, blocks
        whose registration could still serve a prefix are taken last, oldest serial first."""
        if after is not None and after + 1 < self.num_blocks and self._references[after + 1] == 0:
            block = after + 1                   # even a warm one: a sequence in one run is read as a view
            self._unregister(block)
            self._references[block] = 1
            return block
        free = self._references == 0
        cold = free & ~self._is_registered
        if cold.any():
            start, length = _largest_run(cold)
            block = start if after is not None or length == self.num_blocks else start + length // 2
        else:                                   # no cold block: every free block is warm (registered)
            if not free.any():
                raise KVCacheFullError(
                    f"the KV cache is full: all {self.num_blocks} blocks of {self.block_size} positions are in use "
                    f"({self.capacity_tokens} positions, {self.planned_bytes / 2**20:.1f} MiB); raise the KV memory "
                    "(--kv-memory, kv_memory=) or run fewer sequences at once")
            block = int(np.argmin(np.where(free, self._serial, np.iinfo(np.int64).max)))   # the oldest
            self._unregister(block)
        self._references[block] = 1
        return block

    def _block_slots(self, block: int) -> slice:
        return slice(block * self.block_size, (block + 1) * self.block_size)

    # --- prefix sharing ---------------------------------------------------------------------------
    def _register_full_blocks(self, sequence: KVSequence) -> None:
        size = self.block_size
        while (sequence._registered + 1) * size <= sequence.length:
            index = sequence._registered
            block = sequence.blocks[index]
            parent = self._serial_of(sequence.blocks[index - 1]) if index else 0
            key = (parent, tuple(sequence.tokens[index * size:(index + 1) * size]))
            if parent != -1 and block not in self._key_of and key not in self._block_of:
                self._key_of[block] = key
                self._is_registered[block] = True
                self._block_of[key] = block
                self._serial[block] = self._next_serial
                self._next_serial += 1
            sequence._registered += 1

    def _share_prefix(self, sequence: KVSequence, token_ids: list[int]) -> int:
        size = self.block_size
        parent = 0
        usable = (len(token_ids) - 1) // size            # leave at least one token to compute
        for index in range(usable):
            block = self._block_of.get((parent, tuple(token_ids[index * size:(index + 1) * size])))
            if block is None:
                break
            self._references[block] += 1
            sequence.blocks.append(block)
            parent = int(self._serial[block])
        if sequence.blocks:
            sequence._blocks_changed(0)
            sequence.length = len(sequence.blocks) * size
            sequence.tokens = token_ids[:sequence.length]
            sequence._registered = len(sequence.blocks)
        return sequence.length

    def _unregister(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            self._is_registered[block] = False
            del self._block_of[key]

    def _serial_of(self, block: int) -> int:
        """A registered block's serial; -1 for one that is not (no key can name it as a parent)."""
        return int(self._serial[block]) if self._is_registered[block] else -1


def _lazy_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros whose memory is committed only as blocks are written, one small page at a time.

    Fresh anonymous pages are committed lazily, but with transparent huge pages the kernel backs the first
    write near a page with a whole 2 MiB one: SmolLM2's first block then committed 4 MiB in each of its 60
    arrays, 240 MB for a five-token prompt. The pool opts out of huge pages."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size == 0:
        return np.zeros(shape, dtype)
    pages = mmap.mmap(-1, size)
    if hasattr(pages, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):   # Linux; elsewhere, plain pages
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(pages, dtype).reshape(shape)


def _largest_run(mask: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True in mask (which has at least one)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    starts, stops = edges[0::2], edges[1::2]
    longest = int(np.argmax(stops - starts))
    return int(starts[longest]), int(stops[longest] - starts[longest])
