"""Weights that stay quantised: GGML's Q8_0, Q4_0 and Q4_1 blocks, held the way the compiled kernels read them.

GGML cuts each row of a [rows, cols] weight into blocks of 32 values, stored as small integer codes and a
scale (Q4_1 also an offset): Q8_0 keeps `code * d` with int8 codes; Q4_0 `(code - 8) * d` and Q4_1
`code * d + m` with 4-bit codes, two to a byte (a block's byte j holds value j in its low nibble and value
j + 16 in its high one). A GGUF tensor of these types is taken as stored; a float weight is quantised with
ggml's rounding (backends/block_quantizer.py, held byte for byte to the gguf package's quantiser), so both
roads give the same blocks.

At load the blocks are split into arrays the compiled kernels read directly, with the codes unchanged:
`codes` [rows, cols] int8 (Q8_0) or [rows, cols / 2] packed nibbles (Q4_x), and the fp16 scales (and
offsets) widened, exactly, to float32 [rows, blocks]: 36, 20 and 24 bytes per block of 32 instead of
ggml's 34, 18 and 20, which saves a conversion per block in the innermost loop.

On a machine with AVX-512 a program holds its quantised matrix weights in panels instead (QuantizedPanels:
the same codes and scales, 16 rows interleaved, as backends/quantized_panel_kernels reads them), in place of
the row-major tensors (WeightStore.panelise), so a weight is never held in both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .errors import MinitorchError
from .panelled import PANEL, panels_of_rows

BLOCK = 32               # values per block, in every type here

# type -> (code bytes per block, has an offset `m`)
BLOCK_TYPES = {"q8_0": (32, False), "q4_0": (16, False), "q4_1": (16, True)}
WEIGHT_TYPES = ("f32", *BLOCK_TYPES)


@dataclass(eq=False)
class QuantizedTensor:
    """A [rows, cols] weight of GGML blocks (see the module docstring): `codes` [rows, code bytes per row],
    `scales` and, for Q4_1, `offsets` float32 [rows, cols / 32]."""

    kind: str
    shape: tuple[int, int]
    scales: np.ndarray
    offsets: np.ndarray | None
    codes: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays() if a is not None)

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.kind}, {list(self.shape)}, {self.nbytes} bytes)"

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        return self.scales, self.offsets, self.codes

    @classmethod
    def zeros(cls, kind: str, shape: tuple[int, int]) -> QuantizedTensor:
        """A [rows, cols] weight of `kind` blocks whose codes and scales are all zero (to be filled in)."""
        rows, cols = _check_shape(kind, shape)
        code_bytes, has_offset = BLOCK_TYPES[kind]
        blocks = (rows, cols // BLOCK)
        return cls(kind, (rows, cols), np.zeros(blocks, np.float32), np.zeros(blocks, np.float32) if has_offset else None,
                   np.zeros((rows, blocks[1] * code_bytes), np.int8 if kind == "q8_0" else np.uint8))

    # --- conversions ---------------------------------------------------------------------------------
    @classmethod
    def from_ggml(cls, raw: np.ndarray, kind: str, shape: tuple[int, int]) -> QuantizedTensor:
        """From a tensor's bytes as GGML/GGUF stores them (row after row of blocks)."""
        rows, cols = _check_shape(kind, shape)
        code_bytes, has_offset = BLOCK_TYPES[kind]
        blocks = np.ascontiguousarray(raw).view(_ggml_block_dtype(kind)).reshape(rows, cols // BLOCK)
        offsets = blocks["m"].astype(np.float32) if has_offset else None
        return cls(kind, (rows, cols), blocks["d"].astype(np.float32), offsets,
                   np.ascontiguousarray(blocks["qs"]).reshape(rows, -1))

    def to_ggml(self) -> np.ndarray:
        """The tensor's bytes as GGML/GGUF stores them (the inverse of from_ggml; the scales narrowed back to fp16)."""
        rows, cols = self.shape
        blocks = np.empty((rows, cols // BLOCK), _ggml_block_dtype(self.kind))
        blocks["d"] = self.scales
        if self.offsets is not None:
            blocks["m"] = self.offsets
        blocks["qs"] = self.codes.reshape(rows, cols // BLOCK, -1)
        return blocks.view(np.uint8).reshape(-1)

    def dequantize(self) -> np.ndarray:
        """The weight as float32 [rows, cols], value by value as ggml dequantises it (the reference)."""
        rows, cols = self.shape
        codes = self.codes.reshape(rows, cols // BLOCK, -1)                    # [rows, blocks, code bytes]
        if self.kind == "q8_0":
            values = codes.astype(np.float32)
        else:                                                                  # low nibbles, then high ones
            values = np.concatenate([codes & 15, codes >> 4], axis=-1).astype(np.float32)
            if self.kind == "q4_0":
                values -= 8
        values *= self.scales[..., None]
        if self.offsets is not None:
            values += self.offsets[..., None]
        return values.reshape(rows, cols)

    def take_rows(self, rows: np.ndarray | slice) -> QuantizedTensor:
        """Rows `rows` (an index array: a copy; a slice: a view), e.g. q/k rows reordered for RoPE."""
        scales, offsets, codes = (None if a is None else a[rows] for a in self._arrays())
        return QuantizedTensor(self.kind, (codes.shape[0], self.shape[1]), scales, offsets, codes)

    def same_as(self, other: object) -> bool:
        return (isinstance(other, QuantizedTensor) and self.kind == other.kind and self.shape == other.shape
                and all(a is None and b is None or a is not None and b is not None and np.array_equal(a, b)
                        for a, b in zip(self._arrays(), other._arrays())))


# Rows quantised per call: the float32 rows of a quantised source (re-quantising a GGUF's Q4_1 as Q8_0) are made
# this many at a time, so no float32 copy of a whole weight (113 MB for SmolLM2's embedding) is ever held.
QUANTIZE_ROWS = 1024


def quantize(values: np.ndarray | QuantizedTensor | QuantizedPanels, kind: str) -> QuantizedTensor:
    """Quantise a [rows, cols] weight (cols a multiple of 32), float or already quantised, into `kind` blocks
    with ggml's rounding (compiled; the tests hold it to the gguf package's quantiser byte for byte)."""
    from .backends.block_quantizer import quantize_rows

    out = QuantizedTensor.zeros(kind, values.shape)
    for picked, part in _float32_rows(values):
        quantize_rows(part, out.take_rows(picked))
    for narrowed in (out.scales, out.offsets):          # stored as fp16, as GGUF holds them
        if narrowed is not None:
            narrowed[...] = narrowed.astype(np.float16)
    return out


def _float32_rows(values: np.ndarray | QuantizedTensor | QuantizedPanels) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, their float32 values), QUANTIZE_ROWS rows at a time; a quantised weight's are widened in turn
    into one buffer."""
    from .backends.quantized import rows_dequantizer

    rows, cols = values.shape
    if isinstance(values, QuantizedPanels):
        values = values.blocks()
    if isinstance(values, QuantizedTensor):
        widen, widened = rows_dequantizer(values), np.empty((min(rows, QUANTIZE_ROWS), cols), np.float32)
    for start in range(0, rows, QUANTIZE_ROWS):
        picked = slice(start, min(start + QUANTIZE_ROWS, rows))
        if isinstance(values, QuantizedTensor):
            part = widened[:picked.stop - start]
            widen(np.arange(start, picked.stop), part)
        else:
            part = np.ascontiguousarray(values[picked], dtype=np.float32)
        yield picked, part


def stack_quantized(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """The parts' rows one after another, in a new tensor (the fusion passes' packed q|k|v and gate|up)."""
    if len({p.kind for p in parts}) != 1 or len({p.shape[1] for p in parts}) != 1:
        raise MinitorchError(f"cannot stack {', '.join(repr(p) for p in parts)}: types or widths differ")
    scales, offsets, codes = (None if a[0] is None else np.concatenate(a) for a in zip(*(p._arrays() for p in parts)))
    return QuantizedTensor(parts[0].kind, (codes.shape[0], parts[0].shape[1]), scales, offsets, codes)


@dataclass(frozen=True, eq=False)
class QuantizedPanels:
    """A quantised [rows, cols] weight (rows a multiple of 16) in panels of 16 rows whose codes are interleaved:
    `codes` [rows / 16, blocks, code bytes per block, 16] (byte j of row r's block b at [p, b, j, r]), `scales`
    and `offsets` (Q4_1; else None) [rows / 16, blocks, 16]. The same bytes as the row-major QuantizedTensor."""

    kind: str
    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None

    @classmethod
    def of(cls, w: QuantizedTensor) -> QuantizedPanels:
        """w's blocks in panels (a copy, in the new layout)."""
        if not fits_in_panels(w):
            raise MinitorchError(f"cannot lay out {w!r} in panels: its rows must be a multiple of {PANEL}")
        rows, cols = w.shape
        panels, blocks = rows // PANEL, cols // BLOCK

        def interleaved(a: np.ndarray, per_block: int) -> np.ndarray:        # [rows, blocks * per_block] ->
            return np.ascontiguousarray(a.reshape(panels, PANEL, blocks, per_block).transpose(0, 2, 3, 1))
        offsets = None if w.offsets is None else interleaved(w.offsets, 1)[..., 0, :]
        return cls(w.kind, interleaved(w.codes, BLOCK_TYPES[w.kind][0]), interleaved(w.scales, 1)[..., 0, :], offsets)

    @property
    def shape(self) -> tuple[int, int]:
        panels, blocks = self.scales.shape[:2]
        return panels * PANEL, blocks * BLOCK

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays() if a is not None)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        return self.scales, self.offsets, self.codes

    def blocks(self) -> QuantizedTensor:
        """The weight as a row-major QuantizedTensor (a copy): for GGUF bytes, or a pass that stacks weights."""
        rows, cols = self.shape

        def row_major(a: np.ndarray) -> np.ndarray:       # [panels, blocks, per_block, 16] -> [rows, ...]
            return np.ascontiguousarray(a.transpose(0, 3, 1, 2)).reshape(rows, -1)
        offsets = None if self.offsets is None else row_major(self.offsets[..., None, :])
        return QuantizedTensor(self.kind, (rows, cols), row_major(self.scales[..., None, :]), offsets,
                               row_major(self.codes))

    def dequantize(self) -> np.ndarray:
        """The weight as float32 [rows, cols] (the reference)."""
        return self.blocks().dequantize()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        dense = self.dequantize()
        return dense if dtype is None else dense.astype(dtype, copy=False)

    def take_rows(self, part: slice) -> QuantizedPanels:
        """Rows part.start .. part.stop - 1, whole panels of them, as a view (a packed weight's parts)."""
        panels = panels_of_rows(part)
        return QuantizedPanels(self.kind, self.codes[panels], self.scales[panels],
                               None if self.offsets is None else self.offsets[panels])

    def __repr__(self) -> str:
        return f"QuantizedPanels({self.kind}, {list(self.shape)} in panels of {PANEL}, {self.nbytes} bytes)"


def fits_in_panels(w) -> bool:
    """Whether a quantised weight can be laid out in panels: a multiple of 16 rows."""
    return isinstance(w, QuantizedTensor) and w.shape[0] % PANEL == 0 and w.shape[0] > 0


def is_quantized(array) -> bool:
    """Whether a weight is quantised blocks, in either layout."""
    return isinstance(array, (QuantizedTensor, QuantizedPanels))


def weight_type(array) -> str:
    """"f32" for a float32 array (or one in panels), else the block type of a quantised weight."""
    return array.kind if is_quantized(array) else "f32"


def _check_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if kind not in BLOCK_TYPES:
        raise MinitorchError(f"unknown block type {kind!r}; known: {', '.join(BLOCK_TYPES)}")
    if len(shape) != 2 or shape[1] % BLOCK:
        raise MinitorchError(f"a {kind} weight must be 2-D with a multiple of {BLOCK} columns, not {list(shape)}")
    return int(shape[0]), int(shape[1])


def _ggml_block_dtype(kind: str) -> np.dtype:
    code_bytes, has_offset = BLOCK_TYPES[kind]
    fields = [("d", "<f2")] + ([("m", "<f2")] if has_offset else [])
    return np.dtype(fields + [("qs", "i1" if kind == "q8_0" else "u1", code_bytes)])
