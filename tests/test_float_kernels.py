"""The compiled float32 products (backends/float_kernels.py) against x · wᵀ in float64, and the NumPy backend's
use of them in a batched step."""

import numpy as np
import pytest

from minitorch_infer.backends import float_kernels
from minitorch_infer.backends import numpy as numpy_backend

ROWS = [1, 2, 3, 4, 5, 8, 9, 16, 17, 33]


def _weight(rng, shape, order, writeable=True, offset=0):
    """A float32 weight whose first value sits `offset` floats past a 64-byte line (model weights land anywhere)."""
    size = shape[0] * shape[1]
    buffer = np.empty(size + 32, np.float32)
    start = (-buffer.ctypes.data % 64) // 4 + offset
    weight = buffer[start:start + size].reshape(shape, order=order)
    weight[...] = rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 1e3], size=(shape[0], 1))
    weight.flags.writeable = writeable
    return weight


def _check(kernel, w, rng, rows):
    x = rng.standard_normal((rows, w.shape[1])).astype(np.float32)
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    scale = np.abs(x.astype(np.float64)) @ np.abs(w.T.astype(np.float64))   # bounds each sum's rounding
    for accumulate in (False, True):
        y = rng.standard_normal((rows, w.shape[0])).astype(np.float32)
        before = y.astype(np.float64)
        kernel(x, y, accumulate)
        wanted = expected + before if accumulate else expected
        assert np.all(np.abs(y - wanted) <= 1e-5 * (scale + np.abs(before))), (rows, accumulate)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("out_features, in_features", [(4, 16), (7, 48), (130, 576), (49, 1536)])
def test_matmul_rows_equals_x_times_w_transposed(rows, out_features, in_features):
    """Row-major weights, with N not a multiple of 4 (a short last tile that must not add twice)."""
    rng = np.random.default_rng(rows * out_features)
    w = _weight(rng, (out_features, in_features), "C", writeable=rows % 2 == 0, offset=rows % 16)
    assert float_kernels.fits(w)
    _check(lambda x, y, accumulate: float_kernels.matmul_rows(w, x, y, accumulate), w, rng, rows)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("out_features, in_features", [(16, 8), (48, 24), (80, 128), (960, 576)])
def test_matmul_columns_equals_x_times_w_transposed(rows, out_features, in_features):
    """Column-major weights, read as wᵀ: stripes of uneven width, and more rows of x than one block holds."""
    rng = np.random.default_rng(rows * out_features + 1)
    w = _weight(rng, (out_features, in_features), "F", writeable=rows % 2 == 1, offset=rows % 16)
    assert float_kernels.fits(w)
    _check(lambda x, y, accumulate: float_kernels.matmul_columns(w.T, x, y, accumulate), w, rng, rows)


def test_fits_names_the_shapes_the_kernels_take():
    assert float_kernels.fits(np.zeros((4, 32), np.float32))
    assert not float_kernels.fits(np.zeros((4, 24), np.float32))              # K not a multiple of 16
    assert not float_kernels.fits(np.zeros((3, 32), np.float32))              # fewer than one tile of rows
    assert float_kernels.fits(np.zeros((32, 24), np.float32, order="F"))
    assert not float_kernels.fits(np.zeros((24, 24), np.float32, order="F"))  # N not a multiple of 16
    assert not float_kernels.fits(np.zeros((32, 12), np.float32, order="F"))  # K not a multiple of 8
    assert not float_kernels.fits(np.zeros((32, 64), np.float32)[:, ::2])     # neither layout
    assert not float_kernels.fits(np.zeros((4, 32), np.float64))              # not float32
    assert not float_kernels.fits(np.zeros((2, 4, 32), np.float32))           # not a matrix


@pytest.mark.skipif(not float_kernels.AVAILABLE, reason="the NumPy backend uses the compiled products only with AVX-512")
def test_a_batched_step_runs_every_float_product_compiled_and_equals_blas(monkeypatch):
    """A step of several sequences multiplies by every float32 weight in compiled kernels: the story model's
    (1 MiB and less) in panel_kernels, and with the bar for float_kernels lowered to nothing, there. Both equal
    the same step by BLAS, which runs when a weight fits neither."""
    import minitorch_infer
    from minitorch_infer.backends import panel_kernels
    from tests.conftest import require_model

    used = []
    for module, names in ((float_kernels, ("matmul_rows", "matmul_columns")),
                          (panel_kernels, ("matmul_panels", "matmul_panels_threaded"))):
        for name in names:
            def counted(*args, kernel=getattr(module, name), name=name):
                used.append(name)
                kernel(*args)
            monkeypatch.setattr(module, name, counted)
    model = minitorch_infer.load(require_model("story"))
    weights = [model.weights[node.inputs[1].name] for node in model.graph.nodes
               if node.op in ("matmul", "matmul_add") and node.inputs[1].kind == "param"]
    columns = sum(not w.flags.c_contiguous for w in weights)
    assert 0 < columns < len(weights)

    def logits_of_a_batched_step():
        model.program._compiled_kernels_take_all = model.program._panels = None     # decide again
        model.program._bound.clear()
        used.clear()
        sequences = [model.kv_cache.open() for _ in range(3)]
        try:
            for s in sequences:
                s.reserve(2)
            return model.step(sequences, [[5, 6], [7, 8], [9, 10]]).copy()
        finally:
            for s in sequences:
                s.close()

    by_panels = logits_of_a_batched_step()
    assert len(used) == len(weights) and set(used) <= {"matmul_panels", "matmul_panels_threaded"}
    monkeypatch.setattr(numpy_backend, "FLOAT_KERNEL_MIN_BYTES", 0)
    by_float_kernels = logits_of_a_batched_step()
    assert used.count("matmul_columns") == columns and used.count("matmul_rows") == len(weights) - columns
    monkeypatch.setattr(numpy_backend, "_compiled_kernels_take", lambda w: False)
    by_blas = logits_of_a_batched_step()
    assert used == []
    np.testing.assert_allclose(by_panels, by_blas, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(by_float_kernels, by_blas, rtol=1e-4, atol=1e-4)


def test_the_thread_limit_applies_to_the_float_kernels():
    """--threads reaches the float kernels as it reaches the quantised ones: in whichever thread calls them."""
    from tests.conftest import numba_threads_under_a_limit_of_one

    w = np.ones((8, 64), np.float32)
    x, y = np.ones((3, 64), np.float32), np.empty((3, 8), np.float32)
    assert numba_threads_under_a_limit_of_one(numpy_backend.compiled_float_product(x, w, y)) == [1]
    np.testing.assert_array_equal(y, np.full((3, 8), 64, np.float32))


@pytest.mark.skipif(not float_kernels.AVAILABLE, reason="the NumPy backend uses the compiled products only with AVX-512")
def test_an_engine_warms_up_the_float_kernels_only_for_a_program_that_runs_them(monkeypatch):
    """Their first compile takes ~20 s: a model whose weights all go to panel_kernels (the story model's) never
    pays it, and warms up those instead."""
    import minitorch_infer
    from minitorch_infer.backends import panel_kernels
    from tests.conftest import require_model

    warmed = []
    monkeypatch.setattr(float_kernels, "warm_up", lambda: warmed.append("float_kernels"))
    monkeypatch.setattr(panel_kernels, "warm_up", lambda: warmed.append("panel_kernels"))
    model = minitorch_infer.load(require_model("story"))
    model.engine()
    assert warmed == ["panel_kernels"]
    monkeypatch.setattr(numpy_backend, "FLOAT_KERNEL_MIN_BYTES", 0)
    model = minitorch_infer.load(require_model("story"))
    model.engine()
    assert warmed == ["panel_kernels", "float_kernels"]
