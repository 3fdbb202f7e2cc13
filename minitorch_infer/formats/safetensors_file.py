"""Reading safetensors files: the header checked field by field, tensors memory-mapped, not copied.

F32 tensors are zero-copy views of the mapped file; F16 and BF16 are widened to float32 one tensor at a
time, so loading never holds two copies of the model. Every malformed header, offset or shape raises
ModelFormatError naming the file and tensor.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ModelFormatError, UnsupportedModelError, shown

# Headers past this size are certainly corrupt (real ones are a few hundred KB), and reading them would
# be the "giant allocation" a bad length field asks for.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class _Entry:
    """One tensor's header entry, checked: its dtype, shape and byte range within the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (tensor name, float32 array) for every tensor in the file, in file order.

    The whole header is checked before the first tensor is yielded, so a bad entry anywhere in it fails
    the load before any weights are read.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            file_size = path.stat().st_size
            if file_size < 8:
                raise ModelFormatError(f"{path}: {file_size} bytes is too short for a safetensors header")
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:  # a folder where the file belongs, no permission to read it, ...
        raise ModelFormatError(f"{path}: cannot read: {error.strerror or error}") from None
    header, data_start = _read_header(path, mapped, file_size)
    entries = sorted((_entry(path, name, fields, file_size - data_start) for name, fields in header.items()
                      if name != "__metadata__"), key=lambda entry: entry.begin)
    for entry in entries:
        yield entry.name, _tensor(mapped, data_start, entry)


def _read_header(path: Path, mapped: mmap.mmap, file_size: int) -> tuple[dict, int]:
    (header_size,) = struct.unpack("<Q", mapped[:8])
    if header_size > min(MAX_HEADER_BYTES, file_size - 8):
        raise ModelFormatError(f"{path}: header length {header_size} is larger than the file ({file_size} bytes)")
    try:
        header = json.loads(mapped[8:8 + header_size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError and integers too long to convert; RecursionError, deep nesting
        raise ModelFormatError(f"{path}: header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    return header, 8 + header_size


def _entry(path: Path, name: str, fields, data_size: int) -> _Entry:
    where = f"{path}: tensor {shown(name)}"
    if not isinstance(fields, dict):
        raise ModelFormatError(f"{where}: header entry must be an object, got {type(fields).__name__}")
    dtype, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise ModelFormatError(f"{where}: unknown dtype {shown(dtype)}")
    if dtype not in DTYPES:
        raise UnsupportedModelError(f"{where} has dtype {dtype}; supported: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ModelFormatError(f"{where}: shape = {shown(shape)} must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ModelFormatError(f"{where}: data_offsets = {shown(offsets)} must be two non-negative integers")
    begin, end = offsets
    if end > data_size:
        raise ModelFormatError(f"{where} ends at byte {shown(end)} of the data section, past the end of the file "
                               f"({data_size} bytes of data)")
    if begin > end:
        raise ModelFormatError(f"{where}: data_offsets {begin}..{end} end before they begin")
    # Python integers do not overflow, so an absurd shape gives an absurd size here, never a wrapped one.
    expected = prod(shape) * ITEM_SIZES[dtype]
    if end - begin != expected:
        raise ModelFormatError(f"{where}: data_offsets {begin}..{end} hold {end - begin} bytes, but "
                               f"{dtype}{shown(shape)} needs {shown(expected)}")
    return _Entry(name, dtype, tuple(shape), begin, end)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor(mapped: mmap.mmap, data_start: int, entry: _Entry) -> np.ndarray:
    count = prod(entry.shape)
    if count == 0:
        return np.zeros(entry.shape, np.float32)
    raw = np.frombuffer(mapped, dtype=DTYPES[entry.dtype], count=count, offset=data_start + entry.begin)
    raw = raw.reshape(entry.shape)
    if entry.dtype == "F32":
        return raw
    if entry.dtype == "F16":
        return raw.astype(np.float32)
    # bfloat16 is the top half of a float32: shift the bits into place.
    return (raw.astype(np.uint32) << 16).view(np.float32)
