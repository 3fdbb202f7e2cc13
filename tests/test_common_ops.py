"""The ops a second architecture needs (GPT-2's LayerNorm and GELU, softmax, transpose, sub, div, exp, tanh,
scalar constants): each traced, run on both backends, and checked against plain NumPy written here."""

import math

import numpy as np
import pytest

from minitorch_infer.backends import numpy as numpy_backend
from minitorch_infer.backends import reference
from minitorch_infer.backends.layout import StepLayout
from minitorch_infer.errors import GraphError
from minitorch_infer.ir import TensorType, Sym, trace
from minitorch_infer.ir import functional as F
from minitorch_infer.passes.memory_plan import plan_memory

ROWS = Sym("S", 6)
WIDTH = 8


def run_both(fn, params: dict, rows: int = 5, seed: int = 0, scale: float = 3.0):
    """(inputs, reference outputs, fast outputs) of fn traced over x [S, WIDTH] (and y, when it takes one)."""
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    graph = trace(fn, {name: TensorType((ROWS, WIDTH)) for name in names}, name=fn.__name__)
    rng = np.random.default_rng(seed)
    inputs = {name: (rng.standard_normal((rows, WIDTH)) * scale).astype(np.float32) for name in names}
    expected = reference.run(graph, params, inputs, {}, {"S": rows})
    program = numpy_backend.compile(graph, plan_memory(graph), params)
    found = [out.copy() for out in program.run(inputs, {}, StepLayout.single(rows, rows))]
    return inputs, expected, found


def check(fn, plain, params=None, atol=1e-5, **kwargs):
    inputs, expected, found = run_both(fn, params or {}, **kwargs)
    want = plain(*[inputs[name].astype(np.float64) for name in inputs])
    for label, got in (("reference", expected[0]), ("numpy", found[0])):
        assert got.dtype == np.float32, label
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5, err_msg=label)


def test_sub_div_and_python_numbers():
    def arithmetic(x, y):
        return (x - y) / (y * y + 1.0) + 0.5 * x - 2

    check(arithmetic, lambda x, y: (x - y) / (y * y + 1) + 0.5 * x - 2)


def test_exp_and_tanh():
    def exponentials(x):
        return F.exp(x * 0.25) + F.tanh(x)

    check(exponentials, lambda x: np.exp(x / 4) + np.tanh(x))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_both_forms(approximate):
    def gelu(x):
        return F.gelu(x, approximate)

    erf = np.vectorize(math.erf)
    exact = lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2)))                          # noqa: E731
    tanh_form = lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731
    check(gelu, exact if approximate == "none" else tanh_form, atol=1e-6 * 8)


def test_softmax_over_the_last_axis_even_for_large_values():
    def softmax(x):
        return F.softmax(x * 40.0)

    def plain(x):
        e = np.exp(40 * x - (40 * x).max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    check(softmax, plain)


def test_layer_norm():
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal(WIDTH).astype(np.float32), "b": rng.standard_normal(WIDTH).astype(np.float32)}

    def norm(x):
        return F.layer_norm(x + 10.0, F.param("w", (WIDTH,)), F.param("b", (WIDTH,)), 1e-5)

    def plain(x):
        x = x + 10
        centred = x - x.mean(axis=-1, keepdims=True)
        return centred / np.sqrt((centred ** 2).mean(axis=-1, keepdims=True) + 1e-5) * params["w"] + params["b"]

    check(norm, plain, params, atol=2e-5)


def test_transpose_is_a_copy_with_axes_permuted():
    def split_heads(x):
        return F.transpose(x.reshape(ROWS, 2, 4), (1, 0, 2))

    graph = trace(split_heads, {"x": TensorType((ROWS, WIDTH))})
    assert graph.outputs[0].type.shape == (2, ROWS, 4)
    check(split_heads, lambda x: x.reshape(-1, 2, 4).transpose(1, 0, 2))


@pytest.mark.parametrize("build, message", [
    (lambda x: F.transpose(x, (0, 0)), r"perm \(0, 0\) is not a permutation of the 2 axes"),
    (lambda x: F.layer_norm(x, F.param("w", (4,)), F.param("b", (WIDTH,)), 1e-5), "weight and bias must be"),
    (lambda x: F.gelu(x, "erf"), "approximate='erf' should be one of"),
    (lambda x: x - F.param("v", (3,)), "second operand must equal the first's shape"),
])
def test_bad_uses_name_the_op_and_the_reason(build, message):
    with pytest.raises(GraphError, match=message):
        trace(build, {"x": TensorType((ROWS, WIDTH))})
