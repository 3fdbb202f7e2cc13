"""Where each fixed-size field of a GGUF header sits, found by walking the file (independently of the
package's reader), and a strategy that sets one of those fields to a value a corrupt file might hold.

Walking by hand is what lets the fuzzer aim: it can set "the length of metadata key 3" to 2**64 - 1, or a
tensor's dimension count to 0, where random bit flips would take thousands of cases to hit either.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from .byte_mutations import Damage

_SCALAR_LAYOUTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_STRING, _ARRAY = 8, 9
ITEMS_WALKED = 3  # array items whose fields are listed: the first few stand for the rest


@dataclass(frozen=True)
class Field:
    offset: int
    layout: str  # struct format of the stored value
    label: str


class _Walker:
    def __init__(self, raw: bytes):
        self.raw, self.pos, self.fields = raw, 0, []

    def read(self, layout: str, label: str, listed: bool = True):
        if listed:
            self.fields.append(Field(self.pos, layout, label))
        (value,) = struct.unpack_from(layout, self.raw, self.pos)
        self.pos += struct.calcsize(layout)
        return value

    def string(self, label: str, listed: bool = True) -> str:
        length = self.read("<Q", f"length of {label}", listed)
        text = self.raw[self.pos:self.pos + length].decode("utf-8")
        self.pos += length
        return text

    def value(self, value_type: int, label: str, listed: bool = True) -> None:
        if value_type == _STRING:
            self.string(label, listed)
        elif value_type == _ARRAY:
            element_type = self.read("<I", f"element type of {label}", listed)
            count = self.read("<Q", f"length of {label}", listed)
            for index in range(count):
                self.value(element_type, f"{label}[{index}]", listed and index < ITEMS_WALKED)
        else:
            self.read(_SCALAR_LAYOUTS[value_type], label, listed)


def header_fields(raw: bytes) -> list[Field]:
    """Every fixed-size field of the header (magic excluded), in file order."""
    walker = _Walker(raw)
    walker.pos = 4
    walker.read("<I", "version")
    tensor_count = walker.read("<Q", "tensor count")
    kv_count = walker.read("<Q", "metadata count")
    for index in range(kv_count):
        key = walker.string(f"metadata key #{index}")
        walker.value(walker.read("<I", f"type of {key}"), key)
    for index in range(tensor_count):
        name = walker.string(f"tensor name #{index}")
        n_dims = walker.read("<I", f"dimension count of {name}")
        for axis in range(n_dims):
            walker.read("<Q", f"dimension {axis} of {name}")
        walker.read("<I", f"type of {name}")
        walker.read("<Q", f"offset of {name}")
    return walker.fields


def _candidates(field: Field, raw: bytes) -> st.SearchStrategy:
    """Values worth trying in this field: edges of its type, sizes near the file's, its own value +- 1."""
    (current,) = struct.unpack_from(field.layout, raw, field.offset)
    kind = field.layout[-1]
    if kind in "fd":
        return st.sampled_from([0.0, -1.0, 1e30, float("inf"), float("-inf"), float("nan")])
    if kind == "?":
        return st.sampled_from([0, 1, 2, 255])
    bits = 8 * struct.calcsize(field.layout)
    signed = kind.islower()
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    near = [current - 1, current + 1, 2 * current, len(raw), len(raw) - field.offset, high, high - 1, low,
            2**31, 2**32 - 1, 2**32, 2**63]
    small = st.integers(0, 16)
    return st.one_of(small, st.sampled_from([v for v in near if low <= v <= high]), st.integers(low, high))


@st.composite
def field_set(draw, raw: bytes, fields: list[Field]) -> Damage:
    """The file with one header field set to a corrupt value."""
    field = draw(st.sampled_from(fields))
    value = draw(_candidates(field, raw))
    layout = "<B" if field.layout == "<?" else field.layout  # any byte may sit where a bool belongs
    patched = bytearray(raw)
    struct.pack_into(layout, patched, field.offset, value)
    return Damage(f"{field.label} = {value!r}", bytes(patched))
