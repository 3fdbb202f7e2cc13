"""A compiled kernel for a decode step of many sequences: each sequence's query attends over its own keys and
values where the paged KV pool keeps them (vLLM's paged attention), with nothing gathered and nothing padded.

NumPy can batch the sequences' attention only by first copying every sequence's keys and values into one
padded array (np.take) and masking the padding: for 16 story-model sequences the copies and the padded
products cost 40% of the whole step. Here each key and value row is read once, from its slot in the pool,
and serves every query head of its group.

One thread (no `prange`) when the step's products run in OpenBLAS's threads just before and after: a second
pool of spinning threads would starve them (see quantized_kernels; sharing the sequences out ran a story-model
step 5x slower). When the products run in Numba's own threads (quantised weights),
`paged_decode_attention_threaded` shares out the (sequence, kv head) pairs. Numba compiles these on first use
and keeps the machine code in its cache, as for the quantised kernels; the NumPy backend imports them only for
a step of several sequences, so a model that never batches never loads Numba for them.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(fastmath=True, cache=True, nogil=True)
def paged_decode_attention(q, k_pool, v_pool, slots, totals, window, scale, out):
    """out[r] = softmax(scale · q[r] · Kᵀ) · V for sequence r's one query q[r] [heads, head_dim], over its
    positions max(0, totals[r] - window) .. totals[r] - 1 (all of them when window is 0), whose keys and
    values sit in slots[r, t] of k_pool and v_pool [kv_heads, slots, head_dim]. Query head h reads kv head
    h // (heads // kv_heads)."""
    scores, largest, sums, acc = _buffers(q, k_pool, slots)
    for r in range(q.shape[0]):
        for g in range(k_pool.shape[0]):
            _attend(q, k_pool, v_pool, slots, totals, window, scale, out, r, g, scores, largest, sums, acc)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def paged_decode_attention_threaded(q, k_pool, v_pool, slots, totals, window, scale, out):
    """paged_decode_attention with the (sequence, kv head) pairs shared out among Numba's threads: for a step
    whose products run in those same threads (quantised weights), so that no OpenBLAS thread is left spinning
    for the core. Pairs rather than sequences: smaller pieces even out sequences of different lengths."""
    kv_heads = k_pool.shape[0]
    for pair in prange(q.shape[0] * kv_heads):
        scores, largest, sums, acc = _buffers(q, k_pool, slots)
        _attend(q, k_pool, v_pool, slots, totals, window, scale, out, pair // kv_heads, pair % kv_heads,
                scores, largest, sums, acc)


@njit(inline="always")
def _buffers(q, k_pool, slots):
    """Scores, running maxima, sums and accumulators for one sequence's query heads of one kv head."""
    group = q.shape[1] // k_pool.shape[0]
    return (np.empty((group, slots.shape[1]), np.float32), np.empty(group, np.float32),
            np.empty(group, np.float32), np.empty((group, q.shape[2]), np.float32))


@njit(inline="always")
def _attend(q, k_pool, v_pool, slots, totals, window, scale, out, r, g, scores, largest, sums, acc):
    """Sequence r's query heads of kv head g's group."""
    head_dim = q.shape[2]
    group = q.shape[1] // k_pool.shape[0]
    total = totals[r]
    first = max(0, total - window) if window > 0 else 0
    head = g * group
    largest[:] = -np.inf
    for t in range(first, total):
        key = k_pool[g, slots[r, t]]
        for j in range(group):
            s = np.float32(0)
            for d in range(head_dim):
                s += q[r, head + j, d] * key[d]
            s *= scale
            scores[j, t] = s
            largest[j] = max(largest[j], s)
    sums[:] = 0
    acc[:] = 0
    for t in range(first, total):
        value = v_pool[g, slots[r, t]]
        for j in range(group):
            p = np.exp(scores[j, t] - largest[j])
            sums[j] += p
            for d in range(head_dim):
                acc[j, d] += p * value[d]
    for j in range(group):
        for d in range(head_dim):
            out[r, head + j, d] = acc[j, d] / sums[j]
