"""Hypothesis strategies that damage a file's bytes: cut it short, flip bits, overwrite a stretch.

Each strategy gives a Damage: the new bytes plus a one-line description, which is what hypothesis prints
for a failing case (not kilobytes of file). `focus` is how many leading bytes hold the structure (a
header); most damage lands there, because damage to tensor data only changes the numbers the file holds.
"""

from __future__ import annotations

from hypothesis import strategies as st


class Damage:
    """Damaged file content. Not a dataclass: hypothesis would print a dataclass field by field."""

    def __init__(self, description: str, content: bytes):
        self.description = description
        self.content = content

    def __repr__(self) -> str:
        return f"<{self.description}>"


def truncated(seed: bytes) -> st.SearchStrategy[Damage]:
    return st.integers(0, len(seed) - 1).map(lambda length: Damage(f"cut to {length} bytes", seed[:length]))


def bit_flipped(seed: bytes, focus: int) -> st.SearchStrategy[Damage]:
    def flip(positions: list[tuple[int, int]]) -> Damage:
        damaged = bytearray(seed)
        for position, bit in positions:
            damaged[position] ^= 1 << bit
        return Damage(f"bits flipped at (byte, bit) {positions}", bytes(damaged))

    where = st.one_of(st.integers(0, min(focus, len(seed)) - 1), st.integers(0, len(seed) - 1))
    return st.lists(st.tuples(where, st.integers(0, 7)), min_size=1, max_size=8).map(flip)


def overwritten(seed: bytes, focus: int) -> st.SearchStrategy[Damage]:
    def overwrite(position: int, patch: bytes) -> Damage:
        return Damage(f"{patch!r} written at byte {position}", seed[:position] + patch + seed[position + len(patch):])

    return st.builds(overwrite, st.integers(0, min(focus, len(seed)) - 1), st.binary(min_size=1, max_size=16))


def damaged(seed: bytes, focus: int) -> st.SearchStrategy[Damage]:
    """Any of the above."""
    return st.one_of(truncated(seed), bit_flipped(seed, focus), overwritten(seed, focus))
