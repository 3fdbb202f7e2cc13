"""Read the GGUF container: header, metadata and tensor directory, leaving tensor bytes in a memory map.

Layout (little-endian): magic "GGUF", version, tensor count, metadata count, the metadata key/values, the
tensor directory (name, dims, type, offset), padding to `general.alignment`, then the tensor data.

This is our own reader rather than gguf.GGUFReader: that one builds a NumPy view for every string, which
takes ~1.8 s for SmolLM2's 49k-token vocabulary; reading the same header here takes ~0.04 s.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError, shown

MAGIC = b"GGUF"
HEADER_SIZE = 24  # magic, version, tensor count, metadata count
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML tensors have at most four dimensions

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_REQUIRED = object()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are and how to read them."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # NumPy order, outermost first: GGUF lists dims innermost first
    offset: int  # from the start of the file
    nbytes: int


RELEASE_SPAN = 2 << 20


@dataclass
class GGUFFile:
    """A parsed GGUF header over a read-only memory map of the whole file."""

    path: Path
    metadata: dict[str, Any]  # numeric arrays as np.ndarray, string arrays as list[str]
    tensors: dict[str, TensorInfo]
    _buffer: mmap.mmap

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The tensor's raw bytes as a uint8 view into the map (no copy)."""
        info = self.tensors[name]
        return np.frombuffer(self._buffer, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def release(self, name: str) -> None:
        """Let the OS drop the tensor's pages once it has been read: a loaded model then does not also keep
        the whole file resident (98 MB for SmolLM2), and peak memory stays near the float32 weights."""
        info = self.tensors[name]
        # Whole 2 MiB spans around the tensor: reading a few bytes maps the page cache's whole large folio
        # (up to 2 MiB), and releasing only the tensor's own pages left ~50 MB of SmolLM2's file resident.
        # Neighbours' pages dropped here are mapped again from the page cache when they are read.
        start = info.offset - info.offset % RELEASE_SPAN
        stop = min(-(-(info.offset + info.nbytes) // RELEASE_SPAN) * RELEASE_SPAN, len(self._buffer))
        if info.nbytes and hasattr(mmap, "MADV_DONTNEED"):
            self._buffer.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def field(self, key: str, kind: type, default: Any = _REQUIRED) -> Any:
        """Metadata value `key`, checked to be of `kind` (float accepts any number); `default` if absent."""
        if key not in self.metadata:
            if default is _REQUIRED:
                raise ModelFormatError(f"{self.path}: metadata key {shown(key)} is missing")
            return default
        value = self.metadata[key]
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # bool is a subclass of int, but a flag where a count belongs is a malformed file
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            if isinstance(value, (list, np.ndarray)):
                found = f"an array of {len(value)} values"
            else:
                found = f"{type(value).__name__} {shown(value)}"
            raise ModelFormatError(f"{self.path}: metadata {shown(key)} should be {kind.__name__}, got {found}")
        return value


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of the GGUF file at `path`; raise ModelFormatError if it is malformed."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file at {path}")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < HEADER_SIZE:
                raise ModelFormatError(f"{path}: {size} bytes is too short to be a GGUF file")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:  # no permission to read it, ...
        raise ModelFormatError(f"{path}: cannot read: {error.strerror or error}") from None
    return _HeaderParser(buffer, path).parse()


class _HeaderParser:
    """Walks the header once, front to back, checking every length against the bytes left."""

    def __init__(self, buffer: mmap.mmap, path: Path):
        self.buffer = buffer
        self.path = path
        self.pos = 0

    def parse(self) -> GGUFFile:
        if self.buffer[:4] != MAGIC:
            magic = bytes(self.buffer[:4])
            raise ModelFormatError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        self.pos = 4
        version = self._unpack(_U32, "version")
        if version not in SUPPORTED_VERSIONS:
            if (version & 0xFFFF) == 0:
                raise UnsupportedModelError(f"{self.path}: big-endian GGUF files are not supported")
            raise UnsupportedModelError(f"{self.path}: GGUF version {version} is not supported (only 2 and 3)")
        tensor_count = self._unpack(_U64, "tensor count")
        kv_count = self._unpack(_U64, "metadata count")

        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string("metadata key")
            if key in metadata:
                raise ModelFormatError(f"{self.path}: metadata key {shown(key)} appears twice")
            value_type = self._value_type(f"type of metadata {shown(key)}")
            metadata[key] = self._value(value_type, key)

        directory = [self._tensor_entry() for _ in range(tensor_count)]
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
            raise ModelFormatError(f"{self.path}: general.alignment {shown(alignment)} is not a positive multiple of 8")
        data_start = -(-self.pos // alignment) * alignment

        tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, relative_offset in directory:
            if name in tensors:
                raise ModelFormatError(f"{self.path}: tensor {shown(name)} appears twice")
            if relative_offset % alignment:
                raise ModelFormatError(
                    f"{self.path}: tensor {shown(name)} offset {relative_offset} is not a multiple of the "
                    f"alignment {alignment}"
                )
            tensors[name] = self._tensor_info(name, shape, ggml_type, data_start + relative_offset)
        return GGUFFile(self.path, metadata, tensors, self.buffer)

    def _tensor_entry(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string("tensor name")
        n_dims = self._unpack(_U32, f"dimension count of tensor {shown(name)}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelFormatError(
                f"{self.path}: tensor {shown(name)} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [self._unpack(_U64, f"dimensions of tensor {shown(name)}") for _ in range(n_dims)]
        ggml_type = self._unpack(_U32, f"type of tensor {shown(name)}")
        offset = self._unpack(_U64, f"offset of tensor {shown(name)}")
        return name, tuple(reversed(dims)), ggml_type, offset

    def _tensor_info(self, name: str, shape: tuple[int, ...], type_id: int, offset: int) -> TensorInfo:
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise ModelFormatError(f"{self.path}: tensor {shown(name)} has unknown type id {type_id}") from None
        block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
        if shape[-1] % block_size:
            raise ModelFormatError(
                f"{self.path}: tensor {shown(name)} ({ggml_type.name}) has rows of {shape[-1]} values, "
                f"not a multiple of its block size {block_size}"
            )
        nbytes = math.prod(shape) // block_size * block_bytes
        if offset + nbytes > len(self.buffer):
            raise ModelFormatError(
                f"{self.path}: tensor {shown(name)} data (bytes {offset} to {offset + nbytes}) runs past the end "
                f"of the file ({len(self.buffer)} bytes)"
            )
        return TensorInfo(name, ggml_type, shape, offset, nbytes)

    def _value(self, value_type: GGUFValueType, key: str) -> Any:
        if value_type == GGUFValueType.STRING:
            return self._string(f"metadata {shown(key)}")
        if value_type == GGUFValueType.ARRAY:
            return self._array(key)
        value = self._unpack(struct.Struct(_SCALAR_FORMATS[value_type]), f"metadata {shown(key)}")
        if value_type == GGUFValueType.FLOAT32:
            # the shortest decimal that reads back as the same float32: 1e-05, not 9.999999747378752e-06
            return float(str(np.float32(value)))
        return value

    def _array(self, key: str) -> np.ndarray | list:
        element_type = self._value_type(f"element type of metadata {shown(key)}")
        count = self._unpack(_U64, f"length of metadata {shown(key)}")
        if element_type in _SCALAR_FORMATS:
            dtype = np.dtype(_SCALAR_FORMATS[element_type])
            self._need(count * dtype.itemsize, f"metadata {shown(key)} ({count} values)")
            values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return values
        # every string or nested array takes at least its 8-byte length; checking that first keeps a
        # corrupt count from looping for a long time before hitting the end of the file
        self._need(count * 8, f"metadata {shown(key)} ({count} values)")
        if element_type == GGUFValueType.STRING:
            return self._strings(count, key)
        return [self._value(element_type, key) for _ in range(count)]

    def _strings(self, count: int, key: str) -> list[str]:
        # the hot loop of reading a vocabulary: plain struct and bytes, no per-string helper calls
        buffer, pos, end = self.buffer, self.pos, len(self.buffer)
        strings = []
        for index in range(count):
            length = _U64.unpack_from(buffer, pos)[0] if pos + 8 <= end else end
            if pos + 8 + length > end:
                raise ModelFormatError(f"{self.path}: file ends inside metadata {shown(key)} (item {index} of {count})")
            pos += 8
            try:
                strings.append(str(buffer[pos : pos + length], "utf-8"))
            except UnicodeDecodeError as error:
                raise ModelFormatError(
                    f"{self.path}: metadata {shown(key)} item {index} is not UTF-8 ({error})") from None
            pos += length
        self.pos = pos
        return strings

    def _string(self, what: str) -> str:
        length = self._unpack(_U64, f"length of {what}")
        self._need(length, what)
        raw = self.buffer[self.pos : self.pos + length]
        self.pos += length
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as error:
            raise ModelFormatError(f"{self.path}: {what} at byte {self.pos - length} is not UTF-8 ({error})") from None

    def _value_type(self, what: str) -> GGUFValueType:
        type_id = self._unpack(_U32, what)
        try:
            return GGUFValueType(type_id)
        except ValueError:
            raise ModelFormatError(f"{self.path}: {what} is {type_id}, not a GGUF value type") from None

    def _unpack(self, layout: struct.Struct, what: str) -> Any:
        self._need(layout.size, what)
        (value,) = layout.unpack_from(self.buffer, self.pos)
        self.pos += layout.size
        return value

    def _need(self, nbytes: int, what: str) -> None:
        if self.pos + nbytes > len(self.buffer):
            raise ModelFormatError(
                f"{self.path}: file ends inside {what} (needs {nbytes} bytes at byte {self.pos}, "
                f"file has {len(self.buffer)})"
            )
