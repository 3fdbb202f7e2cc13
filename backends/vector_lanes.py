"""Sixteen-lane vector operations for the compiled kernels, written as LLVM vectors (Numba intrinsics).

Numba leaves LLVM's SLP vectoriser off (numba#8705), so a loop over a constant 16 values, once unrolled, stays
sixteen scalar operations, and its loop vectoriser skips any loop shorter than its vector loop (8 lanes times
4 interleaved = 32 on this machine). A 16-value attention head, the story model's, was therefore computed one
value at a time. These intrinsics state the vector operation outright: LLVM emits one 512-bit operation, or
two 256-bit ones where AVX-512 is missing.

They read 16-value rows of C-contiguous float32 arrays (an attention head's query, a key or value row of the
pool), write 16 values into such a row, and work on `lane_buffer`s, small float32 arrays on the stack. A row
is named by its array and indices, never passed as a view: a view made per call in a kernel's loop costs two
calls to Numba's reference counting (the story model's attention ran 1.3-1.5x faster without them). The
caller keeps every access in bounds: there are no checks.

Numba's disk cache keys a kernel on the contents of its own source file only (Numba 0.68 hashes them; touching
the file does nothing): after editing this module, put the new fingerprint that tests/test_kernel_caches.py
asks for into each kernel module that compiles it in, or their kernels keep the old code.
"""

from __future__ import annotations

from contextlib import contextmanager

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
_LOWEST = ir.Constant(VECTOR, [float(np.finfo(np.float32).min)] * LANES)   # finite: fast-math flags hold


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


# Head widths weighted_values takes: 1, 2, 4 or 8 vectors of 16 lanes.
VALUE_WIDTHS = (16, 32, 64, 128)


@intrinsic
def weighted_values(typingctx, values, g, slots, r, first, total, weights, row_a, row_b, heads, out, head_a, head_b,
                    scale_a, scale_b):
    """out[r, head_a] = scale_a · Σ_t weights[row_a, t] · values[g, slots[r, t]] over positions first..total-1
    (and out[r, head_b] from weights[row_b] and scale_b when heads is 2; heads may be 1 or 2), for rows of a
    width in VALUE_WIDTHS: the sums stay in registers, one vector per 16 values and head, across every
    position. Summed into the output arrays instead, each position loaded and stored them again, and waited on
    the stores: two thirds of SmolLM2's attention."""
    if not (float32_rows(values, 3) and float32_rows(weights, 2) and float32_rows(out, 3)
            and isinstance(slots, types.Array) and slots.ndim == 2 and slots.layout == "C"
            and slots.dtype == types.intp):
        return None

    def codegen(context, builder, signature, args):
        _, (_, _, width) = data_and_shape(context, builder, signature.args[0], args[0])
        value_rows = row_pointer(context, builder, signature, args, 0, (1,))     # values[g, 0]
        slot_row = row_pointer(context, builder, signature, args, 2, (3,))      # slots[r]
        first, total, heads_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (4, 5, 9))
        weights = [row_pointer(context, builder, signature, args, 6, (i,)) for i in (7, 8)]
        outs = [row_pointer(context, builder, signature, args, 10, (3, i)) for i in (11, 12)]
        scales = [splat(builder, context.cast(builder, args[i], signature.args[i], types.float32)) for i in (13, 14)]
        intp = width.type
        for heads_wanted in (1, 2):
            for head_width in VALUE_WIDTHS:
                chunks = head_width // LANES
                wanted = builder.and_(builder.icmp_signed("==", heads_, intp(heads_wanted)),
                                      builder.icmp_signed("==", width, intp(head_width)))
                with builder.if_then(wanted):
                    # Sums in `sets` interleaved sets (positions take turns), so that at least four chains of
                    # adds run side by side: a head of 16 values alone had one, each position's add waiting on
                    # the last's (the story model's attention 1.05-1.1x).
                    sets = max(1, 4 // (chunks * heads_wanted))
                    sums = [[[cgutils.alloca_once_value(builder, ir.Constant(VECTOR, [0.0] * LANES))
                              for _ in range(chunks)] for _ in range(heads_wanted)] for _ in range(sets)]

                    def add_position(t, into):
                        row = builder.gep(value_rows, [builder.mul(builder.load(builder.gep(slot_row, [t])), width)])
                        position_weights = [splat(builder, builder.load(builder.gep(weights[h], [t])))
                                            for h in range(heads_wanted)]
                        for c in range(chunks):
                            lanes = load_lanes(builder, builder.gep(row, [intp(LANES * c)]))
                            for h in range(heads_wanted):
                                accumulate_lanes(builder, into[h][c], position_weights[h], lanes)
                    count = builder.sub(total, first)
                    rounds = builder.udiv(count, intp(sets))
                    with cgutils.for_range(builder, rounds) as loop:
                        t = builder.add(first, builder.mul(loop.index, intp(sets)))
                        for k in range(sets):
                            add_position(builder.add(t, intp(k)), sums[k])
                    with cgutils.for_range(builder, builder.sub(count, builder.mul(rounds, intp(sets)))) as loop:
                        add_position(builder.add(builder.add(first, builder.mul(rounds, intp(sets))), loop.index),
                                     sums[0])
                    for h in range(heads_wanted):
                        for c in range(chunks):
                            total_sum = builder.load(sums[0][h][c])
                            for k in range(1, sets):
                                total_sum = builder.fadd(total_sum, builder.load(sums[k][h][c]), flags=("fast",))
                            store_lanes(builder, builder.fmul(total_sum, scales[h], flags=("fast",)), outs[h],
                                        LANES * c)
        return context.get_dummy_value()
    return types.void(values, g, slots, r, first, total, weights, row_a, row_b, heads, out, head_a, head_b, scale_a,
                      scale_b), codegen


@intrinsic
def block_scores(typingctx, q, r, h, heads, keys, g, slots, block, total, whole, scale, out, out_row):
    """out[out_row + j, block + i] = scale · q[r, h + j] · keys[g, slots[r, block + i]] for i < 16 and j < heads
    (1 or 2, a literal): the scores of a block of 16 positions, each key read once for both heads, the products
    kept in registers and summed 16 at once by row_sums' tree (where 16 separate sums take four shuffle-and-add
    steps each and use one lane of each result). Through a buffer on the stack instead (each product stored,
    then loaded by the tree) and each head reading the keys again, the story model's attention ran 1.25-1.4x
    slower. Unless `whole` (a literal: the block ends by total), positions from `total` on repeat the last one's
    key (reading no slot past it), so their scores, written too (`out` needs room for them), leave the largest as
    it is. Returns the largest score of each head (the first head's twice when heads is 1)."""
    if not (float32_rows(q, 3) and float32_rows(keys, 3) and float32_rows(out, 2)
            and isinstance(heads, types.IntegerLiteral) and isinstance(whole, types.BooleanLiteral)):
        return None
    count, clamp = heads.literal_value, not whole.literal_value

    def codegen(context, builder, signature, args):
        first_query = row_pointer(context, builder, signature, args, 0, (1, 2))
        _, (_, _, width) = data_and_shape(context, builder, signature.args[4], args[4])    # of q's heads too
        queries = [load_lanes(builder, builder.gep(first_query, [builder.mul(width, width.type(j))]))
                   for j in range(count)]
        key_rows = row_pointer(context, builder, signature, args, 4, (5,))
        slot_row = row_pointer(context, builder, signature, args, 6, (1,))
        start, total_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (7, 8))
        last = builder.sub(total_, total_.type(1))
        products = [[] for _ in range(count)]
        for i in range(LANES):
            position = builder.add(start, start.type(i))
            if clamp:
                position = builder.select(builder.icmp_signed("<", position, total_), position, last)
            slot = builder.load(builder.gep(slot_row, [position]))
            key = load_lanes(builder, builder.gep(key_rows, [builder.mul(slot, width)]))
            for j in range(count):
                products[j].append(builder.fmul(queries[j], key, flags=("fast",)))
        _, (_, out_width) = data_and_shape(context, builder, signature.args[11], args[11])
        first_out = builder.gep(row_pointer(context, builder, signature, args, 11, (12,)), [start])
        peaks = []
        for j in range(count):
            scores = builder.fmul(row_sums(builder, products[j]), splat(builder, args[10]), flags=("fast",))
            store_lanes(builder, scores, builder.gep(first_out, [builder.mul(out_width, out_width.type(j))]))
            peaks.append(_reduce(builder, "llvm.vector.reduce.fmax", scores))
        return context.make_tuple(builder, signature.return_type, peaks + [peaks[0]] * (2 - count))
    peaks_type = types.UniTuple(types.float32, 2)
    return peaks_type(q, r, h, heads, keys, g, slots, block, total, whole, scale, out, out_row), codegen


@intrinsic
def rotate_pairs(typingctx, x, i, h, c, table, y):
    """y[i, h, c : c + 16] = x[i, h, c : c + 16] with each adjacent pair (a, b) rotated by the angle whose (cos,
    sin) are the pair's own two values of table[i, c : c + 16]: (a·cos - b·sin, a·sin + b·cos). x and y may be
    strided views (rows of q or k in a q|k|v row), but the caller checks that their last axis and table's
    rows are contiguous. Two shuffles spread each (cos, sin) over its pair, a third swaps each pair's values."""
    if not all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (x, table, y)):
        return None

    def codegen(context, builder, signature, args):
        lanes = load_lanes(builder, row_pointer(context, builder, signature, args, 0, (1, 2, 3)))
        cos_sin = load_lanes(builder, row_pointer(context, builder, signature, args, 4, (1, 3)))
        cos = _shuffled(builder, cos_sin, [k - k % 2 for k in range(LANES)])             # c0 c0 c1 c1 ...
        sin = _shuffled(builder, cos_sin, [k - k % 2 + 1 for k in range(LANES)])         # s0 s0 s1 s1 ...
        sin = builder.fmul(sin, ir.Constant(VECTOR, [-1.0, 1.0] * (LANES // 2)), flags=("fast",))
        swapped = _shuffled(builder, lanes, [k + 1 - 2 * (k % 2) for k in range(LANES)])  # b0 a0 b1 a1 ...
        rotated = builder.fadd(builder.fmul(lanes, cos, flags=("fast",)), builder.fmul(swapped, sin, flags=("fast",)),
                               flags=("fast",))
        store_lanes(builder, rotated, row_pointer(context, builder, signature, args, 5, (1, 2, 3)))
        return context.get_dummy_value()
    return types.void(x, i, h, c, table, y), codegen


@intrinsic
def largest(typingctx, scores, row, first, total):
    """The largest of scores[row, first:total], 16 values at a time."""
    if not float32_rows(scores, 2):
        return None

    def codegen(context, builder, signature, args):
        data = row_pointer(context, builder, signature, args, 0, (1,))
        first_, total_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (2, 3))
        peak = cgutils.alloca_once_value(builder, _LOWEST)
        with _each_chunk(builder, first_, total_) as (start, inside):
            lanes = load_lanes(builder, builder.gep(data, [start]))
            builder.store(_vector_call(builder, "llvm.maxnum",
                                       [builder.load(peak), builder.select(inside, lanes, _LOWEST)]), peak)
        return _reduce(builder, "llvm.vector.reduce.fmax", builder.load(peak))
    return types.float32(scores, row, first, total), codegen


@intrinsic
def exponentials(typingctx, scores, row, first, total, peak):
    """scores[row, first:total] = e**(scores - peak), 16 values at a time; returns their sum. With the largest
    score as the peak these are a softmax's weights before its division, which the caller makes once, on the
    weighted sum of the values, not on every weight. The last 16 may reach past total: `scores` must have room
    for 16 values beyond it, where this writes zeros. The exp is _exp's polynomial as a vector (row_kernels)."""
    if not float32_rows(scores, 2):
        return None

    def codegen(context, builder, signature, args):
        data = row_pointer(context, builder, signature, args, 0, (1,))
        first_, total_ = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (2, 3))
        peak_ = splat(builder, context.cast(builder, args[4], signature.args[4], types.float32))
        zeros = ir.Constant(VECTOR, [0.0] * LANES)
        total_sum = cgutils.alloca_once_value(builder, zeros)
        with _each_chunk(builder, first_, total_) as (start, inside):
            pointer = builder.bitcast(builder.gep(data, [start]), VECTOR.as_pointer())
            shifted = builder.fsub(builder.load(pointer, align=4), peak_, flags=("fast",))
            weights = builder.select(inside, _exp_lanes(builder, shifted), zeros)
            builder.store(weights, pointer, align=4)
            builder.store(builder.fadd(builder.load(total_sum), weights, flags=("fast",)), total_sum)
        return _reduce(builder, "llvm.vector.reduce.fadd", builder.load(total_sum),
                       ir.Constant(ir.FloatType(), -0.0))
    return types.float32(scores, row, first, total, peak), codegen


@contextmanager
def _each_chunk(builder, first, total):
    """A loop over positions first..total-1, 16 at a time: yields (the chunk's first position, which of its 16
    lanes are before total)."""
    intp = first.type
    chunks = builder.udiv(builder.add(builder.sub(total, first), intp(LANES - 1)), intp(LANES))
    with cgutils.for_range(builder, chunks) as loop:
        start = builder.add(first, builder.mul(loop.index, intp(LANES)))
        yield start, builder.icmp_signed("<", builder.add(splat(builder, start), _lane_numbers(intp)),
                                         splat(builder, total))


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
    return builder.call(function, [*start, vector], fastmath=("fast",))   # a tree, not one add after another


def _shuffled(builder, lanes, order):
    """The 16 lanes in the given order (lane k of the result is lanes[order[k]])."""
    return builder.shuffle_vector(lanes, ir.Constant(VECTOR, ir.Undefined), ir.Constant(_LANE_INDICES, order))


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


def data_and_shape(context, builder, array_type, array):
    """(pointer to the first value, the shape's values) of an array argument."""
    structure = context.make_array(array_type)(context, builder, array)
    return structure.data, cgutils.unpack_tuple(builder, structure.shape, array_type.ndim)


def accumulate_lanes(builder, accumulator, a, b):
    """*accumulator += a · b for an alloca'd vector, which LLVM keeps in a register across a loop."""
    product = builder.fmul(a, b, flags=("fast",))
    builder.store(builder.fadd(builder.load(accumulator), product, flags=("fast",)), accumulator)


def row_pointer(context, builder, signature, args, array_at, index_at):
    """A float pointer to array[i_1, .., i_n, 0, ..] for the array argument at position `array_at` and the
    index arguments at the positions `index_at` (zeros for the axes after them): a row indexed in place, where
    a view would cost reference counting (see the module's docstring)."""
    array_type = signature.args[array_at]
    array = context.make_array(array_type)(context, builder, args[array_at])
    index = [context.cast(builder, args[i], signature.args[i], types.intp) for i in index_at]
    index += [index[0].type(0)] * (array_type.ndim - len(index))
    return cgutils.get_item_pointer(context, builder, array_type, array, index, wraparound=False)


def splat(builder, value):
    """16 lanes of a float or an integer value."""
    lanes = ir.VectorType(value.type, LANES)
    one = builder.insert_element(ir.Constant(lanes, ir.Undefined), value, ir.IntType(32)(0))
    return builder.shuffle_vector(one, ir.Constant(lanes, ir.Undefined), ir.Constant(_LANE_INDICES, [0] * LANES))
