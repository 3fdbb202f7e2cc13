"""Rotary-embedding frequencies for each rope_scaling type, with transformers' semantics.

Shared by both backends: it is model arithmetic, not execution strategy.
"""

from __future__ import annotations

import math

import numpy as np


def rope_frequencies(head_dim: int, theta: float, scaling: tuple, seq_len: int) -> np.ndarray:
    """Inverse frequencies [head_dim/2] (float64) for a forward pass whose largest position is seq_len - 1."""
    options = dict(scaling)
    rope_type = options.get("rope_type", "default")
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    if rope_type == "dynamic":
        original = options["original_max_position_embeddings"]
        factor = options["factor"]
        if seq_len > original:
            # NTK-aware: stretch the base so the longest wavelength covers the longer sequence.
            theta = theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / theta ** exponents
    if rope_type == "linear":
        return inv_freq / options["factor"]
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, options)
    return inv_freq


def _llama3_frequencies(inv_freq: np.ndarray, options: dict) -> np.ndarray:
    """Llama 3.1: slow down low frequencies by `factor`, keep high ones, blend smoothly in between."""
    factor = options["factor"]
    low, high = options["low_freq_factor"], options["high_freq_factor"]
    original = options["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelength >= original / high) & (wavelength <= original / low)
    return np.where(is_medium, blended, scaled)


def is_position_dependent(scaling: tuple) -> bool:
    """Dynamic NTK recomputes frequencies from the sequence length; the others are fixed at compile time."""
    return dict(scaling).get("rope_type") == "dynamic"
