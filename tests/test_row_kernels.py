"""The compiled row-wise kernels (backends/row_kernels.py) against the same ops written plainly in float64."""

import numpy as np
import pytest

from minitorch_infer.backends import row_kernels


@pytest.mark.parametrize("rows, width", [(1, 576), (5, 128), (16, 45)])
def test_rms_norm_equals_the_formula_and_may_write_over_its_input(rows, width):
    rng = np.random.default_rng(rows * width)
    x = (rng.standard_normal((rows, width)) * rng.choice([1e-3, 1.0, 1e3], size=(rows, 1))).astype(np.float32)
    weight = rng.standard_normal(width).astype(np.float32)
    wide = x.astype(np.float64)
    expected = wide / np.sqrt(np.mean(wide * wide, axis=-1, keepdims=True) + 1e-5) * weight
    y = np.full_like(x, np.nan)
    row_kernels.rms_norm(x, weight, np.float32(1e-5), y)
    np.testing.assert_allclose(y, expected, rtol=2e-6, atol=1e-6)
    row_kernels.rms_norm(x, weight, np.float32(1e-5), x)
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("rows, width", [(1, 1536), (16, 384), (3, 7)])
def test_swiglu_equals_silu_of_the_gate_times_up_over_the_whole_range(rows, width):
    """Gates from -100 to 100 (where exp(-|g|) is far below float32's smallest normal number) and exact 0."""
    rng = np.random.default_rng(rows + width)
    gate_up = rng.uniform(-100, 100, size=(rows, 2 * width)).astype(np.float32)
    gate_up[:, : width // 3] = rng.standard_normal((rows, width // 3))
    gate_up[0, 0] = 0.0
    gate, up = gate_up[:, :width].astype(np.float64), gate_up[:, width:].astype(np.float64)
    expected = gate / (1 + np.exp(-gate)) * up
    y = np.full((rows, width), np.nan, np.float32)
    row_kernels.swiglu(gate_up, y)
    np.testing.assert_allclose(y, expected, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_write_rows_stores_each_row_in_its_slot_of_every_head(contiguous):
    rng = np.random.default_rng(7)
    rows, kv_heads, head_dim = 6, 3, 8
    wide = rng.standard_normal((rows, kv_heads, 2 * head_dim)).astype(np.float32)
    x = np.ascontiguousarray(wide[:, :, :head_dim]) if contiguous else wide[:, :, ::2]
    pool = rng.standard_normal((kv_heads, 50, head_dim)).astype(np.float32)
    slots = rng.permutation(50)[:rows].astype(np.intp)
    expected = pool.copy()
    expected[:, slots] = x.transpose(1, 0, 2)
    row_kernels.write_rows(x, pool, slots)
    np.testing.assert_array_equal(pool, expected)


def test_the_compiled_exp_is_numpys_to_float32_rounding():
    """The row kernels' exp (a polynomial LLVM vectorises; swiglu's sigmoid) over its whole range, x <= 0."""
    _exp = row_kernels._exp
    x = np.concatenate([-np.linspace(0, 87, 20001), -np.geomspace(1e-8, 1, 50)]).astype(np.float32)
    got = np.array([_exp(v) for v in x])
    expected = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=5e-7, atol=0)
    assert 0 <= _exp(np.float32(-200)) < 1e-37


@pytest.mark.parametrize("head_dim", [8, 16, 64])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_rope_rotates_each_adjacent_pair_as_the_complex_product_does(strided, head_dim):
    """Against NumPy's complex product (the backend's other path), on rows of q taken from a q|k|v row as the
    graph hands them over, and in place: heads of 8 values a pair at a time, of 16 and 64 in 16 lanes."""
    rng = np.random.default_rng(11)
    rows, heads = 5, 3
    qkv = rng.standard_normal((rows, 2 * heads * head_dim)).astype(np.float32)
    x = qkv[:, :heads * head_dim].reshape(rows, heads, head_dim) if strided else \
        np.ascontiguousarray(qkv[:, :heads * head_dim]).reshape(rows, heads, head_dim)
    angles = rng.uniform(-10, 10, size=(rows, head_dim // 2))
    table = np.stack([np.cos(angles), np.sin(angles)], axis=-1).reshape(rows, head_dim).astype(np.float32)
    wide = x.astype(np.float64).reshape(rows, heads, head_dim // 2, 2)
    pairs = wide[..., 0] + 1j * wide[..., 1]
    rotated = pairs * np.exp(1j * angles)[:, None, :]
    expected = np.stack([rotated.real, rotated.imag], axis=-1).reshape(rows, heads, head_dim)
    y = np.full((rows, heads, head_dim), np.nan, np.float32)
    row_kernels.rope(x, table, y)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    row_kernels.rope(x, table, x)
    np.testing.assert_array_equal(x, y)


def test_rope_takes_pairs_one_at_a_time_where_the_values_are_not_contiguous():
    """Heads of 16 values, but every other value of a wider row: the 16-lane path would read the wrong values."""
    rng = np.random.default_rng(12)
    wide = rng.standard_normal((4, 2, 32)).astype(np.float32)
    x, table = wide[:, :, ::2], rng.standard_normal((4, 16)).astype(np.float32)
    y, expected = np.empty((4, 2, 16), np.float32), np.empty((4, 2, 16), np.float32)
    row_kernels.rope(x, table, y)
    row_kernels.rope(np.ascontiguousarray(x), table, expected)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
