"""Weights in panels (minitorch_infer.panelled, WeightStore.panelise), the compiled products that read them
(backends/panel_kernels.py) against x · wᵀ in float64, and the NumPy backend's use of them."""

import math

import numpy as np
import pytest

from minitorch_infer.backends import numpy as numpy_backend
from minitorch_infer.backends import panel_kernels
from minitorch_infer.errors import MinitorchError
from minitorch_infer.formats.weights import WeightStore
from minitorch_infer.panelled import PanelledWeight
from tests.conftest import kinds_of_steps

ROWS = [1, 2, 3, 4, 5, 8, 9, 16, 17, 33]
needs_avx512 = pytest.mark.skipif(not numpy_backend._has_avx512(),
                                  reason="the NumPy backend multiplies by panels only with AVX-512")


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
@pytest.mark.parametrize("out_features, in_features, order", [(16, 8, "C"), (48, 24, "F"), (128, 384, "C"),
                                                              (256, 7, "F"), (32, 1536, "C")])
@pytest.mark.parametrize("threaded", [False, True])
def test_matmul_panels_equals_x_times_w_transposed(rows, out_features, in_features, order, threaded):
    """Blocks of 16, 8, 4, 2 and 1 rows of x, none past the last; K shorter and longer than the prefetch reach."""
    rng = np.random.default_rng(rows * out_features + threaded)
    w = _weight(rng, (out_features, in_features), order, writeable=rows % 2 == 0, offset=rows % 16)
    kernel = panel_kernels.matmul_panels_threaded if threaded else panel_kernels.matmul_panels
    w_panels = PanelledWeight.of(w).panels
    _check(lambda x, y, accumulate: kernel(w_panels, x, y, accumulate), w, rng, rows)


def test_panels_hold_sixteen_rows_of_w_each_transposed():
    w = np.arange(32 * 5, dtype=np.float32).reshape(32, 5)
    for layout in (w, np.asfortranarray(w)):
        w_panels = PanelledWeight.of(layout).panels
        assert w_panels.shape == (2, 5, 16) and w_panels.flags.c_contiguous
        np.testing.assert_array_equal(w_panels[1, 3], w[16:32, 3])


def test_a_weight_in_panels_gives_back_its_rows():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 20)).astype(np.float32)
    panelled = PanelledWeight.of(w)
    assert panelled.shape == (48, 20) and panelled.dtype == np.float32 and panelled.nbytes == w.nbytes
    np.testing.assert_array_equal(panelled.dense(), w)
    np.testing.assert_array_equal(np.asarray(panelled), w)
    np.testing.assert_array_equal(panelled.take_rows(slice(16, 48)).dense(), w[16:48])
    ids = np.array([0, 17, 47, 3, 17])
    np.testing.assert_array_equal(panelled.lookup(ids), w[ids])
    with pytest.raises(MinitorchError, match="rows 8..48"):
        panelled.take_rows(slice(8, 48))
    with pytest.raises(MinitorchError, match=r"float32\[24, 8\].*multiple of 16 rows"):
        PanelledWeight.of(np.zeros((24, 8), np.float32))
    with pytest.raises(MinitorchError, match=r"float64\[16, 8\]"):
        PanelledWeight.of(np.zeros((16, 8)))


def test_the_store_panelises_a_packed_weight_and_its_parts_once():
    """A packed weight's parts become the same rows of its panels (no second copy); a part that is not whole
    panels becomes a copy of its own."""
    rng = np.random.default_rng(2)
    parts = {"q": rng.standard_normal((32, 8)), "k": rng.standard_normal((16, 8)), "v": rng.standard_normal((8, 8)),
             "bias": rng.standard_normal((8, 8))}
    store = WeightStore()
    for name, array in parts.items():
        store.add(name, array.astype(np.float32))
    store.pack("q+k+v+bias", ["q", "k", "v", "bias"])          # 64 rows: v and bias are half a panel each
    before = store.nbytes
    packed = store.panelise("q+k+v+bias")
    assert store["q+k+v+bias"] is packed and store.panelise("q+k+v+bias") is packed
    for name in ("q", "k"):
        assert isinstance(store[name], PanelledWeight) and np.shares_memory(store[name].panels, packed.panels)
    for name in ("v", "bias"):
        assert isinstance(store[name], np.ndarray) and not np.shares_memory(store[name], packed.panels)
    for name, array in parts.items():
        np.testing.assert_array_equal(np.asarray(store[name]), array.astype(np.float32))
    assert store.nbytes == before + 2 * parts["v"].size * 4        # only the misaligned parts are held twice


def test_the_store_rewrites_a_weight_only_it_holds_in_place_and_copies_one_held_elsewhere():
    """A dequantised weight (a whole view of a flat array) that only the store holds becomes its panels in the
    same memory: SmolLM2's 113 MB table is not held twice, even for a moment. One that anyone else can still
    read as a matrix is copied, and left as it was."""
    rng = np.random.default_rng(3)
    store = WeightStore()
    store.add("alone", rng.standard_normal(64 * 24).astype(np.float32).reshape(64, 24))
    expected, address = np.array(store["alone"]), store["alone"].ctypes.data
    shared = rng.standard_normal((32, 24)).astype(np.float32)
    store.add("shared", shared)
    before = shared.copy()
    alone = store.panelise("alone")
    assert alone.panels.ctypes.data == address
    np.testing.assert_array_equal(alone.dense(), expected)
    held = store.panelise("shared")
    assert not np.shares_memory(held.panels, shared)
    np.testing.assert_array_equal(shared, before)
    np.testing.assert_array_equal(held.dense(), before)
    with pytest.raises(MinitorchError, match="writeable row-major"):
        PanelledWeight.rewritten(np.asfortranarray(before))


def test_the_reference_backend_reads_a_weight_in_panels_as_its_matrix():
    from minitorch_infer.backends import reference
    from minitorch_infer.ir import Sym, TensorType, trace
    from minitorch_infer.ir import functional as F

    graph = trace(lambda x: F.matmul(x, F.param("w", (32, 8))), {"x": TensorType((Sym("S", 4), 8))}, name="product")
    rng = np.random.default_rng(4)
    w, x = rng.standard_normal((32, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    (plain,) = reference.run(graph, {"w": w}, {"x": x}, {}, {"S": 3})
    (panelled,) = reference.run(graph, {"w": PanelledWeight.of(w)}, {"x": x}, {}, {"S": 3})
    np.testing.assert_array_equal(panelled, plain)


def test_which_kernel_a_product_takes():
    logits = PanelledWeight.of(np.zeros((2048, 128), np.float32)).panels          # the story model's
    gate_up = PanelledWeight.of(np.zeros((768, 128), np.float32)).panels
    o = PanelledWeight.of(np.zeros((128, 128), np.float32)).panels
    x = np.zeros((16, 128), np.float32)
    assert panel_kernels.product(x, logits) is panel_kernels.matmul_panels_threaded
    assert panel_kernels.product(x, o) is panel_kernels.matmul_panels_threaded      # 16 rows: 262,144 FMAs
    assert panel_kernels.product(x[:8], o) is panel_kernels.matmul_panels
    assert panel_kernels.product(x[:2], gate_up) is panel_kernels.matmul_panels


def test_x_may_be_a_strided_view():
    """Rows of x taken from a wider array (as a plugin's graph may hand them over) are copied, not misread."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 12)).astype(np.float32)
    x = rng.standard_normal((6, 24)).astype(np.float32)[:, ::2]
    y = np.empty((6, 32), np.float32)
    panel_kernels.matmul_panels(PanelledWeight.of(w).panels, x, y, False)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)


@needs_avx512
def test_the_thread_limit_applies_to_a_step_of_panel_products(story_model):
    """--threads reaches the panel kernels as it reaches the quantised ones: a program that runs a step's
    products in Numba applies it in whichever thread runs the step."""
    from tests.conftest import numba_threads_under_a_limit_of_one

    sequences = [story_model.kv_cache.open() for _ in range(2)]
    try:
        for sequence in sequences:
            sequence.reserve(1)
        assert numba_threads_under_a_limit_of_one(lambda: story_model.step(sequences, [[5], [9]])) == [1]
    finally:
        for sequence in sequences:
            sequence.close()


def _counting_panel_kernels(monkeypatch) -> list:
    used = []
    for name in ("matmul_panels", "matmul_panels_threaded"):
        def counted(*args, kernel=getattr(panel_kernels, name)):
            used.append(kernel)
            kernel(*args)
        monkeypatch.setattr(panel_kernels, name, counted)
    return used


def _products_per_step(model) -> int:
    return sum(node.op in ("matmul", "matmul_add") for node in model.graph.nodes)


@pytest.fixture
def plain_story_steps(monkeypatch):
    """The steps by BLAS on the story model's weights as arrays (as on a machine without AVX-512)."""
    import minitorch_infer
    from tests.conftest import require_model

    with monkeypatch.context() as without_avx512:
        without_avx512.setattr(numpy_backend, "_has_avx512", lambda: False)
        used = _counting_panel_kernels(without_avx512)
        plain = minitorch_infer.load(require_model("story"))
        steps = kinds_of_steps(plain)
        assert used == [] and all(isinstance(plain.weights[name], np.ndarray) for name in plain.graph.params)
    return steps


@needs_avx512
def test_a_large_model_holds_its_float_weights_once_in_panels(monkeypatch, plain_story_steps):
    """Float32 weights of PANELS_MIN_BYTES or more (the bar lowered here for the story model) are held in panels
    by the store, the tied embedding table too, and the program multiplies by those very objects in panel
    kernels at every step: a prompt, one decode token, a batched step, each equal to BLAS's to 1e-4."""
    import minitorch_infer
    from tests.conftest import require_model

    monkeypatch.setattr(numpy_backend, "PANELS_MIN_BYTES", 0)
    used = _counting_panel_kernels(monkeypatch)
    model = minitorch_infer.load(require_model("story"))
    names = {node.inputs[1].name for node in model.graph.nodes if node.op in ("matmul", "matmul_add")}
    assert "embed" in names
    for name in names:
        assert isinstance(model.weights[name], PanelledWeight) and model.program.params[name] is model.weights[name]
    used.clear()
    for ours, theirs in zip(kinds_of_steps(model), plain_story_steps):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert len(used) == 3 * _products_per_step(model)


@needs_avx512
def test_a_small_model_keeps_arrays_and_multiplies_copies_in_panels_once_it_batches(monkeypatch, plain_story_steps):
    """The story model's 2.6 MB stay arrays: its single-sequence steps run BLAS (no Numba to start) until its
    first batched step, which multiplies by panels copied once; from then on every step does. Each step
    equals BLAS's to 1e-4."""
    import minitorch_infer
    from tests.conftest import require_model

    used = _counting_panel_kernels(monkeypatch)
    model = minitorch_infer.load(require_model("story"))
    assert all(isinstance(model.weights[name], np.ndarray) for name in model.graph.params)
    used.clear()
    for ours, theirs in zip(kinds_of_steps(model), plain_story_steps):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert len(used) == _products_per_step(model)           # the batched step's only
    copies = model.program.batch_panels()
    assert len(copies) == len({node.inputs[1].name for node in model.graph.nodes
                               if node.op in ("matmul", "matmul_add")})
    assert model.program.batch_panels() is copies
    used.clear()
    for ours, theirs in zip(kinds_of_steps(model), plain_story_steps):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert len(used) == 3 * _products_per_step(model)       # the prompt and decode too, now


def test_smollm2_s_float_weights_are_held_in_panels_and_the_story_model_s_are_not():
    from tests.graph_builders import smollm2_sized_graph, story_graph

    def product_bytes(graph) -> int:
        names = {node.inputs[1].name for node in graph.nodes if node.op in ("matmul", "matmul_add")}
        return sum(math.prod(graph.params[name].type.shape) * 4 for name in names)
    assert product_bytes(smollm2_sized_graph(prefill_chunk=16, context=64)) >= numpy_backend.PANELS_MIN_BYTES
    assert product_bytes(story_graph()) < numpy_backend.PANELS_MIN_BYTES


@needs_avx512
def test_the_bench_s_products_bound_runs_the_products_a_step_runs(monkeypatch, story_model):
    from minitorch_infer.cli.benchmark import products_bound

    used = _counting_panel_kernels(monkeypatch)
    products_bound(story_model, rows=16, steps=1)
    assert len(used) == sum(node.op in ("matmul", "matmul_add") for node in story_model.graph.nodes)
