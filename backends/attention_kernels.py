"""A compiled kernel for a decode step of many sequences: each sequence's query attends over its own keys and
values where the paged KV pool keeps them (vLLM's paged attention), with nothing gathered and nothing padded.

NumPy can batch the sequences' attention only by first copying every sequence's keys and values into one
padded array (np.take) and masking the padding: for 16 story-model sequences the copies and the padded
products cost 40% of the whole step. Here each key and value row is read from its slot in the pool by two
query heads of its group at once: one pass over the row feeds two sums, which LLVM vectorises along the
row (per head, or per group of any size, it did not: 1.6x slower for the story model's 16-wide heads).
Heads of exactly 16 values are shorter than LLVM's vector loop and take 16-lane vector operations of our own
instead (vector_lanes): the story model's attention 1.3-1.6x, then 1.3-1.4x more once a block of 16 keys was
multiplied and summed in registers for both heads of a pair, with no view made per pair (block_scores). The
softmax is 16 lanes for every head width, its exp a polynomial (libm's ran one value at a time): another
1.1-1.3x; it divides once per head, the weighted sum of the values, not each weight. The weighted sum of the
values keeps its sums in registers across positions for heads of 16, 32, 64 or 128 values (`weighted_values`),
where a loop summing into the output loaded and stored it at every position: the kernel on SmolLM2's shape
1.3-1.5x (1.9x threaded at 190 positions), on the story model's 0.96-1.1x (min of 15 turns, one process).

One thread (no `prange`) when the step's products run in OpenBLAS's threads just before and after: a second
pool of spinning threads would starve them (see quantized_kernels; sharing the sequences out ran a story-model
step 5x slower). When the products run in Numba's own threads (quantised weights, or float32 weights in panels
on a machine with AVX-512), `paged_decode_attention_threaded` shares out the (sequence, kv head) pairs. Numba
compiles these on first use and keeps the machine code in its cache, as for the quantised kernels; the NumPy
backend imports them only for a program that runs Numba already or a step of several sequences, so a float32
model on a machine without AVX-512 that never batches never loads Numba.
"""

# Compiled with the helpers of fingerprint 39d855ea8b68 (vector_lanes.py; tests/test_kernel_caches.py).

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from .vector_lanes import LANES, VALUE_WIDTHS, block_scores, exponentials, largest, weighted_values


@njit(fastmath=True, cache=True, nogil=True)
def paged_decode_attention(q, k_pool, v_pool, slots, totals, window, scale, out):
    """out[r] = softmax(scale · q[r] · Kᵀ) · V for sequence r's one query q[r] [heads, head_dim], over its
    positions max(0, totals[r] - window) .. totals[r] - 1 (all of them when window is 0), whose keys and
    values sit in slots[r, t] of k_pool and v_pool [kv_heads, slots, head_dim]. Query head h reads kv head
    h // (heads // kv_heads)."""
    q = np.ascontiguousarray(q)               # the vector path reads query heads as 16 contiguous lanes
    weights, peaks = _buffers(q, k_pool, slots)
    for r in range(q.shape[0]):
        for g in range(k_pool.shape[0]):
            _attend(q, k_pool, v_pool, slots, totals, window, scale, out, r, g, weights, peaks)


def paged_decode_attention_threaded(q, k_pool, v_pool, slots, totals, window, scale, out):
    """paged_decode_attention with the (sequence, kv head) pairs shared out among Numba's threads: for a step
    whose products run in those same threads (quantised weights, panels), so that no OpenBLAS thread is left
    spinning for the core. Pairs rather than sequences: smaller pieces even out sequences of different lengths."""
    _attention_in_runs(q, k_pool, v_pool, slots, totals, window, scale, out, get_num_threads())


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _attention_in_runs(q, k_pool, v_pool, slots, totals, window, scale, out, runs):
    """The pairs cut into `runs` runs (one a thread), each making its buffers once: made for each pair, they
    cost 2 of the 19 us of a 16-sequence story step's call. (The thread count is an argument because Numba
    cannot cache a kernel that asks for it.)"""
    q = np.ascontiguousarray(q)
    kv_heads = k_pool.shape[0]
    pairs = q.shape[0] * kv_heads
    for run in prange(runs):
        weights, peaks = _buffers(q, k_pool, slots)
        for pair in range(run * pairs // runs, (run + 1) * pairs // runs):
            _attend(q, k_pool, v_pool, slots, totals, window, scale, out, pair // kv_heads, pair % kv_heads,
                    weights, peaks)


@njit(inline="always")
def _buffers(q, k_pool, slots):
    """Scores, then attention weights, of one kv head's group of query heads over a sequence's positions (16
    more than the longest: a block of scores is stored whole, past the last position too); and each head's
    largest score, then 1 / its sum of weights."""
    group = q.shape[1] // k_pool.shape[0]
    return np.empty((group, slots.shape[1] + LANES), np.float32), np.empty(group, np.float32)


@njit(inline="always")
def _attend(q, k_pool, v_pool, slots, totals, window, scale, out, r, g, weights, peaks):
    """Sequence r's query heads of kv head g's group, two at a time (and a last one alone in an odd group).
    Scores of 16-value heads take the vector path (vector_lanes): LLVM's own vector loops cover 32 values (8
    lanes, 4 interleaved) and left them scalar. Wider heads it vectorises itself, and there the lanes measured
    no faster for scores (SmolLM2's 64: within the noise, or slower). The exponentials are lanes for all widths,
    and so are the values for the widths weighted_values takes. A head's softmax divides once, at the end: its
    weighted sum of values by the sum of its weights."""
    group = q.shape[1] // k_pool.shape[0]
    total = totals[r]
    first = max(0, total - window) if window > 0 else 0
    head = g * group
    for j in range(0, group, 2):
        heads = min(2, group - j)
        if q.shape[2] == LANES:
            peaks[j], peaks[j + heads - 1] = _scores_in_blocks(q, k_pool, slots, r, g, head + j, first, total, scale,
                                                              heads, weights, j)
        elif heads == 2:
            _scores_of_two(q, k_pool, slots, r, g, head + j, first, total, scale, weights[j], weights[j + 1])
            peaks[j], peaks[j + 1] = largest(weights, j, first, total), largest(weights, j + 1, first, total)
        else:
            _scores_of_one(q, k_pool, slots, r, g, head + j, first, total, scale, weights[j])
            peaks[j] = largest(weights, j, first, total)
    for j in range(group):
        peaks[j] = 1 / exponentials(weights, j, first, total, peaks[j])        # now each head's 1 / Σ weights
    for j in range(0, group, 2):
        heads = min(2, group - j)
        if q.shape[2] in VALUE_WIDTHS:
            weighted_values(v_pool, g, slots, r, first, total, weights, j, j + heads - 1, heads, out, head + j,
                            head + j + heads - 1, peaks[j], peaks[j + heads - 1])
        elif heads == 2:
            _values_of_two(v_pool, slots, r, g, first, total, weights[j], weights[j + 1], peaks[j], peaks[j + 1],
                           out[r, head + j], out[r, head + j + 1])
        else:
            _values_of_one(v_pool, slots, r, g, first, total, weights[j], peaks[j], out[r, head + j])


@njit(inline="always")
def _scores_in_blocks(q, k_pool, slots, r, g, h, first, total, scale, heads, scores, row):
    """Query heads h (and h + 1 when heads is 2) of 16 values against sequence r's keys in kv head g, into rows
    `row` (and row + 1) of scores, a block of 16 positions at a time (block_scores). Returns each head's
    largest score (the first head's twice when heads is 1)."""
    peak_a = peak_b = np.float32(np.finfo(np.float32).min)
    for block in range(first, total, LANES):
        whole = block + LANES <= total
        if heads == 2 and whole:
            a, b = block_scores(q, r, h, 2, k_pool, g, slots, block, total, True, scale, scores, row)
        elif heads == 2:
            a, b = block_scores(q, r, h, 2, k_pool, g, slots, block, total, False, scale, scores, row)
        elif whole:
            a, b = block_scores(q, r, h, 1, k_pool, g, slots, block, total, True, scale, scores, row)
        else:
            a, b = block_scores(q, r, h, 1, k_pool, g, slots, block, total, False, scale, scores, row)
        peak_a, peak_b = max(peak_a, a), max(peak_b, b)
    return peak_a, peak_b


@njit(inline="always")
def _scores_of_two(q, k_pool, slots, r, g, h, first, total, scale, scores_h, scores_next):
    """Query heads h and h + 1 of sequence r against its keys in kv head g, four positions at a time: a
    position's sum is a chain of head_dim dependent adds, which LLVM does not vectorise when the head is shorter
    than its vector loop (16 for the story model), so eight chains side by side keep the adder busy where two
    waited on each other (story attention 1.1-1.2x; 1.1x for 64-wide heads too)."""
    t = first
    while t + 3 < total:
        s0, s1, s2, s3 = slots[r, t], slots[r, t + 1], slots[r, t + 2], slots[r, t + 3]
        a0, a1, a2, a3 = np.float32(0), np.float32(0), np.float32(0), np.float32(0)
        b0, b1, b2, b3 = np.float32(0), np.float32(0), np.float32(0), np.float32(0)
        for d in range(q.shape[2]):
            qa, qb = q[r, h, d], q[r, h + 1, d]
            k0, k1, k2, k3 = k_pool[g, s0, d], k_pool[g, s1, d], k_pool[g, s2, d], k_pool[g, s3, d]
            a0 += qa * k0
            a1 += qa * k1
            a2 += qa * k2
            a3 += qa * k3
            b0 += qb * k0
            b1 += qb * k1
            b2 += qb * k2
            b3 += qb * k3
        scores_h[t], scores_h[t + 1], scores_h[t + 2], scores_h[t + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        scores_next[t], scores_next[t + 1] = b0 * scale, b1 * scale
        scores_next[t + 2], scores_next[t + 3] = b2 * scale, b3 * scale
        t += 4
    for t in range(t, total):
        slot = slots[r, t]
        a, b = np.float32(0), np.float32(0)
        for d in range(q.shape[2]):
            key = k_pool[g, slot, d]
            a += q[r, h, d] * key
            b += q[r, h + 1, d] * key
        scores_h[t] = a * scale
        scores_next[t] = b * scale


@njit(inline="always")
def _scores_of_one(q, k_pool, slots, r, g, h, first, total, scale, scores_h):
    """Query head h alone (the last of an odd group), four positions at a time as in _scores_of_two."""
    t = first
    while t + 3 < total:
        s0, s1, s2, s3 = slots[r, t], slots[r, t + 1], slots[r, t + 2], slots[r, t + 3]
        a0, a1, a2, a3 = np.float32(0), np.float32(0), np.float32(0), np.float32(0)
        for d in range(q.shape[2]):
            qa = q[r, h, d]
            a0 += qa * k_pool[g, s0, d]
            a1 += qa * k_pool[g, s1, d]
            a2 += qa * k_pool[g, s2, d]
            a3 += qa * k_pool[g, s3, d]
        scores_h[t], scores_h[t + 1], scores_h[t + 2], scores_h[t + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        t += 4
    for t in range(t, total):
        slot = slots[r, t]
        a = np.float32(0)
        for d in range(q.shape[2]):
            a += q[r, h, d] * k_pool[g, slot, d]
        scores_h[t] = a * scale


@njit(inline="always")
def _values_of_two(v_pool, slots, r, g, first, total, weights_h, weights_next, scale_h, scale_next, out_h, out_next):
    """out_h = scale_h · Σ_t weights_h[t] · value t, and likewise for the next head (the scalar loops)."""
    out_h[:] = 0
    out_next[:] = 0
    for t in range(first, total):
        slot = slots[r, t]
        a, b = weights_h[t], weights_next[t]
        for d in range(out_h.shape[0]):
            value = v_pool[g, slot, d]
            out_h[d] += a * value
            out_next[d] += b * value
    out_h *= scale_h
    out_next *= scale_next


@njit(inline="always")
def _values_of_one(v_pool, slots, r, g, first, total, weights_h, scale_h, out_h):
    out_h[:] = 0
    for t in range(first, total):
        slot = slots[r, t]
        a = weights_h[t]
        for d in range(out_h.shape[0]):
            out_h[d] += a * v_pool[g, slot, d]
    out_h *= scale_h
