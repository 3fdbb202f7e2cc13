"""Reading safetensors files: the header checked field by field, tensors memory-mapped, not copied.

F32 tensors are zero-copy views of the mapped file; F16 and BF16 are widened to float32 one tensor at a
time, so loading never holds two copies of the model. Every malformed header, offset or shape raises
ModelFormatError naming the file and tensor.
"""

from __future__ import annotations

import json
import mmap
import struct
from math import prod
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ModelFormatError, UnsupportedModelError

# Headers past this size are certainly corrupt (real ones are a few hundred KB), and reading them would
# be the "giant allocation" a bad length field asks for.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_safetensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (tensor name, float32 array) for every tensor in the file, in file order."""
    path = Path(path)
    with open(path, "rb") as file:
        file_size = path.stat().st_size
        if file_size < 8:
            raise ModelFormatError(f"{path}: {file_size} bytes is too short for a safetensors header")
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    header, data_start = _read_header(path, mapped, file_size)
    for name, entry in header:
        yield name, _tensor(path, mapped, data_start, file_size, name, entry)


def _read_header(path: Path, mapped: mmap.mmap, file_size: int) -> tuple[list[tuple[str, dict]], int]:
    (header_size,) = struct.unpack("<Q", mapped[:8])
    if header_size > min(MAX_HEADER_BYTES, file_size - 8):
        raise ModelFormatError(f"{path}: header length {header_size} is larger than the file ({file_size} bytes)")
    try:
        header = json.loads(mapped[8:8 + header_size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFormatError(f"{path}: header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    entries = [(name, entry) for name, entry in header.items() if name != "__metadata__"]
    entries.sort(key=lambda item: _offsets(path, item[0], item[1])[0])
    return entries, 8 + header_size


def _offsets(path: Path, name: str, entry) -> tuple[int, int]:
    if not isinstance(entry, dict):
        raise ModelFormatError(f"{path}: tensor {name!r}: header entry must be an object, got {entry!r}")
    offsets = entry.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise ModelFormatError(f"{path}: tensor {name!r}: data_offsets = {offsets!r} must be two non-negative integers")
    return offsets[0], offsets[1]


def _tensor(path: Path, mapped: mmap.mmap, data_start: int, file_size: int, name: str, entry: dict) -> np.ndarray:
    dtype_name, shape = entry.get("dtype"), entry.get("shape")
    if dtype_name not in ITEM_SIZES:
        raise ModelFormatError(f"{path}: tensor {name!r}: unknown dtype {dtype_name!r}")
    if dtype_name not in DTYPES:
        raise UnsupportedModelError(
            f"{path}: tensor {name!r} has dtype {dtype_name}; supported: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ModelFormatError(f"{path}: tensor {name!r}: shape = {shape!r} must be a list of non-negative integers")
    begin, end = _offsets(path, name, entry)
    expected = prod(shape) * ITEM_SIZES[dtype_name]
    if end - begin != expected:
        raise ModelFormatError(
            f"{path}: tensor {name!r}: data_offsets {begin}..{end} hold {end - begin} bytes, "
            f"but {dtype_name}{shape} needs {expected}")
    if data_start + end > file_size:
        raise ModelFormatError(
            f"{path}: tensor {name!r} ends at byte {data_start + end}, past the end of the file ({file_size} bytes)")
    raw = np.frombuffer(mapped, dtype=DTYPES[dtype_name], count=prod(shape), offset=data_start + begin)
    raw = raw.reshape(shape)
    if dtype_name == "F32":
        return raw
    if dtype_name == "F16":
        return raw.astype(np.float32)
    # bfloat16 is the top half of a float32: shift the bits into place.
    return (raw.astype(np.uint32) << 16).view(np.float32)
