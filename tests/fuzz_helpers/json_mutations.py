"""Hypothesis strategies that edit a JSON document: set a value anywhere to something of the wrong kind, an
absurd size or a near miss; delete a key or item; or damage the text itself (cut short, bit flips).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import strategies as st

from .byte_mutations import Damage, damaged

# Sizes and numbers a corrupt or hostile file might declare.
ABSURD_INTS = [-(2**63), -1, 0, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**64, 10**30,
               10**400]  # finite, but too large for a float
ABSURD_FLOATS = [0.0, -0.0, -1.0, 1e-300, 1e300, float("inf"), float("-inf"), float("nan"), 0.5]

# "\ud800" is a lone surrogate: valid JSON ("\\ud800"), but not encodable as UTF-8.
ODD_STRINGS = ["", "\ud800", "\x00", "a" * 300, "{{ x }}"]
# Whole documents that break a JSON reader rather than the model: nesting past the recursion limit,
# and an integer past Python's 4300-digit conversion limit.
HOSTILE_TEXTS = [Damage("nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000),
                 Damage("an integer of 5,000 digits", b'{"x": ' + b"7" * 5000 + b"}")]

scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(ABSURD_INTS), st.integers(-1000, 1000),
    st.sampled_from(ABSURD_FLOATS), st.floats(), st.text(max_size=12), st.sampled_from(ODD_STRINGS),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8)


def paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place a value sits: key paths into objects, index paths into arrays (their first few items)."""
    found = [prefix] if prefix else []
    if isinstance(document, dict):
        for key, value in document.items():
            found += paths(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document[:4]):
            found += paths(value, prefix + (index,))
    return found


def _holds(container: Any, step: Any) -> bool:
    if isinstance(container, dict):
        return step in container
    return isinstance(container, list) and isinstance(step, int) and step < len(container)


def _has_parent(document: Any, path: tuple) -> bool:
    """Whether the path still leads somewhere a value can be set: each step exists, the last one's parent
    is an object (which may gain the key) or an array holding that index."""
    for step in path[:-1]:
        if not _holds(document, step):
            return False
        document = document[step]
    return (isinstance(document, dict) and isinstance(path[-1], str)) or _holds(document, path[-1])


def _apply(document: Any, path: tuple, value: Any, delete: bool) -> Any:
    """A copy of document with the value at path replaced or deleted (adding a missing key is allowed)."""
    edited = copy.deepcopy(document)
    parent = edited
    for step in path[:-1]:
        parent = parent[step]
    if not delete:
        parent[path[-1]] = value
    elif isinstance(parent, list) or path[-1] in parent:
        del parent[path[-1]]
    return edited


@st.composite
def edited(draw, document: Any, values: st.SearchStrategy = json_values, keys: list[tuple] | None = None,
           max_edits: int = 3) -> tuple[Any, str]:
    """The document after 1 to max_edits edits (mostly one, so each check gets reached on its own), each at
    any path or one of `keys`, and what was done."""
    done = []
    for _ in range(draw(st.sampled_from([1, 1, 1, max_edits]))):
        # earlier edits may have removed or replaced what a listed key led into
        places = [key for key in keys if _has_parent(document, key)] if keys is not None else paths(document)
        if not places:
            break
        path = draw(st.sampled_from(places))
        delete = draw(st.integers(0, 4)) == 0
        value = None if delete else draw(values)
        document = _apply(document, path, value, delete)
        done.append(f"del {list(path)}" if delete else f"{list(path)} = {value!r:.60}")
    return document, "; ".join(done)


@st.composite
def _edited_text(draw, document: Any, values: st.SearchStrategy, keys: list[tuple] | None) -> Damage:
    edited_document, description = draw(edited(document, values, keys))
    return Damage(description, as_text(edited_document))


def as_text(document: Any) -> bytes:
    # NaN and Infinity are written as Python's json writes them, which is also what it reads back
    return json.dumps(document).encode("utf-8")


def mutated_json(document: Any, values: st.SearchStrategy = json_values,
                 keys: list[tuple] | None = None) -> st.SearchStrategy[Damage]:
    """Mostly structural edits; one case in four damages the text instead, now and then with a hostile text."""
    text = as_text(document)
    structural = _edited_text(document, values, keys)
    text_damage = damaged(text, focus=len(text)) | st.sampled_from(HOSTILE_TEXTS)
    return st.one_of(structural, structural, structural, text_damage)
