"""Tensor types: a shape of ints and bounded symbols, and a dtype.

Symbols stand for sizes known only per step: S (new tokens) and T (past + new tokens). Each carries an
upper bound, so memory is planned once at the bounds and every step binds the real values.
"""

from dataclasses import dataclass
from math import prod
from typing import Mapping, Union

import numpy as np

from ..errors import GraphError


@dataclass(frozen=True)
class Sym:
    """A size known only at run time, with the largest value it may take."""

    name: str
    max: int

    def __str__(self) -> str:
        return self.name


Dim = Union[int, Sym]
Bindings = Mapping[str, int]

DTYPES = {"f32": np.dtype(np.float32), "i32": np.dtype(np.int32)}
# Weights that stay quantised (minitorch_infer/quantized.py): bytes per block of 32 values, as held in memory.
BLOCK_DTYPES = {"q8_0": 36, "q4_0": 20, "q4_1": 24}


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str = "f32"

    def __post_init__(self):
        if self.dtype not in DTYPES and self.dtype not in BLOCK_DTYPES:
            raise GraphError(f"unknown dtype {self.dtype!r}; known: {', '.join([*DTYPES, *BLOCK_DTYPES])}")
        if self.dtype in BLOCK_DTYPES and (len(self.shape) != 2 or not isinstance(self.shape[1], int)
                                           or self.shape[1] % 32):
            raise GraphError(f"a {self.dtype} tensor must be 2-D with a multiple of 32 columns, not {self.shape}")
        for dim in self.shape:
            if not isinstance(dim, (int, Sym)) or (isinstance(dim, int) and dim < 0):
                raise GraphError(f"bad dimension {dim!r} in shape {self.shape!r}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_quantized(self) -> bool:
        return self.dtype in BLOCK_DTYPES

    @property
    def np_dtype(self) -> np.dtype:
        if self.dtype not in DTYPES:
            raise GraphError(f"{self} is blocks of {self.dtype}, not an array of one NumPy dtype")
        return DTYPES[self.dtype]

    @property
    def symbols(self) -> set[Sym]:
        return {d for d in self.shape if isinstance(d, Sym)}

    def concrete_shape(self, bindings: Bindings | None = None) -> tuple[int, ...]:
        """The shape with each symbol bound; without bindings, at the symbols' upper bounds."""
        return tuple(bind_dim(d, bindings) for d in self.shape)

    def nbytes(self, bindings: Bindings | None = None) -> int:
        if self.is_quantized:
            return prod(self.concrete_shape(bindings)) // 32 * BLOCK_DTYPES[self.dtype]
        return prod(self.concrete_shape(bindings)) * self.np_dtype.itemsize

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


def bind_dim(dim: Dim, bindings: Bindings | None) -> int:
    if isinstance(dim, int):
        return dim
    if bindings is None:
        return dim.max
    value = bindings[dim.name]
    if value > dim.max:
        raise GraphError(f"{dim.name} = {value} exceeds its planned upper bound {dim.max}")
    return value


def symbolic_numel(shape: tuple[Dim, ...]) -> tuple[int, tuple[str, ...]]:
    """Element count as (constant factor, sorted symbol names): equal for shapes that reshape into each other."""
    constant = prod(d for d in shape if isinstance(d, int))
    return constant, tuple(sorted(d.name for d in shape if isinstance(d, Sym)))
