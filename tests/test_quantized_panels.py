"""Quantised weights in panels (quantized.QuantizedPanels, backends/quantized_panel_kernels): the layout holds the
same blocks, the kernels equal dequantise-then-x·wᵀ at every number of rows, the store holds a weight in one
layout only, and a model held in panels computes what the row-major kernels compute."""

import numpy as np
import pytest

import minitorch_infer
from minitorch_infer.backends import numpy as numpy_backend, quantized
from minitorch_infer.formats.weights import WeightStore
from minitorch_infer.quantized import QuantizedPanels, QuantizedTensor, quantize
from tests.conftest import kinds_of_steps, require_model
from tests.test_quantized import KINDS, assert_matches_float_product, awkward_values

needs_avx512 = pytest.mark.skipif(not numpy_backend._has_avx512(), reason="weights go in panels only with AVX-512")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows, cols", [(16, 32), (48, 96), (112, 576), (32, 1536)])
def test_the_panels_hold_the_same_blocks(kind, rows, cols):
    w = quantize(awkward_values(rows, cols, seed=rows + cols), kind)
    panels = QuantizedPanels.of(w)
    assert panels.shape == w.shape and panels.nbytes == w.nbytes
    assert panels.blocks().same_as(w)
    np.testing.assert_array_equal(np.asarray(panels), w.dequantize())
    # The last 16 rows of the weight: its last panel (a view), as a packed weight's part is.
    part = panels.take_rows(slice(rows - 16, rows))
    assert np.shares_memory(part.codes, panels.codes)
    np.testing.assert_array_equal(part.dequantize(), w.dequantize()[rows - 16:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows, cols", [(16, 32), (48, 96), (112, 576), (32, 1536)])
@pytest.mark.parametrize("x_rows", [1, 2, 3, 4, 5, 8, 13, 16, 17, 33, 130])
def test_products_from_panels_match_dequantise_then_dot(kind, rows, cols, x_rows):
    """Every block of rows of x (16, 8, 4, 2 and 1, with 1, 2 or 4 sums per row) against the product in float64."""
    w = quantize(awkward_values(rows, cols, seed=rows * cols + x_rows), kind)
    panels = QuantizedPanels.of(w)
    x = np.random.default_rng(x_rows).standard_normal((x_rows, cols)).astype(np.float32)
    y = np.full((x_rows, rows), np.nan, np.float32)
    quantized.matmul(x, panels, y)()
    assert_matches_float_product(y, x, w.dequantize())
    addend = y.copy()
    quantized.matmul(x, panels, y, accumulate=True)()
    assert_matches_float_product(y, x, w.dequantize(), addend)


def test_x_may_be_a_strided_view():
    w = quantize(awkward_values(32, 64, seed=2), "q4_1")
    x = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)[:, ::2]
    y = np.empty((6, 32), np.float32)
    quantized.matmul(x, QuantizedPanels.of(w), y)()
    assert_matches_float_product(y, x, w.dequantize())


@pytest.mark.parametrize("kind", KINDS)
def test_a_table_in_panels_gives_back_its_rows(kind):
    w = quantize(awkward_values(48, 96, seed=5), kind)
    ids = np.array([47, 0, 17, 17, 31], np.int64)
    out = np.empty((5, 96), np.float32)
    quantized.embedding(ids, QuantizedPanels.of(w), out)()
    np.testing.assert_array_equal(out, w.dequantize()[ids])


def test_the_store_holds_a_packed_weight_and_its_parts_in_panels_once():
    """A packed weight's parts were views of its rows: whole panels of them become views of its panels, a part
    that is not (rows 40 .. 47) a copy of its own, and nothing keeps the row-major blocks alive."""
    store = WeightStore()
    for name, rows in (("a", 32), ("b", 8), ("c", 24)):
        store.add(name, quantize(awkward_values(rows, 64, seed=rows), "q8_0"))
    expected = {name: store[name].dequantize() for name in "abc"}
    packed = store.pack("a+b+c", ["a", "b", "c"])
    before = store.nbytes
    panelled = store.panelise("a+b+c")
    assert isinstance(panelled, QuantizedPanels) and store["a+b+c"] is panelled
    assert isinstance(store["a"], QuantizedPanels) and np.shares_memory(store["a"].codes, panelled.codes)
    assert all(isinstance(store[name], QuantizedTensor) and not np.shares_memory(store[name].codes, packed.codes)
               for name in "bc")
    for name in "abc":
        np.testing.assert_array_equal(store[name].dequantize(), expected[name])
    assert store.nbytes == before + store["b"].nbytes + store["c"].nbytes      # the two copies, nothing else


@needs_avx512
@pytest.mark.parametrize("kind", ["q8_0", "q4_1"])
def test_a_model_in_panels_computes_what_the_row_major_kernels_compute(kind, monkeypatch):
    """The story model's quantised weights held in panels (and its tied table looked up from them): a prompt,
    a decode step and a batched step of three sequences give the row-major kernels' logits."""
    model = minitorch_infer.load(require_model("story"), weights=kind)
    assert all(isinstance(model.weights[name], QuantizedPanels) for name in model.graph.params
               if model.graph.params[name].type.is_quantized)
    with monkeypatch.context() as without_avx512:
        without_avx512.setattr(numpy_backend, "_has_avx512", lambda: False)
        row_major = minitorch_infer.load(require_model("story"), weights=kind)
        assert not any(isinstance(row_major.weights[name], QuantizedPanels) for name in row_major.weights)
        expected = kinds_of_steps(row_major)
    for found, wanted in zip(kinds_of_steps(model), expected, strict=True):
        np.testing.assert_allclose(found, wanted, rtol=1e-4, atol=1e-4)

