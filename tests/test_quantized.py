"""Quantised weights: the block formats against the gguf package, the compiled kernels against
dequantise-then-NumPy, the quantize_weights pass, and whole models on quantised weights against the
reference backend."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

import minitorch_infer
from minitorch_infer.backends import quantized, quantized_kernels
from minitorch_infer.backends.reference import run as reference_run
from minitorch_infer.errors import MinitorchError
from minitorch_infer.passes import DEFAULT_PASSES, check_pass, quantize_weights, random_weights
from minitorch_infer.quantized import BLOCK_TYPES, quantize

from graph_builders import story_graph, traced
from minitorch_infer.ir import functional as F
from minitorch_infer.ir.dot import to_dot
from minitorch_infer.passes import PassContext

KINDS = list(BLOCK_TYPES)


def awkward_values(rows: int, cols: int, seed: int) -> np.ndarray:
    """Blocks at scales from 1e-6 to 1e4 (each block its own), with an all-zero block, a constant block
    and a block with one large value among small ones: what real weights and rounding edges look like."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    scales = 10.0 ** rng.uniform(-6, 4, size=(rows, cols // 32, 1))
    values = (values.reshape(rows, -1, 32) * scales).reshape(rows, cols).astype(np.float32)
    values[0, :32] = 0
    if rows > 1:
        values[1, :32] = 0.25
    values[-1, -32:] = 1e-3
    values[-1, -1] = 50.0
    return values


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (33, 96)])
def test_blocks_are_ggmls_bytes_and_values(kind, shape):
    values = awkward_values(*shape, seed=shape[0])
    ggml_type = GGMLQuantizationType[kind.upper()]
    raw = quants.quantize(values, ggml_type)
    ours = quantize(values, kind)
    np.testing.assert_array_equal(ours.to_ggml(), raw.reshape(-1))
    np.testing.assert_array_equal(ours.dequantize(), quants.dequantize(raw, ggml_type).reshape(shape))
    assert ours.nbytes == shape[0] * shape[1] // 32 * {"q8_0": 36, "q4_0": 20, "q4_1": 24}[kind]


def halves_and_ties(rows: int) -> np.ndarray:
    """Blocks whose scale is exactly +-1 for one type each, so that x / d lands on halves, where roundf and
    trunc(x + 0.5) part ways with other roundings: Q8_0's (largest magnitude 127), Q4_0's twice (extreme -8
    and 8, in both orders: the first of two tied magnitudes names the scale), Q4_1's (range 0 to 15)."""
    blocks = [[127, -2.5, 2.5, -0.5, 0.5, 126.5, -126.5, 1.5],
              [-8, 8, -0.5, 0.5, 1.5, -1.5, 7.5, -7.5],
              [8, -8, -0.5, 0.5, 1.5, -1.5, 7.5, -7.5],
              [0, 15, 0.5, 1.5, 14.5, 7.5, 6.5, 3]]
    row = np.concatenate([np.tile(np.float32(block), 4) for block in blocks])
    return np.tile(row, (rows, 1))


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_round_halves_as_ggml_does(kind):
    values = halves_and_ties(3)
    raw = quants.quantize(values, GGMLQuantizationType[kind.upper()])
    np.testing.assert_array_equal(quantize(values, kind).to_ggml(), raw.reshape(-1))


@pytest.mark.parametrize("kind", KINDS)
def test_quantizing_a_quantized_weight_widens_it_a_few_rows_at_a_time(kind, monkeypatch):
    """Re-quantising (a GGUF's Q4_1 as Q8_0) gives the blocks of its dequantised values, across chunk edges."""
    monkeypatch.setattr(minitorch_infer.quantized, "QUANTIZE_ROWS", 3)
    source = quantize(awkward_values(11, 64, seed=2), "q4_1")
    expected = quants.quantize(source.dequantize(), GGMLQuantizationType[kind.upper()])
    np.testing.assert_array_equal(quantize(source, kind).to_ggml(), expected.reshape(-1))


def test_quantize_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(MinitorchError, match=r"multiple of 32 columns, not \[4, 48\]"):
        quantize(np.zeros((4, 48), np.float32), "q8_0")


def assert_matches_float_product(found: np.ndarray, x: np.ndarray, w: np.ndarray, addend=None):
    """found == x · wᵀ (+ addend) to float32 rounding: within 1e-5 of the sum of |terms| of each entry."""
    expected = x @ w.T + (0 if addend is None else addend)
    magnitude = np.abs(x) @ np.abs(w).T + (0 if addend is None else np.abs(addend))
    worst = np.max(np.abs(found - expected) / np.maximum(magnitude, np.finfo(np.float32).tiny))
    assert worst <= 1e-5, f"relative error {worst:.3g}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows, cols", [(1, 32), (7, 96), (13, 64), (100, 576)])
@pytest.mark.parametrize("x_rows", [1, 2, 3, 64, 130])
def test_direct_and_tiled_kernels_match_dequantise_then_dot(kind, rows, cols, x_rows):
    """One row of x runs the direct kernel; more (a batched step, a prefill chunk), the tiled one."""
    w = quantize(awkward_values(rows, cols, seed=rows + cols), kind)
    x = np.random.default_rng(x_rows).standard_normal((x_rows, cols)).astype(np.float32)
    y = np.full((x_rows, rows), np.nan, np.float32)
    quantized.matmul(x, w, y)()
    assert_matches_float_product(y, x, w.dequantize())
    addend = y.copy()
    quantized.matmul(x, w, y, accumulate=True)()
    assert_matches_float_product(y, x, w.dequantize(), addend)


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_rows_are_dequantised_rows(kind):
    w = quantize(awkward_values(40, 96, seed=5), kind)
    ids = np.array([39, 0, 7, 7], np.int32)
    out = np.empty((4, 96), np.float32)
    quantized.embedding(ids, w, out)()
    np.testing.assert_array_equal(out, w.dequantize()[ids])


def test_kernels_are_compiled_for_the_cache():
    """Numba keeps the machine code on disk, so a second process does not compile again."""
    for kernel in (quantized_kernels.matmul_rows_q8, quantized_kernels.matmul_rows_q4,
                   quantized_kernels.matmul_tiles_q8, quantized_kernels.matmul_tiles_q4,
                   quantized_kernels.dequantize_rows_q8, quantized_kernels.dequantize_rows_q4):
        assert kernel._cache is not None and kernel.signatures, kernel


# --- the pass ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_quantize_weights_then_the_fusions_compute_the_dequantised_model(kind):
    graph = story_graph(prefill_chunk=8, context=32)
    # kernels=True: also the NumPy program's quantised kernels, node by node, against the reference's
    optimised, report = check_pass(graph, [quantize_weights(kind), *DEFAULT_PASSES], random_weights(graph),
                                   kernels=True)
    multiplied = {node.inputs[1].name: node.inputs[1].type.dtype for node in optimised.nodes
                  if node.op in ("matmul", "matmul_add")}
    assert len(multiplied) == 2 * 4 + 1 and set(multiplied.values()) == {kind}, multiplied  # packed, tied head
    assert report.stats[0].notes["converted"] == {f"f32 -> {kind}": 15}


def test_quantize_weights_leaves_rows_of_partial_blocks_in_float():
    graph = traced(lambda x: F.matmul(x, F.param("w", (16, 48))), x=48)
    weights = random_weights(graph)
    result = quantize_weights("q8_0")(graph, PassContext(weights))
    assert graph.params["w"].type.dtype == "f32" and weights["w"].dtype == np.float32
    assert result.notes["left alone"] == {"rows of 48 values are not whole blocks of 32": 1}


def test_unknown_weight_type_names_the_choices():
    with pytest.raises(MinitorchError, match=r"unknown weight type 'q5_k'; known: f32, q8_0, q4_0, q4_1, native"):
        minitorch_infer.load("story", weights="q5_k")


# --- whole models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt", ["Once upon", "Once upon a time, there was a little girl named Lily. She liked"])
def test_story_on_quantised_weights_equals_the_reference_backend(kind, prompt):
    """The compiled program (quantised weights in panels with AVX-512; elsewhere the direct kernel for one row,
    the tiled one for more) against the reference backend running the same graph on the dequantised weights."""
    model = minitorch_infer.load("story", weights=kind, context=64, prefill_chunk=32)
    assert model.graph.params["embed"].type.dtype == kind
    ids = model.encode(prompt)
    logits = model.logits(ids)
    graph = model._every_position().graph
    state = {name: np.zeros(v.type.concrete_shape(), np.float32) for name, v in graph.states.items()}
    params = {name: model.weights[name] for name in graph.params}
    expected = reference_run(graph, params, {"tokens": np.array(ids), "positions": np.arange(len(ids))}, state,
                             {"S": len(ids), "T": len(ids)})[0]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_quantised_weights_are_counted_at_their_size():
    f32 = minitorch_infer.load("story", context=64).weights.nbytes
    assert minitorch_infer.load("story", weights="q8_0", context=64).weights.nbytes < 0.35 * f32


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_q8_0_story_predicts_as_float_does():
    """Q8_0 barely moves the story model (measured: mean KL 2e-4, every top-1 the same); Q4 moves it more."""
    text = ("Once upon a time, there was a little girl named Lily. She liked to play outside with her dog. "
            "One day, they went to the park and saw a big tree.")
    f32 = minitorch_infer.load("story", context=128)
    q8 = minitorch_infer.load("story", weights="q8_0", context=128)
    ids = f32.encode(text)
    expected, found = log_softmax(f32.logits(ids)), log_softmax(q8.logits(ids))
    kl = (np.exp(expected) * (expected - found)).sum(axis=-1)
    assert kl.mean() < 2e-3
    assert (expected.argmax(axis=-1) == found.argmax(axis=-1)).mean() >= 0.95


def test_graph_text_shows_weight_types():
    model = minitorch_infer.load("story", weights="q4_0", context=64)
    assert "matmul(%18, @layers.0.mlp.gate+up:q4_0) : f32[S, 768]" in str(model.graph)
    assert "@mlp.gate+up:q4_0" in to_dot(model.graph)


def test_the_thread_limit_applies_in_each_calling_thread():
    """--threads: Numba's limit belongs to a thread, so it is set in whichever thread calls a kernel."""
    from tests.conftest import numba_threads_under_a_limit_of_one

    w = quantize(awkward_values(8, 64, seed=1), "q8_0")
    x, y = np.ones((1, 64), np.float32), np.empty((1, 8), np.float32)
    assert numba_threads_under_a_limit_of_one(quantized.matmul(x, w, y)) == [1]
