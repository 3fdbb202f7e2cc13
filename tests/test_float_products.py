"""Every way the NumPy backend multiplies by a float32 weight, equals x · wᵀ computed plainly: from panels (with
AVX-512), or by BLAS as chosen by the rows of x and the weight's layout and size (one gemv; a gemv per row; W by
the transposed rows; plain gemm)."""

import numpy as np
import pytest

from minitorch_infer.backends import numpy as numpy_backend
from minitorch_infer.backends.layout import StepLayout
from minitorch_infer.ir import Sym, TensorType, trace
from minitorch_infer.ir import functional as F
from minitorch_infer.passes.memory_plan import plan_memory

MAX_ROWS = 40


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("out_features, in_features", [(48, 32), (2048, 288)], ids=["cached", "streamed"])
@pytest.mark.parametrize("panels", [False, True], ids=["blas", "panels where AVX-512 is"])
def test_every_float_product_path_equals_x_times_w_transposed(monkeypatch, layout, out_features, in_features, panels):
    if not panels:
        monkeypatch.setattr(numpy_backend, "_has_avx512", lambda: False)
    assert (out_features * in_features * 4 > numpy_backend.STREAMED_WEIGHT_BYTES) == (out_features == 2048)
    rng = np.random.default_rng(out_features)
    weight = rng.standard_normal((out_features, in_features)).astype(np.float32)
    if layout == "column-major":
        weight = np.asfortranarray(weight)

    def product(x):
        return F.matmul(x, F.param("w", (out_features, in_features)))

    graph = trace(product, {"x": TensorType((Sym("S", MAX_ROWS), in_features))}, name="product")
    program = numpy_backend.compile(graph, plan_memory(graph), {"w": weight})
    gemv_rows = numpy_backend.GEMV_ROWS_COLUMN_MAJOR
    for rows in (1, 2, 3, gemv_rows, gemv_rows + 1, 32, MAX_ROWS):
        x = rng.standard_normal((rows, in_features)).astype(np.float32)
        (found,) = program.run({"x": x}, {}, StepLayout.single(rows, rows))
        np.testing.assert_allclose(found, x.astype(np.float64) @ weight.T.astype(np.float64), rtol=1e-4,
                                   atol=1e-4, err_msg=f"{rows} rows")


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("panels", [False, True], ids=["blas", "panels where AVX-512 is"])
def test_every_product_and_add_path_equals_x_times_w_transposed_plus_r(monkeypatch, layout, panels):
    """matmul_add (fuse_residual's): y = r + x · wᵀ, the product added in place or by BLAS on transposed copies."""
    from minitorch_infer.passes import PassManager
    from minitorch_infer.passes.manager import PASSES

    if not panels:
        monkeypatch.setattr(numpy_backend, "_has_avx512", lambda: False)
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((48, 32)).astype(np.float32)
    if layout == "column-major":
        weight = np.asfortranarray(weight)

    def product_and_residual(x, r):
        return r + F.matmul(x, F.param("w", (48, 32)))

    rows_sym = Sym("S", MAX_ROWS)
    graph = trace(product_and_residual, {"x": TensorType((rows_sym, 32)), "r": TensorType((rows_sym, 48))},
                  name="product_and_residual")
    graph, _ = PassManager([PASSES["fuse_residual"]]).run(graph, None)
    assert graph.op_counts() == {"matmul_add": 1}
    program = numpy_backend.compile(graph, plan_memory(graph), {"w": weight})
    for rows in (1, 2, 3, 32, MAX_ROWS):
        x = rng.standard_normal((rows, 32)).astype(np.float32)
        r = rng.standard_normal((rows, 48)).astype(np.float32)
        (found,) = program.run({"x": x, "r": r}, {}, StepLayout.single(rows, rows))
        np.testing.assert_allclose(found, r + x.astype(np.float64) @ weight.T.astype(np.float64), rtol=1e-4,
                                   atol=1e-4, err_msg=f"{rows} rows")
