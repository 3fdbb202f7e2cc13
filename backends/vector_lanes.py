"""Sixteen-lane vector operations for the compiled kernels, written as LLVM vectors (Numba intrinsics).

Numba leaves LLVM's SLP vectoriser off (numba#8705), so a loop over a constant 16 values, once unrolled, stays
sixteen scalar operations, and its loop vectoriser skips any loop shorter than its vector loop (8 lanes times
4 interleaved = 32 on this machine). A 16-value attention head, the story model's, was therefore computed one
value at a time. These intrinsics state the vector operation outright: LLVM emits one 512-bit operation, or
two 256-bit ones where AVX-512 is missing.

They read 16-value rows of C-contiguous float32 arrays (an attention head's query, a key or value row of the
pool), write 16 values into such a row, and work on `lane_buffer`s, small float32 arrays on the stack. The
caller keeps every access in bounds: there are no checks.

Numba's disk cache keys a kernel on its own source file only: after editing this module, clear the cache
(or touch the kernels' files), or the kernels keep the old code.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
_VECTOR = ir.VectorType(ir.FloatType(), LANES)
_LANE_INDICES = ir.VectorType(ir.IntType(32), LANES)


@intrinsic
def lane_buffer(typingctx, size, dtype):
    """A pointer to `size` (a literal) values of `dtype` on the stack, starting a 64-byte line: a 16-lane
    vector that straddled two lines cost a split load, and a store then load of it stalled."""
    if not isinstance(size, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        pointer = cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), size=size.literal_value)
        pointer.align = 64
        return pointer
    return types.CPointer(dtype.dtype)(size, dtype), codegen


@intrinsic
def multiply_lanes(typingctx, buffer, at, x, rows, row):
    """buffer[at : at + 16] = x[0 : 16] · rows[row, 0 : 16]."""
    if not (_contiguous(x, 1) and _contiguous(rows, 2)):
        return None

    def codegen(context, builder, signature, args):
        product = builder.fmul(_first_lanes(context, builder, signature.args[2], args[2]),
                               _row_lanes(context, builder, signature, args, 3), flags=("fast",))
        builder.store(product, _buffer_lanes(context, builder, signature, args), align=4)
        return context.get_dummy_value()
    return types.void(buffer, at, x, rows, row), codegen


@intrinsic
def scale_add_lanes(typingctx, buffer, at, a, rows, row):
    """buffer[at : at + 16] += a · rows[row, 0 : 16]."""
    if not _contiguous(rows, 2):
        return None

    def codegen(context, builder, signature, args):
        product = builder.fmul(_splat(builder, args[2]), _row_lanes(context, builder, signature, args, 3),
                               flags=("fast",))
        target = _buffer_lanes(context, builder, signature, args)
        builder.store(builder.fadd(builder.load(target, align=4), product, flags=("fast",)), target, align=4)
        return context.get_dummy_value()
    return types.void(buffer, at, a, rows, row), codegen


@intrinsic
def sums_of_rows(typingctx, buffer, at, scale, out, out_start):
    """out[out_start : +16] = scale · (the sum of row i) for the 16 rows of 16 values in buffer[at : at + 256]:
    sixteen dot products finished at once by a tree of 15 shuffle-and-add steps, where sixteen separate
    reductions take four steps each and use one lane of each result."""
    if not _contiguous(out, 1):
        return None
    def codegen(context, builder, signature, args):
        first = builder.bitcast(_buffer_lanes(context, builder, signature, args), ir.FloatType().as_pointer())
        rows = [builder.load(builder.bitcast(builder.gep(first, [ir.IntType(64)(LANES * i)]), _VECTOR.as_pointer()),
                             align=4) for i in range(LANES)]
        width = LANES
        while len(rows) > 1:
            rows = [_halves_added(builder, rows[i], rows[i + 1], width) for i in range(0, len(rows), 2)]
            width //= 2
        start = context.cast(builder, args[4], signature.args[4], types.intp)
        target = builder.bitcast(builder.gep(_data(context, builder, signature.args[3], args[3]), [start]),
                                 _VECTOR.as_pointer())
        builder.store(builder.fmul(rows[0], _splat(builder, args[2]), flags=("fast",)), target, align=4)
        return context.get_dummy_value()
    return types.void(buffer, at, scale, out, out_start), codegen


def _halves_added(builder, a, b, width):
    """a and b hold 16 / width partial sums of `width` lanes each; the result holds a's then b's, each now
    `width / 2` lanes: the first half of each added to its second."""
    half = width // 2
    first_halves = [group * width + j for group in range(LANES // width) for j in range(half)]
    first_halves += [LANES + i for i in first_halves]                         # b's lanes follow a's
    second_halves = [i + half for i in first_halves]
    return builder.fadd(builder.shuffle_vector(a, b, ir.Constant(_LANE_INDICES, first_halves)),
                        builder.shuffle_vector(a, b, ir.Constant(_LANE_INDICES, second_halves)), flags=("fast",))


def _contiguous(array, ndim: int) -> bool:
    """Whether `array` is a C-contiguous float32 array of `ndim` axes, the only kind these read as lanes."""
    return (isinstance(array, types.Array) and array.ndim == ndim and array.layout == "C"
            and array.dtype == types.float32)


def _data(context, builder, array_type, array):
    return context.make_array(array_type)(context, builder, array).data


def _first_lanes(context, builder, array_type, array):
    """The first 16 values of a 1-D array."""
    return builder.load(builder.bitcast(_data(context, builder, array_type, array), _VECTOR.as_pointer()), align=4)


def _row_lanes(context, builder, signature, args, position):
    """The first 16 values of row `row` of the 2-D array, for the (rows, row) arguments at `position`. Taking
    the array and the row, not the row as a view, matters: a view made in a loop costs two calls to Numba's
    reference counting each time (a story-model step's attention ran 1.7x slower)."""
    array_type = signature.args[position]
    array = context.make_array(array_type)(context, builder, args[position])
    row = context.cast(builder, args[position + 1], signature.args[position + 1], types.intp)
    pointer = cgutils.get_item_pointer(context, builder, array_type, array, [row, row.type(0)], wraparound=False)
    return builder.load(builder.bitcast(pointer, _VECTOR.as_pointer()), align=4)


def _buffer_lanes(context, builder, signature, args):
    """Pointer to buffer[at : at + 16] for the (buffer, at) arguments first."""
    at = context.cast(builder, args[1], signature.args[1], types.intp)
    return builder.bitcast(builder.gep(args[0], [at]), _VECTOR.as_pointer())


def _splat(builder, value):
    one = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), value, ir.IntType(32)(0))
    return builder.shuffle_vector(one, ir.Constant(_VECTOR, ir.Undefined), ir.Constant(_LANE_INDICES, [0] * LANES))
