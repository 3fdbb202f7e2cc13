"""A compiled kernel for a decode step of many sequences: each sequence's query attends over its own keys and
values where the paged KV pool keeps them (vLLM's paged attention), with nothing gathered and nothing padded.

NumPy can batch the sequences' attention only by first copying every sequence's keys and values into one
padded array (np.take) and masking the padding: for 16 story-model sequences the copies and the padded
products cost 40% of the whole step. Here each key and value row is read once, from its slot in the pool,
and serves every query head of its group.

One thread (no `prange`): the step's products run in OpenBLAS's threads just before and after, and a second
pool of spinning threads would starve them (see quantized_kernels). Numba compiles this on first use and keeps
the machine code in its cache, as for the quantised kernels; the NumPy backend imports it only for a step of
several sequences, so a model that never batches never loads Numba for it.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(fastmath=True, cache=True, nogil=True)
def paged_decode_attention(q, k_pool, v_pool, slots, totals, window, scale, out):
    """out[r] = softmax(scale · q[r] · Kᵀ) · V for sequence r's one query q[r] [heads, head_dim], over its
    positions max(0, totals[r] - window) .. totals[r] - 1 (all of them when window is 0), whose keys and
    values sit in slots[r, t] of k_pool and v_pool [kv_heads, slots, head_dim]. Query head h reads kv head
    h // (heads // kv_heads)."""
    sequences, heads, head_dim = q.shape
    kv_heads = k_pool.shape[0]
    group = heads // kv_heads
    scores = np.empty((group, slots.shape[1]), np.float32)
    largest = np.empty(group, np.float32)
    sums = np.empty(group, np.float32)
    acc = np.empty((group, head_dim), np.float32)
    for r in range(sequences):
        total = totals[r]
        first = max(0, total - window) if window > 0 else 0
        for g in range(kv_heads):
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
