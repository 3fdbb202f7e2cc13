"""The compiled products for small float32 weights (backends/panel_kernels.py) against x · wᵀ in float64."""

import numpy as np
import pytest

from minitorch_infer.backends import float_kernels, panel_kernels
from tests.test_float_kernels import ROWS, _check, _weight


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("out_features, in_features, order", [(16, 8, "C"), (48, 24, "F"), (128, 384, "C"),
                                                              (256, 7, "F")])
@pytest.mark.parametrize("threaded", [False, True])
def test_matmul_panels_equals_x_times_w_transposed(rows, out_features, in_features, order, threaded):
    """Blocks of 16, 8 and 4 rows of x, and rows left over in the last block that must not be stored."""
    rng = np.random.default_rng(rows * out_features + threaded)
    w = _weight(rng, (out_features, in_features), order, writeable=rows % 2 == 0, offset=rows % 16)
    assert panel_kernels.fits(w)
    kernel = panel_kernels.matmul_panels_threaded if threaded else panel_kernels.matmul_panels
    w_panels = panel_kernels.panels(w)
    _check(lambda x, y, accumulate: kernel(w_panels, x, y, accumulate), w, rng, rows)


def test_panels_hold_sixteen_columns_of_w_transposed_each():
    w = np.arange(32 * 5, dtype=np.float32).reshape(32, 5)
    w_panels = panel_kernels.panels(np.asfortranarray(w))
    assert w_panels.shape == (2, 5, 16) and w_panels.flags.c_contiguous
    np.testing.assert_array_equal(w_panels[1, 3], w[16:32, 3])


def test_fits_and_which_kernel_a_product_takes():
    assert panel_kernels.fits(np.zeros((16, 3), np.float32))
    assert panel_kernels.fits(np.zeros((32, 8), np.float32, order="F"))
    assert not panel_kernels.fits(np.zeros((24, 8), np.float32))               # N not a multiple of 16
    assert not panel_kernels.fits(np.zeros((32, 16), np.float32)[:, ::2])      # neither layout
    assert not panel_kernels.fits(np.zeros((16, 8), np.float64))
    logits = panel_kernels.panels(np.zeros((2048, 128), np.float32))          # the story model's
    gate_up = panel_kernels.panels(np.zeros((768, 128), np.float32))
    o = panel_kernels.panels(np.zeros((128, 128), np.float32))
    x = np.zeros((16, 128), np.float32)
    assert panel_kernels.product(x, logits) is panel_kernels.matmul_panels_threaded
    assert panel_kernels.product(x, o) is panel_kernels.matmul_panels_threaded      # 16 rows: 262,144 FMAs
    assert panel_kernels.product(x[:8], o) is panel_kernels.matmul_panels
    assert panel_kernels.product(x[:2], gate_up) is panel_kernels.matmul_panels


@pytest.mark.skipif(not float_kernels.AVAILABLE, reason="the NumPy backend uses the compiled products only with AVX-512")
def test_the_bench_s_products_bound_runs_the_products_a_batched_step_runs(monkeypatch, story_model):
    from minitorch_infer.cli.benchmark import products_bound

    used = []
    for name in ("matmul_panels", "matmul_panels_threaded"):
        def counted(*args, kernel=getattr(panel_kernels, name)):
            used.append(kernel)
            kernel(*args)
        monkeypatch.setattr(panel_kernels, name, counted)
    products_bound(story_model, rows=16, steps=1)
    assert len(used) == sum(node.op in ("matmul", "matmul_add") for node in story_model.graph.nodes)


def test_x_may_be_a_strided_view():
    """Rows of x taken from a wider array (as a plugin's graph may hand them over) are copied, not misread."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 12)).astype(np.float32)
    x = rng.standard_normal((6, 24)).astype(np.float32)[:, ::2]
    y = np.empty((6, 32), np.float32)
    panel_kernels.matmul_panels(panel_kernels.panels(w), x, y, False)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)
