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

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
# e**x = 2**n · e**f with |f| <= ln 2 / 2: Cephes' expf, as row_kernels._exp
LOG2_E = 1.4426950408889634
LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4
EXP_POLYNOMIAL = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                  5.0000001201e-1)
VECTOR = ir.VectorType(ir.FloatType(), LANES)
_LANE_INDICES = ir.VectorType(ir.IntType(32), LANES)


@intrinsic
def lane_buffer(typingctx, size, dtype):
    """A pointer to `size` (a literal) values of `dtype` on the stack, starting a 64-byte line. LLVM keeps
    such a small array in registers across a loop where it can (an np.empty one it stored back to memory on
    every iteration: eight stores per block in the quantised direct kernels), and where it cannot, a 16-lane
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
    if not (float32_rows(x, 1) and float32_rows(rows, 2)):
        return None

    def codegen(context, builder, signature, args):
        product = builder.fmul(_first_lanes(context, builder, signature.args[2], args[2]),
                               _row_lanes(context, builder, signature, args, 3), flags=("fast",))
        builder.store(product, _buffer_lanes(context, builder, signature, args), align=4)
        return context.get_dummy_value()
    return types.void(buffer, at, x, rows, row), codegen


# Head widths weighted_values takes: 1, 2, 4 or 8 vectors of 16 lanes.
VALUE_WIDTHS = (16, 32, 64, 128)


@intrinsic
def weighted_values(typingctx, values, slots, r, first, total, weights_a, weights_b, heads, out_a, out_b):
    """out_a = Σ_t weights_a[t] · values[slots[r, t]] over positions first..total-1 (and out_b from weights_b when
    heads is 2; heads may be 1 or 2), for rows of a width in VALUE_WIDTHS: the sums stay in registers, one
    vector per 16 values and head, across every position. Summed into the output arrays instead, each position
    loaded and stored them again, and waited on the stores: two thirds of SmolLM2's attention."""
    if not (float32_rows(values, 2) and float32_rows(weights_a, 1) and float32_rows(weights_b, 1)
            and float32_rows(out_a, 1) and float32_rows(out_b, 1) and isinstance(slots, types.Array)
            and slots.ndim == 2 and slots.layout == "C" and slots.dtype == types.intp):
        return None

    def codegen(context, builder, signature, args):
        values_data, (_, width) = data_and_shape(context, builder, signature.args[0], args[0])
        slots_data, (_, slot_columns) = data_and_shape(context, builder, signature.args[1], args[1])
        r, first, total, heads_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (2, 3, 4, 7))
        weights = [_data(context, builder, signature.args[i], args[i]) for i in (5, 6)]
        outs = [_data(context, builder, signature.args[i], args[i]) for i in (8, 9)]
        intp = width.type
        slot_row = builder.gep(slots_data, [builder.mul(r, slot_columns)])
        for heads_wanted in (1, 2):
            for head_width in VALUE_WIDTHS:
                chunks = head_width // LANES
                wanted = builder.and_(builder.icmp_signed("==", heads_, intp(heads_wanted)),
                                      builder.icmp_signed("==", width, intp(head_width)))
                with builder.if_then(wanted):
                    sums = [[cgutils.alloca_once_value(builder, ir.Constant(VECTOR, [0.0] * LANES))
                             for _ in range(chunks)] for _ in range(heads_wanted)]
                    with cgutils.for_range(builder, builder.sub(total, first)) as loop:
                        t = builder.add(first, loop.index)
                        row = builder.gep(values_data, [builder.mul(builder.load(builder.gep(slot_row, [t])), width)])
                        scales = [splat(builder, builder.load(builder.gep(weights[h], [t])))
                                  for h in range(heads_wanted)]
                        for c in range(chunks):
                            lanes = load_lanes(builder, builder.gep(row, [intp(LANES * c)]))
                            for h in range(heads_wanted):
                                accumulate_lanes(builder, sums[h][c], scales[h], lanes)
                    for h in range(heads_wanted):
                        for c in range(chunks):
                            store_lanes(builder, builder.load(sums[h][c]), outs[h], LANES * c)
        return context.get_dummy_value()
    return types.void(values, slots, r, first, total, weights_a, weights_b, heads, out_a, out_b), codegen


@intrinsic
def sums_of_rows(typingctx, buffer, at, scale, out, out_start):
    """out[out_start : +16] = scale · (the sum of row i) for the 16 rows of 16 values in buffer[at : at + 256]:
    sixteen dot products finished at once by a tree of 15 shuffle-and-add steps, where sixteen separate
    reductions take four steps each and use one lane of each result."""
    if not float32_rows(out, 1):
        return None

    def codegen(context, builder, signature, args):
        first = builder.bitcast(_buffer_lanes(context, builder, signature, args), ir.FloatType().as_pointer())
        sums = row_sums(builder, [load_lanes(builder, builder.gep(first, [ir.IntType(64)(LANES * i)]))
                                  for i in range(LANES)])
        start = context.cast(builder, args[4], signature.args[4], types.intp)
        target = builder.bitcast(builder.gep(_data(context, builder, signature.args[3], args[3]), [start]),
                                 VECTOR.as_pointer())
        builder.store(builder.fmul(sums, splat(builder, args[2]), flags=("fast",)), target, align=4)
        return context.get_dummy_value()
    return types.void(buffer, at, scale, out, out_start), codegen


@intrinsic
def softmax_lanes(typingctx, scores, first, total):
    """scores[first:total] = softmax(scores[first:total]), 16 values at a time (three passes: the largest, the
    exps and their sum, the division). The last 16 may reach past total: `scores` must have room for 16
    values beyond it, where this writes zeros. The exp is _exp's polynomial as a vector (row_kernels)."""
    if not float32_rows(scores, 1):
        return None

    def codegen(context, builder, signature, args):
        data = _data(context, builder, signature.args[0], args[0])
        first_, total_ = (context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], signature.args[1:]))
        intp = first_.type
        chunks = builder.udiv(builder.add(builder.sub(total_, first_), intp(LANES - 1)), intp(LANES))
        lowest = ir.Constant(VECTOR, [float(np.finfo(np.float32).min)] * LANES)   # finite: fast-math flags hold
        zeros = ir.Constant(VECTOR, [0.0] * LANES)

        def each_chunk(body):
            with cgutils.for_range(builder, chunks) as loop:
                start = builder.add(first_, builder.mul(loop.index, intp(LANES)))
                pointer = builder.bitcast(builder.gep(data, [start]), VECTOR.as_pointer())
                inside = builder.icmp_signed("<", builder.add(splat(builder, start), _lane_numbers(intp)),
                                             splat(builder, total_))
                body(pointer, inside)

        largest = cgutils.alloca_once_value(builder, lowest)
        each_chunk(lambda pointer, inside: builder.store(
            _vector_call(builder, "llvm.maxnum", [builder.load(largest),
                                                  builder.select(inside, builder.load(pointer, align=4), lowest)]),
            largest))
        peak = splat(builder, _reduce(builder, "llvm.vector.reduce.fmax", builder.load(largest)))

        total_sum = cgutils.alloca_once_value(builder, zeros)

        def exponentiate(pointer, inside):
            shifted = builder.fsub(builder.load(pointer, align=4), peak, flags=("fast",))
            weights = builder.select(inside, _exp_lanes(builder, shifted), zeros)
            builder.store(weights, pointer, align=4)
            builder.store(builder.fadd(builder.load(total_sum), weights, flags=("fast",)), total_sum)
        each_chunk(exponentiate)
        inverse = splat(builder, builder.fdiv(ir.Constant(ir.FloatType(), 1.0),
                                               _reduce(builder, "llvm.vector.reduce.fadd", builder.load(total_sum),
                                                       ir.Constant(ir.FloatType(), -0.0))))
        each_chunk(lambda pointer, inside: builder.store(
            builder.fmul(builder.load(pointer, align=4), inverse, flags=("fast",)), pointer, align=4))
        return context.get_dummy_value()
    return types.void(scores, first, total), codegen


def _exp_lanes(builder, x):
    """e**x for 16 values x <= 0, as row_kernels._exp computes one (Cephes' expf polynomial times 2**n
    made from its exponent bits; below -87, e**-87)."""
    def constant(value):
        return ir.Constant(VECTOR, [float(value)] * LANES)

    def fma(a, b, c):
        return builder.fadd(builder.fmul(a, b, flags=("fast",)), c, flags=("fast",))
    x = _vector_call(builder, "llvm.maxnum", [x, constant(-87.0)])
    n = _vector_call(builder, "llvm.floor", [fma(x, constant(LOG2_E), constant(0.5))])
    f = builder.fsub(builder.fsub(x, builder.fmul(n, constant(LN2_HIGH), flags=("fast",)), flags=("fast",)),
                     builder.fmul(n, constant(LN2_LOW), flags=("fast",)), flags=("fast",))
    p = constant(EXP_POLYNOMIAL[0])
    for coefficient in EXP_POLYNOMIAL[1:]:
        p = fma(p, f, constant(coefficient))
    p = fma(builder.fmul(p, f, flags=("fast",)), f, builder.fadd(f, constant(1.0), flags=("fast",)))
    int_lanes = ir.VectorType(ir.IntType(32), LANES)
    exponent = builder.add(builder.fptosi(n, int_lanes), ir.Constant(int_lanes, [127] * LANES))
    two_to_n = builder.bitcast(builder.shl(exponent, ir.Constant(int_lanes, [23] * LANES)), VECTOR)
    return builder.fmul(p, two_to_n, flags=("fast",))


def _vector_call(builder, name, operands):
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(VECTOR, [VECTOR] * len(operands)),
                                              f"{name}.v16f32")
    return builder.call(function, operands)


def _reduce(builder, name, vector, *start):
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType()] * len(start) + [VECTOR]), f"{name}.v16f32")
    return builder.call(function, [*start, vector])


def _lane_numbers(integer):
    return ir.Constant(ir.VectorType(integer, LANES), list(range(LANES)))


def row_sums(builder, rows):
    """One vector holding, in lane i, the sum of the 16 lanes of rows[i] (16 vectors): a tree of 15
    shuffle-and-add steps."""
    width = LANES
    while len(rows) > 1:
        rows = [_halves_added(builder, rows[i], rows[i + 1], width) for i in range(0, len(rows), 2)]
        width //= 2
    return rows[0]


def load_lanes(builder, pointer):
    """The 16 float values from pointer on."""
    return builder.load(builder.bitcast(pointer, VECTOR.as_pointer()), align=4)


def store_lanes(builder, lanes, pointer, offset=0):
    """Store 16 lanes at pointer + offset (float values)."""
    builder.store(lanes, builder.bitcast(builder.gep(pointer, [ir.IntType(64)(offset)]), VECTOR.as_pointer()),
                  align=4)


def store_or_add_lanes(builder, lanes, pointer, add):
    """Store 16 lanes at pointer, or add them to the 16 values there where `add` (an LLVM boolean) holds."""
    with builder.if_else(add) as (adding, storing):
        with adding:
            store_lanes(builder, builder.fadd(load_lanes(builder, pointer), lanes, flags=("fast",)), pointer)
        with storing:
            store_lanes(builder, lanes, pointer)


def prefetch_line(builder, pointer):
    """Ask for the cache line holding *pointer, into every cache level (llvm.prefetch: a hint, never a fault)."""
    byte_pointer = ir.IntType(8).as_pointer()
    int32 = ir.IntType(32)
    prefetch = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]), "llvm.prefetch.p0i8")
    read, keep_in_all_levels, data = int32(0), int32(3), int32(1)
    builder.call(prefetch, [builder.bitcast(pointer, byte_pointer), read, keep_in_all_levels, data])


def _halves_added(builder, a, b, width):
    """a and b hold 16 / width partial sums of `width` lanes each; the result holds a's then b's, each now
    `width / 2` lanes: the first half of each added to its second."""
    half = width // 2
    first_halves = [group * width + j for group in range(LANES // width) for j in range(half)]
    first_halves += [LANES + i for i in first_halves]                         # b's lanes follow a's
    second_halves = [i + half for i in first_halves]
    return builder.fadd(builder.shuffle_vector(a, b, ir.Constant(_LANE_INDICES, first_halves)),
                        builder.shuffle_vector(a, b, ir.Constant(_LANE_INDICES, second_halves)), flags=("fast",))


def float32_rows(array, ndim: int) -> bool:
    """Whether `array` is a C-contiguous float32 array of `ndim` axes, the only kind these read as lanes."""
    return (isinstance(array, types.Array) and array.ndim == ndim and array.layout == "C"
            and array.dtype == types.float32)


def _data(context, builder, array_type, array):
    return context.make_array(array_type)(context, builder, array).data


def data_and_shape(context, builder, array_type, array):
    """(pointer to the first value, the shape's values) of an array argument."""
    structure = context.make_array(array_type)(context, builder, array)
    return structure.data, cgutils.unpack_tuple(builder, structure.shape, array_type.ndim)


def accumulate_lanes(builder, accumulator, a, b):
    """*accumulator += a · b for an alloca'd vector, which LLVM keeps in a register across a loop."""
    product = builder.fmul(a, b, flags=("fast",))
    builder.store(builder.fadd(builder.load(accumulator), product, flags=("fast",)), accumulator)


def _first_lanes(context, builder, array_type, array):
    """The first 16 values of a 1-D array."""
    return builder.load(builder.bitcast(_data(context, builder, array_type, array), VECTOR.as_pointer()), align=4)


def _row_lanes(context, builder, signature, args, position):
    """The first 16 values of row `row` of the 2-D array, for the (rows, row) arguments at `position`. Taking
    the array and the row, not the row as a view, matters: a view made in a loop costs two calls to Numba's
    reference counting each time (a story-model step's attention ran 1.7x slower)."""
    array_type = signature.args[position]
    array = context.make_array(array_type)(context, builder, args[position])
    row = context.cast(builder, args[position + 1], signature.args[position + 1], types.intp)
    pointer = cgutils.get_item_pointer(context, builder, array_type, array, [row, row.type(0)], wraparound=False)
    return builder.load(builder.bitcast(pointer, VECTOR.as_pointer()), align=4)


def _buffer_lanes(context, builder, signature, args):
    """Pointer to buffer[at : at + 16] for the (buffer, at) arguments first."""
    at = context.cast(builder, args[1], signature.args[1], types.intp)
    return builder.bitcast(builder.gep(args[0], [at]), VECTOR.as_pointer())


def splat(builder, value):
    """16 lanes of a float or an integer value."""
    lanes = ir.VectorType(value.type, LANES)
    one = builder.insert_element(ir.Constant(lanes, ir.Undefined), value, ir.IntType(32)(0))
    return builder.shuffle_vector(one, ir.Constant(lanes, ir.Undefined), ir.Constant(_LANE_INDICES, [0] * LANES))
