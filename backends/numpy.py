"""The fast NumPy backend: compile a graph once into a flat list of kernel calls bound to arena views.

Every temp value is a view into one preallocated arena at the offset the memory plan gave it; kernels
write with `out=`, so a step allocates no activation memory. A program is specialised (its views bound)
once per distinct number of new tokens S and of sequences R in a step, then reused: a decode step is just a
loop over prepared closures. Only the attention, KV-write and last-row kernels read the step's layout
(which rows belong to which sequence, and where each sequence's positions live in the KV pool).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache
from typing import Callable, Mapping

import numpy as np

from ..errors import GraphError
from ..ir import Graph, Node, op_def
from ..ir.ops import TRANSPOSED_PRODUCT_ROWS
from ..panelled import PANEL, PanelledWeight, fits as fits_in_panels
from ..passes.memory_plan import MemoryPlan, workspace_key
from ..quantized import (QuantizedPanels, QuantizedTensor, fits_in_panels as blocks_fit_in_panels, is_quantized,
                         weight_type)
from . import quantized, thread_handover
from .layout import StepLayout
from .rope import is_position_dependent, rope_frequencies

Kernel = Callable[[], None]
MAX_BINDINGS = 64          # (S, R) shapes a program keeps bound at once
KernelBuilder = Callable[..., Kernel]
KERNELS: dict[str, KernelBuilder] = {}
VIEWS: dict[str, Callable[[np.ndarray, dict, dict], np.ndarray]] = {}


def kernel(op: str):
    """Register `build(node, inputs, outputs, scratch, step) -> call` as the kernel for `op`."""

    def register(build):
        KERNELS[op] = build
        return build

    return register


def view(op: str):
    """Register `make(input_array, attrs, bindings) -> view` for an op whose output is a view of its input."""

    def register(make):
        VIEWS[op] = make
        return make

    return register


class StepState:
    """What changes every step without changing any buffer: the step's layout; and, while a shape is being
    bound, the panels its products read in place of weights held as arrays (a small model's, once it batches),
    whether its products run in Numba's threads (then its attention may use them too) and whether its
    row-wise ops run compiled (row_kernels): in steps that run Numba already."""

    __slots__ = ("layout", "panels", "products_in_numba", "row_ops_compiled")

    def __init__(self):
        self.layout: StepLayout | None = None
        self.panels: dict[int, PanelledWeight] = {}      # id(weight) -> its panels
        self.products_in_numba = False
        self.row_ops_compiled = False


class Program:
    """A graph compiled for NumPy: `run(inputs, pool, layout)` executes one step and returns views of its output
    buffers. Built by `compile`; every op must have a kernel here (or a view rule), checked now, not mid-run."""

    def __init__(self, graph: Graph, plan: MemoryPlan, params: Mapping[str, np.ndarray]):
        for node in graph.nodes:
            if node.op not in KERNELS and node.op not in VIEWS:
                raise GraphError(f"numpy backend has no kernel for op {node.op!r} (node {node.name})")
            for value in node.outputs:
                if value.kind == "temp" and "T" in {s.name for s in value.type.symbols}:
                    raise GraphError(f"numpy backend: temp {value.ref} : {value.type} depends on T; only "
                                     "kv_write and attention may see the cache length")
        self.graph = graph
        self.plan = plan
        self.params = {name: params[name] for name in graph.params}
        held_in_panels = params_held_in_panels(graph, self.params)
        for name in held_in_panels:     # a copy only where the caller did not hand them over in panels already
            self.params[name] = in_panels(self.params[name])
        floats_in_panels = [name for name in held_in_panels if isinstance(self.params[name], PanelledWeight)]
        # A small model's weights stay arrays; once it batches, its steps multiply by copies of them in panels.
        self._batch_panels: dict[int, PanelledWeight] | None = {} if floats_in_panels else None
        for name, value in graph.params.items():
            if weight_type(self.params[name]) != value.type.dtype:
                raise GraphError(f"param @{name} is declared {value.type.dtype} but the weights hold "
                                 f"{weight_type(self.params[name])}: compile with the quantize_weights pass first")
        quantized.warm_up({v.type.dtype for v in graph.params.values() if v.type.is_quantized})
        quantized_weights = _matmul_weight_names(graph, quantized=True)
        self._quantized_products = bool(quantized_weights) and not _matmul_weight_names(graph, quantized=False)
        # A program of float32 weights in panels: every step's products run in Numba (as a quantised program's do).
        self._panelled_products = bool(floats_in_panels) and not quantized_weights
        if self._panelled_products:
            _panel_kernels().warm_up()
        if any(isinstance(self.params[name], QuantizedPanels) for name in held_in_panels):
            quantized.warm_up_panels()
        if self._quantized_products or self._panelled_products:
            warm_up_step_kernels()
        self.arena = np.empty(plan.arena_bytes, dtype=np.uint8)
        self.input_buffers = {v.name: np.empty(v.type.concrete_shape(), v.type.np_dtype) for v in graph.inputs}
        self.output_buffers = {v.name: np.empty(v.type.concrete_shape(), v.type.np_dtype) for v in graph.outputs}
        self.step = StepState()
        # The most recently used bindings; a server sees many (S, R) shapes, so old ones are dropped.
        self._bound: OrderedDict[tuple[int, int, int], tuple[list[Kernel], list[np.ndarray]]] = OrderedDict()
        self.max_new_tokens = graph.symbols["S"].max
        self.max_sequences = graph.symbols["R"].max if "R" in graph.symbols else self.max_new_tokens

    def run(self, inputs: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray],
            layout: StepLayout) -> list[np.ndarray]:
        """One step: inputs hold the S new tokens of the layout's sequences, in its order; `state` is the KV pool.
        Returns the outputs as views of the program's own buffers (copy them to keep them past the next step)."""
        seq = layout.row_stops[-1]
        if not 0 < seq <= self.max_new_tokens:
            raise GraphError(f"a step takes 1..{self.max_new_tokens} new tokens, got {seq}")
        if len(layout.totals) > self.max_sequences:
            raise GraphError(f"a step takes 1..{self.max_sequences} sequences, got {len(layout.totals)}")
        for name, array in inputs.items():
            self.input_buffers[name][:seq] = array
        self.step.layout = layout
        calls, outputs, products_in_numba = self._bound_for(seq, len(layout.totals), state)
        # The cores go to the threads of whichever library runs the step's products (see thread_handover).
        if products_in_numba:
            quantized.limit_numba_threads()              # --threads, on this thread (Numba's limit is per thread)
            thread_handover.before_numba_step()
        else:
            thread_handover.before_blas_step()
        for call in calls:
            call()
        return outputs

    def profile(self, inputs: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray],
                layout: StepLayout) -> dict[str, float]:
        """Seconds spent per op type in one step (for bench --profile); a fused op counts apart under the pass
        that made it: "matmul (fuse_gate_up)"."""
        import time

        calls, _, _ = self._bound_for(layout.row_stops[-1], len(layout.totals), state)
        ops = [f"{node.op} ({node.meta['pass']})" if "pass" in node.meta else node.op
               for node in self.graph.nodes if node.op not in VIEWS]
        seconds = dict.fromkeys(ops, 0.0)
        for name, array in inputs.items():
            self.input_buffers[name][:len(array)] = array
        self.step.layout = layout
        quantized.limit_numba_threads()
        for op, call in zip(ops, calls):
            began = time.perf_counter()
            call()
            seconds[op] += time.perf_counter() - began
        return seconds

    def bound_nodes(self, inputs: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray], layout: StepLayout
                    ) -> list[tuple[Node, list[np.ndarray], list[np.ndarray], Kernel | None]]:
        """For checking kernels one at a time (passes.check_kernels): every node with its bound input and output
        arrays and its kernel call (None for a view), with `inputs` and the layout in place as run() puts them.
        Calling the kernels in order is one run() (compile with an unshared plan to read every value after)."""
        for name, array in inputs.items():
            self.input_buffers[name][:len(array)] = array
        self.step.layout = layout
        entries: list = []
        self._bind(layout.row_stops[-1], len(layout.totals), state, entries)
        return entries

    def _bound_for(self, seq: int, sequences: int, state: Mapping[str, np.ndarray]
                   ) -> tuple[list[Kernel], list[np.ndarray], bool]:
        """The kernel calls bound for S = seq, R = sequences and this KV pool, binding them when first asked for;
        then the outputs, and whether the step's products run in Numba's threads."""
        key = (seq, sequences, id(state))
        if key in self._bound:
            self._bound.move_to_end(key)
            return self._bound[key]
        bound = self._bound[key] = self._bind(seq, sequences, state)
        if len(self._bound) > MAX_BINDINGS:
            self._bound.popitem(last=False)
        return bound

    def _bind(self, seq: int, sequences: int, state: Mapping[str, np.ndarray], entries: list | None = None
              ) -> tuple[list[Kernel], list[np.ndarray], bool]:
        bindings = {"S": seq, "R": sequences, "T": self.graph.symbols["T"].max if "T" in self.graph.symbols else 0}
        arrays: dict[int, np.ndarray] = {}
        for value in self.graph.inputs:
            arrays[id(value)] = self.input_buffers[value.name][:seq]
        for name, value in self.graph.params.items():
            arrays[id(value)] = self.params[name]
        for name, value in self.graph.states.items():
            arrays[id(value)] = state[name]
        outputs = {id(v) for v in self.graph.outputs}
        # Numba is loaded by then where a step runs it: by a quantised or panelled program, or by the engine.
        self.step.panels = self.panels_for(sequences)
        self.step.products_in_numba = self._panelled_products or bool(self.step.panels) or self._quantized_products
        self.step.row_ops_compiled = self._quantized_products or self._panelled_products or sequences > 1
        calls = []
        for node in self.graph.nodes:
            spec = op_def(node.op)
            ins = [arrays[id(v)] for v in node.inputs]
            if node.op in VIEWS:
                arrays[id(node.output)] = VIEWS[node.op](ins[0], node.attrs, bindings)
                if entries is not None:
                    entries.append((node, ins, [arrays[id(node.output)]], None))
                continue
            outs = []
            for value in node.outputs:
                if value.kind == "state":
                    outs.append(ins[1])          # kv_write: the whole cache; readers slice it per step
                elif id(value) in outputs:
                    bound = value.type.concrete_shape(bindings)
                    outs.append(self.output_buffers[value.name][tuple(slice(0, n) for n in bound)])
                else:
                    outs.append(self._arena_view(self.plan.offsets[value.name], value.type.concrete_shape(bindings),
                                                 value.type.np_dtype))
                arrays[id(value)] = outs[-1]
            scratch = None
            if workspace_key(node) in self.plan.offsets:
                elements = spec.workspace([v.type for v in node.inputs], node.attrs)
                scratch = self._arena_view(self.plan.offsets[workspace_key(node)], (elements,), np.dtype(np.float32))
            calls.append(KERNELS[node.op](node, ins, outs, scratch, self.step))
            if entries is not None:
                entries.append((node, ins, outs, calls[-1]))
        return calls, [arrays[id(v)] for v in self.graph.outputs], self.step.products_in_numba

    def panels_for(self, sequences: int) -> dict[int, PanelledWeight]:
        """The copies in panels a step of `sequences` sequences multiplies by (see batch_panels)."""
        return self.batch_panels() if sequences > 1 or self._batch_panels else {}

    def batch_panels(self) -> dict[int, PanelledWeight]:
        """What steps multiply by in place of weights held as arrays once the program batches: copies of them in
        panels, by id of the array (none where the weights are held in panels). Made for the first engine or
        step of several sequences; from then on single-sequence steps use them too, so that an engine whose
        load goes between one request and several does not hand the cores between BLAS's threads and Numba's
        at each change (the first step after such a handover took 3 ms more than the next on the story model)."""
        if self._batch_panels is None:
            names = _panel_candidates(self.params, _matmul_weight_names(self.graph, quantized=False))
            self._batch_panels = {id(self.params[name]): PanelledWeight.of(self.params[name]) for name in names}
            self._bound.clear()                # bindings made before multiply by the arrays
        return self._batch_panels

    def warm_up_batched_steps(self) -> None:
        """Compile (or load from Numba's cache) what steps run once the program batches: the paged attention and
        row kernels, and the panel kernels of its copies in panels (made now)."""
        warm_up_step_kernels()
        if self.batch_panels():
            _panel_kernels().warm_up()

    def _arena_view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        # math.prod: a program binds hundreds of these for each new (S, R), and np.prod costs a few µs each.
        return np.frombuffer(self.arena, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)


def compile(graph: Graph, plan: MemoryPlan, params: Mapping[str, np.ndarray]) -> Program:
    """Bind `graph` to its weights (`params` by name) and to one arena laid out as `plan` says. Weights that
    params_held_in_panels names and `params` holds as arrays are copied into panels for the program."""
    return Program(graph, plan, params)


# A model whose float32 weights come to this much is held in panels for every step (see params_held_in_panels).
PANELS_MIN_BYTES = 16 << 20


def params_held_in_panels(graph: Graph, params: Mapping[str, object]) -> list[str]:
    """The weights a program holds in panels and multiplies by in the panel kernels at every step: its float32
    weights (_float_weights_in_panels) and, on a machine with AVX-512, every quantised weight a matmul multiplies
    by that is whole panels of rows (quantised panels beat the row-major kernels at every number of rows:
    SmolLM2's chain of products from memory at 1 / 16 / 128 rows, Q8_0 1.23 / 1.77 / 1.15x, Q4_1 1.17 / 1.69 /
    1.36x, AMD EPYC)."""
    quantized_names = _matmul_weight_names(graph, quantized=True)
    if quantized_names and _has_avx512():
        quantized_names = [name for name in quantized_names
                           if isinstance(params[name], QuantizedPanels) or blocks_fit_in_panels(params[name])]
    else:
        quantized_names = []
    return _float_weights_in_panels(graph, params) + quantized_names


def in_panels(weight):
    """A weight laid out in panels (a copy), float32 or quantised; as it is if it is in panels already."""
    if isinstance(weight, np.ndarray):
        return PanelledWeight.of(weight)
    if isinstance(weight, QuantizedTensor):
        return QuantizedPanels.of(weight)
    return weight


def _float_weights_in_panels(graph: Graph, params: Mapping[str, object]) -> list[str]:
    """The float32 weights a program holds in panels (minitorch_infer.panelled) and multiplies by in the panel
    kernels at every step: all of them (_panel_candidates), where together they come to PANELS_MIN_BYTES or
    more, and so stream from memory (SmolLM2's 540 MB). There the panel kernels beat OpenBLAS at every number
    of rows: SmolLM2's chain of float32 products at 1 / 4 / 16 / 64 / 256 rows 1.44 / 3.83 / 4.12 / 2.21 /
    1.94x (benchmarks/panel_products.py, AMD EPYC, 2 cores). A smaller model (the story model's 2.6 MB) stays
    in cache, where its one-row products gain less (1.2x, ~6 µs a token) than a process pays to start
    Numba's kernels (~0.5 s; ~9 s to compile them the first time): its weights stay arrays for BLAS until it
    batches, which runs Numba anyway, and from then on its steps multiply by copies in panels
    (Program.batch_panels)."""
    names = _matmul_weight_names(graph, quantized=False)
    if sum(params[name].nbytes for name in names) < PANELS_MIN_BYTES:
        return []                        # asked first: a small model's single stream need not load llvmlite
    return _panel_candidates(params, names)


def _panel_candidates(params: Mapping[str, object], names: list[str]) -> list[str]:
    """On a machine with AVX-512, the named float32 weights (every one a matmul multiplies by), if each can be laid
    out in panels; else none: all or none, since a BLAS call leaves OpenBLAS's threads spinning, which would
    starve the panel kernels' threads that follow."""
    if _has_avx512() and all(isinstance(params[name], PanelledWeight) or fits_in_panels(params[name])
                             for name in names):
        return names
    return []


def _matmul_weight_names(graph: Graph, quantized: bool) -> list[str]:
    """The params a matmul multiplies by: the quantised ones, or the float32 ones."""
    return sorted({node.inputs[1].name for node in graph.nodes
                   if node.op in ("matmul", "matmul_add") and node.inputs[1].kind == "param"
                   and node.inputs[1].type.is_quantized == quantized})


# --- views ----------------------------------------------------------------------------------------

@view("reshape")
def _reshape(x, attrs, bindings):
    shape = tuple(d if isinstance(d, int) else bindings[d.name] for d in attrs["shape"])
    result = x.view()
    result.shape = shape        # assigning .shape refuses (instead of copying) when a view is impossible
    return result


@view("slice_cols")
def _slice_cols(x, attrs, bindings):
    return x[:, attrs["start"]:attrs["stop"]]


# --- kernels --------------------------------------------------------------------------------------

@kernel("embedding")
def _embedding(node: Node, ins, outs, scratch, step) -> Kernel:
    ids, table = ins
    (y,) = outs
    if is_quantized(table):
        return quantized.embedding(ids, table, y)
    if isinstance(table, PanelledWeight):                  # a table tied to the logits' weight
        panels = table.panels
        if ids.shape[0] == 1:
            return lambda: y.__setitem__(0, panels[ids[0] // PANEL, :, ids[0] % PANEL])
        return lambda: np.copyto(y, table.lookup(ids))
    if ids.shape[0] == 1:
        # One row (decode, and the rope table's lookup): plain indexing is a third of np.take's cost.
        return lambda: y.__setitem__(0, table[ids[0]])
    return lambda: table.take(ids, axis=0, out=y)          # the method: np.take's wrapper costs ~1 µs a call


@kernel("matmul")
def _matmul(node: Node, ins, outs, scratch, step) -> Kernel:
    x, w = ins
    (y,) = outs
    if is_quantized(w):
        return quantized.matmul(x, w, y)
    w = step.panels.get(id(w), w)
    if isinstance(w, PanelledWeight):
        return panel_product(x, w, y)
    return float_product(x, w, y, scratch)


def float_product(x: np.ndarray, w: np.ndarray, y: np.ndarray, scratch: np.ndarray | None) -> Kernel:
    """A call computing y = x · wᵀ for a float32 weight held as an array (a small model's before it batches, or
    any without AVX-512), the BLAS calls chosen by x's rows and w's layout and size; scratch (the matmul's
    workspace) holds the transposed operands of the few-row products."""
    rows = x.shape[0]
    if rows == 1:
        # One row (decode): a matrix-vector product (BLAS gemv, in whichever layout the weight has);
        # np.dot reaches BLAS with less per-call overhead than np.matmul.
        x_row, y_row = x[0], y[0]
        return lambda: np.dot(w, x_row, out=y_row)
    streamed = w.nbytes > STREAMED_WEIGHT_BYTES
    if streamed and rows <= (GEMV_ROWS_COLUMN_MAJOR if w.flags.f_contiguous else GEMV_ROWS_ROW_MAJOR):
        # A very few rows on a large weight: one matrix-vector product per row. OpenBLAS's gemm takes 2-4x one
        # gemv's time for 2-16 rows here, while each further gemv finds much of W in the last-level cache
        # (SmolLM2's column-major gate|up at 2 / 4 / 6 rows: 1501 / 1517 / 1694 us by gemm, 583 / 921 / 1376
        # by gemvs; its row-major logits at 2 / 3 rows: 23.4 / 25.4 ms by gemm, 15.8 / 23.1 by gemvs).
        pairs = [(x[i], y[i]) for i in range(rows)]

        def gemvs():
            for x_row, y_row in pairs:
                np.dot(w, x_row, out=y_row)
        return gemvs
    if rows <= TRANSPOSED_PRODUCT_ROWS and scratch is not None and (w.flags.c_contiguous or streamed):
        # A few rows (a batched decode step, a verify step): OpenBLAS multiplies [2-32, K] by a transposed
        # [N, K] (a row-major weight: the logits product) 1.3-4x slower than W by the transposed rows (the
        # story model's logits for 2 rows: 109 -> 27 us), and x by a large column-major one 1.1-1.3x slower
        # (SmolLM2's q|k|v and gate|up at 8-32 rows), copies included. From ~48 rows the copies cost more.
        product, product_t = _transposed_product(x, w, scratch)
        return lambda: (product(), np.copyto(y, product_t.T))
    w_t = w.T
    return lambda: np.matmul(x, w_t, out=y)


def panel_product(x: np.ndarray, w: PanelledWeight, y: np.ndarray, accumulate: bool = False) -> Kernel:
    """y = x · wᵀ (or y += x · wᵀ) by panel_kernels, from the weight's panels."""
    w_panels, kernel = w.panels, _panel_kernels().product(x, w.panels)
    return lambda: kernel(w_panels, x, y, accumulate)


# A product on a weight larger than a core's L2 cache (STREAMED_WEIGHT_BYTES: one that comes from memory or
# the last-level cache) runs as one gemv per row up to this many rows (see _matmul); OpenBLAS's gemm by the
# transposed rows catches up sooner on a row-major weight. A small weight stays in cache, where gemm's
# blocking wins: the story model's 768 x 128 gate|up at 4 rows, 15 us by gemm, 28 by gemvs; its 2048 x 128
# head (1 MiB) at 2 rows, 86 us by gemm, 108 by gemvs.
GEMV_ROWS_COLUMN_MAJOR = 6
GEMV_ROWS_ROW_MAJOR = 2
STREAMED_WEIGHT_BYTES = 2 << 20


def _transposed_product(x: np.ndarray, w: np.ndarray, scratch: np.ndarray) -> tuple[Kernel, np.ndarray]:
    """(call, product_t): call() computes W·xᵀ into product_t [N, rows] from a transposed copy of x, both in
    scratch."""
    rows, k = x.shape
    x_t = scratch[:k * rows].reshape(k, rows)
    product_t = scratch[k * rows:(k + w.shape[0]) * rows].reshape(w.shape[0], rows)

    def call():
        np.copyto(x_t, x.T)
        np.matmul(w, x_t, out=product_t)
    return call, product_t


# Up to this many rows, y = c + x·Wᵀ with a row-major W runs as yᵀ = W·xᵀ on transposed copies, which BLAS
# does 1.4-2.4x faster for 8-37 rows (SmolLM2's o and down projections), copies included; SmolLM2's prefill
# of 8/16/37/48 tokens went 161/300/452/566 -> 209/364/518/635 tok/s. From about 80 rows the copies cost more.
TRANSPOSED_MAX_ROWS = 64


def _added_to(c: np.ndarray, y: np.ndarray, add_product: Kernel) -> Kernel:
    """y = c + x · wᵀ from a call that adds the product into y as it stands."""
    if y is c or np.shares_memory(y, c):
        return add_product
    return lambda: (np.copyto(y, c), add_product())


@kernel("matmul_add")
def _matmul_add(node: Node, ins, outs, scratch, step) -> Kernel:
    x, w, c = ins
    (y,) = outs
    rows, k = x.shape
    if is_quantized(w):
        return _added_to(c, y, quantized.matmul(x, w, y, accumulate=True))
    w = step.panels.get(id(w), w)
    if isinstance(w, PanelledWeight):
        return _added_to(c, y, panel_product(x, w, y, accumulate=True))
    if 1 < rows <= TRANSPOSED_MAX_ROWS and w.flags.c_contiguous:
        product, product_t = _transposed_product(x, w, scratch)
        return lambda: (product(), np.add(c, product_t.T, out=y))
    product = _matmul(node, [x, w], [scratch[:y.size].reshape(y.shape)], None, step)
    if y is c or np.shares_memory(y, c):
        def call():
            product()
            np.add(y, scratch[:y.size].reshape(y.shape), out=y)
        return call
    return lambda: (product(), np.add(c, scratch[:y.size].reshape(y.shape), out=y))


def _elementwise(ufunc) -> KernelBuilder:
    """The kernel of an op that is one NumPy ufunc over its inputs, written into its output."""
    def build(node: Node, ins, outs, scratch, step) -> Kernel:
        (y,) = outs
        return lambda: ufunc(*ins, out=y)
    return build


for _op, _ufunc in {"add": np.add, "mul": np.multiply, "sub": np.subtract, "div": np.divide, "exp": np.exp,
                    "tanh": np.tanh}.items():
    kernel(_op)(_elementwise(_ufunc))


@kernel("constant")
def _constant(node: Node, ins, outs, scratch, step) -> Kernel:
    (y,) = outs
    value = np.float32(node.attrs["value"])
    return lambda: y.fill(value)          # every step: the planner may reuse the buffer between steps


@kernel("softmax")
def _softmax(node: Node, ins, outs, scratch, step) -> Kernel:
    (x,), (y,) = ins, outs
    rows = np.empty((*x.shape[:-1], 1), np.float32)       # one float per row, bound once per program

    def call():
        np.maximum.reduce(x, axis=-1, keepdims=True, out=rows)
        np.subtract(x, rows, out=y)
        np.exp(y, out=y)
        np.add.reduce(y, axis=-1, keepdims=True, out=rows)
        np.divide(y, rows, out=y)
    return call


# Abramowitz & Stegun 7.1.26: erf to 1.5e-7 absolute, enough for float32 (NumPy has no erf of its own).
_ERF_P = np.float32(0.3275911)
_ERF_A = tuple(np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))


@kernel("gelu")
def _gelu(node: Node, ins, outs, scratch, step) -> Kernel:
    (x,), (y,) = ins, outs
    t = np.empty(x.shape, np.float32)
    if node.attrs["approximate"] == "tanh":
        inner = np.float32(math.sqrt(2 / math.pi))

        def tanh_form():
            np.multiply(x, x, out=t)
            np.multiply(t, np.float32(0.044715), out=t)
            np.add(t, np.float32(1), out=t)
            np.multiply(t, x, out=t)
            np.multiply(t, inner, out=t)
            np.tanh(t, out=t)
            np.add(t, np.float32(1), out=t)
            np.multiply(t, x, out=y)
            np.multiply(y, np.float32(0.5), out=y)
        return tanh_form
    a1, a2, a3, a4, a5 = _ERF_A
    z, polynomial = np.empty(x.shape, np.float32), np.empty(x.shape, np.float32)

    def erf_form():
        # Φ(x) = (1 + erf(x/√2)) / 2, with erf odd: erf(|z|) by A&S, then the sign back.
        np.multiply(x, np.float32(1 / math.sqrt(2)), out=z)
        np.abs(z, out=z)
        np.multiply(z, _ERF_P, out=t)
        np.add(t, np.float32(1), out=t)
        np.reciprocal(t, out=t)                           # t = 1 / (1 + p|z|)
        np.multiply(t, a5, out=polynomial)                # ((((a5 t + a4) t + a3) t + a2) t + a1) t
        for a in (a4, a3, a2, a1):
            np.add(polynomial, a, out=polynomial)
            np.multiply(polynomial, t, out=polynomial)
        np.multiply(z, z, out=z)
        np.negative(z, out=z)
        np.exp(z, out=z)
        np.multiply(polynomial, z, out=z)                 # 1 - erf(|z|)
        np.subtract(np.float32(1), z, out=z)
        np.copysign(z, x, out=z)                          # erf(x/√2)
        np.add(z, np.float32(1), out=z)
        np.multiply(z, x, out=y)
        np.multiply(y, np.float32(0.5), out=y)
    return erf_form


@kernel("layer_norm")
def _layer_norm(node: Node, ins, outs, scratch, step) -> Kernel:
    x, weight, bias = ins
    (y,) = outs
    width = x.shape[-1]
    x_rows, y_rows = x.reshape(-1, width), y.reshape(-1, width)
    stat = np.empty((x_rows.shape[0], 1), np.float32)        # one float per row, bound once per program
    stat_flat = stat[:, 0]
    inverse_width, eps = np.float32(1 / width), np.float32(node.attrs["eps"])

    def call():
        np.add.reduce(x_rows, axis=-1, keepdims=True, out=stat)
        np.multiply(stat, inverse_width, out=stat)
        np.subtract(x_rows, stat, out=y_rows)               # centred; y may be x's buffer, x is not read again
        np.vecdot(y_rows, y_rows, out=stat_flat)
        np.multiply(stat, inverse_width, out=stat)
        np.add(stat, eps, out=stat)
        np.sqrt(stat, out=stat)
        np.divide(y_rows, stat, out=y_rows)
        np.multiply(y_rows, weight, out=y_rows)
        np.add(y_rows, bias, out=y_rows)
    return call


@kernel("transpose")
def _transpose(node: Node, ins, outs, scratch, step) -> Kernel:
    (x,), (y,) = ins, outs
    permuted = x.transpose(node.attrs["perm"])
    return lambda: np.copyto(y, permuted)


def _silu_into(x: np.ndarray, y: np.ndarray) -> None:
    """y = silu(x) = x * (1 + tanh(x/2)) / 2: the tanh form cannot overflow, unlike 1 / (1 + exp(-x))."""
    np.multiply(x, np.float32(0.5), out=y)
    np.tanh(y, out=y)
    y += np.float32(1)
    y *= np.float32(0.5)
    y *= x


@kernel("silu")
def _silu(node: Node, ins, outs, scratch, step) -> Kernel:
    (x,), (y,) = ins, outs
    return lambda: _silu_into(x, y)


@kernel("swiglu")
def _swiglu(node: Node, ins, outs, scratch, step) -> Kernel:
    (gate_up,), (y,) = ins, outs
    width = y.shape[-1]
    if step.row_ops_compiled:
        swiglu = _row_kernels().swiglu
        rows, y_rows = gate_up.reshape(-1, 2 * width), y.reshape(-1, width)
        return lambda: swiglu(rows, y_rows)
    gate, up = gate_up[..., :width], gate_up[..., width:]

    def call():
        _silu_into(gate, y)
        np.multiply(y, up, out=y)
    return call


@kernel("rms_norm")
def _rms_norm(node: Node, ins, outs, scratch, step) -> Kernel:
    x, weight = ins
    (y,) = outs
    rows, y_rows = x.reshape(-1, x.shape[-1]), y.reshape(-1, x.shape[-1])
    mean_factor, eps = 1.0 / x.shape[-1], node.attrs["eps"]
    if step.row_ops_compiled:
        rms_norm, eps32 = _row_kernels().rms_norm, np.float32(eps)
        return lambda: rms_norm(rows, weight, eps32, y_rows)
    if rows.shape[0] == 1:
        # One row (decode): the scale is a Python float, which saves four tiny array operations.
        row, y_row = rows[0], y_rows[0]

        def one_row():
            scale = 1.0 / math.sqrt(float(np.dot(row, row)) * mean_factor + eps)
            np.multiply(row, scale, out=y_row)
            np.multiply(y_row, weight, out=y_row)
        return one_row

    scale = np.empty((rows.shape[0], 1), np.float32)          # one float per row, bound once per program
    scale_flat = scale[:, 0]
    mean_factor32, eps32 = np.float32(mean_factor), np.float32(eps)

    def call():
        np.vecdot(rows, rows, out=scale_flat)                  # sum of squares per row
        np.multiply(scale, mean_factor32, out=scale)
        np.add(scale, eps32, out=scale)
        np.sqrt(scale, out=scale)
        np.divide(rows, scale, out=y_rows)
        np.multiply(y_rows, weight, out=y_rows)
    return call


@kernel("rope_table")
def _rope_table(node: Node, ins, outs, scratch, step) -> Kernel:
    (positions,) = ins
    (table,) = outs
    head_dim, theta, scaling = node.attrs["head_dim"], node.attrs["theta"], node.attrs["scaling"]
    fixed = None if is_position_dependent(scaling) else rope_frequencies(head_dim, theta, scaling, 0).astype(np.float32)
    as_float = np.empty((positions.shape[0], 1), np.float32)
    cos_sin = table.reshape(table.shape[0], -1, 2)
    angles, sin = cos_sin[..., 0], cos_sin[..., 1]       # the cos slots hold the angles until the sin is taken

    def call():
        inv_freq = fixed
        if inv_freq is None:
            inv_freq = rope_frequencies(head_dim, theta, scaling, int(positions.max()) + 1).astype(np.float32)
        as_float[:, 0] = positions
        np.multiply(as_float, inv_freq, out=angles)
        np.sin(angles, out=sin)
        np.cos(angles, out=angles)
    return call


@kernel("rope")
def _rope(node: Node, ins, outs, scratch, step) -> Kernel:
    x, table = ins
    (y,) = outs
    if step.row_ops_compiled:
        rope = _row_kernels().rope
        return lambda: rope(x, table, y)
    # Adjacent float32 pairs are complex64 numbers: rotating them all is one complex multiplication.
    x_complex, y_complex = x.view(np.complex64), y.view(np.complex64)
    rotation = table.view(np.complex64)[:, None, :]
    return lambda: np.multiply(x_complex, rotation, out=y_complex)


@kernel("last_row")
def _last_row(node: Node, ins, outs, scratch, step) -> Kernel:
    (x,), (y,) = ins, outs
    if y.shape[0] == x.shape[0]:
        return lambda: np.copyto(y, x)           # one row per sequence (a decode step): every row is a last row
    if y.shape[0] == 1:
        return lambda: np.copyto(y[0], x[step.layout.last_rows[0]])
    return lambda: x.take(step.layout.last_rows, axis=0, out=y)


@kernel("kv_write")
def _kv_write(node: Node, ins, outs, scratch, step) -> Kernel:
    x, pool = ins
    seq = x.shape[0]
    x_by_head = x.transpose(1, 0, 2)
    write_rows = _row_kernels().write_rows if step.row_ops_compiled else None

    def call():
        layout = step.layout
        if layout.write_start is not None:
            np.copyto(pool[:, layout.write_start:layout.write_start + seq], x_by_head)
        elif write_rows is not None:
            write_rows(x, pool, layout.write_slots)
        else:
            pool[:, layout.write_slots] = x_by_head
    return call


@kernel("attention")
def _attention(node: Node, ins, outs, scratch, step) -> Kernel:
    """Each sequence of the step attends over its own keys. A decode step of several sequences (one query
    each), or of one when the products run in Numba's threads, runs the compiled paged kernel, which reads
    every sequence's keys where the pool keeps them; otherwise each sequence goes alone, reading its keys as
    a view of the pool when its positions are one run of slots (gathering them when not): one query takes the
    matrix-vector path, many (prefill) the transposed one."""
    q, k_pool, v_pool = ins
    (out,) = outs
    rows, heads, head_dim = q.shape
    kv_heads = k_pool.shape[0]
    group = heads // kv_heads
    context = node.inputs[1].type.concrete_shape()[1]
    gather_size = kv_heads * context * head_dim
    gathered_k, gathered_v = scratch[-2 * gather_size:-gather_size], scratch[-gather_size:]
    scratch = scratch[:-2 * gather_size]
    window, last_queries = node.attrs["window"], node.attrs["queries"] == "last"
    attend = _one_query_attention(node, heads, head_dim, kv_heads, context, scratch)

    def grouped(x: np.ndarray, row: int) -> np.ndarray:
        """Row `row` of q or out as [kv_heads, group, head_dim]."""
        return x[row].reshape(kv_heads, group, head_dim)

    def keys_and_values(layout: StepLayout, i: int, first: int, total: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions first..total-1 of sequence i, as [kv_heads, total - first, head_dim] arrays."""
        start = layout.key_starts[i]
        if start is not None:
            return k_pool[:, start + first:start + total], v_pool[:, start + first:start + total]
        slots, shape = layout.positions_of(i)[first:total], (kv_heads, total - first, head_dim)
        size = kv_heads * (total - first) * head_dim
        k, v = gathered_k[:size].reshape(shape), gathered_v[:size].reshape(shape)
        np.take(k_pool, slots, axis=1, out=k)
        np.take(v_pool, slots, axis=1, out=v)
        return k, v

    def one_query(layout: StepLayout, i: int, q_row: np.ndarray, out_row: np.ndarray) -> None:
        total = layout.totals[i]
        first = max(0, total - window) if window > 0 else 0      # with one query, a window is a range of keys
        k, v = keys_and_values(layout, i, first, total)
        attend(q_row, k, v, out_row)

    scale = np.float32(node.attrs["scale"])
    numba_step = step.products_in_numba                 # as bound: a cached binding does not set it again
    paged_kernel = "paged_decode_attention_threaded" if numba_step else "paged_decode_attention"
    if rows == 1 and numba_step:
        # One sequence's decode with its products in Numba: the threaded paged kernel shares its kv heads among
        # Numba's threads, idle between the products otherwise (SmolLM2 decode 1.04x native, 1.055x Q8_0, one
        # process, eight alternating turns each, to ~200 positions; more for longer contexts). The kernels are
        # loaded already (Program warms them), so the kernel is picked once here, not every step.
        paged_attention = getattr(_attention_kernels(), paged_kernel)

        def paged_one_query():
            layout = step.layout
            paged_attention(q, k_pool, v_pool, layout.padded_slots(), layout.totals_array(), window, scale, out)
        return paged_one_query
    if rows == 1:                                                # one sequence, one query: the lean decode path
        q_row, out_row = grouped(q, 0), grouped(out, 0)          # views made once
        return lambda: one_query(step.layout, 0, q_row, out_row)

    def call():
        layout = step.layout
        sequences = len(layout.totals)
        if last_queries or rows == sequences:                    # one query per sequence: query i is row i
            if sequences > 1:
                getattr(_attention_kernels(), paged_kernel)(q[:sequences], k_pool, v_pool, layout.padded_slots(),
                                                            layout.totals_array(), window, scale, out[:sequences])
            else:
                one_query(layout, 0, grouped(q, 0), grouped(out, 0))
            return
        for i, (first_row, stop_row, total) in enumerate(zip(layout.row_starts, layout.row_stops, layout.totals)):
            if stop_row - first_row == 1:
                one_query(layout, i, grouped(q, first_row), grouped(out, first_row))
            else:
                k, v = keys_and_values(layout, i, 0, total)
                blas_threads = numba_step and (stop_row - first_row) * total * heads * head_dim >= BLAS_ATTENTION
                if blas_threads:                       # the cores go to OpenBLAS for this call (thread_handover)
                    thread_handover.before_blas_step()
                _many_queries_attention(node, q[first_row:stop_row], k, v, out[first_row:stop_row], scratch)
                if blas_threads:
                    thread_handover.before_numba_step()
    return call


# A prompt's attention is BLAS's products of its queries by every key. In a step whose products run in Numba's
# threads, OpenBLAS is held to one thread (thread_handover), which late in a long prompt leaves half the
# machine idle for most of the step: from this many multiply-adds of q·kᵀ (new rows × keys × heads ×
# head_dim) the call gets OpenBLAS's threads back, ~0.2 ms of handing over each way. SmolLM2 native, a
# 2,048-token prompt in chunks of 128, alternating processes: 1.06-1.25x (3.04-3.07 against 3.23-3.31 s in one
# round, 2.49-2.57 against 3.09-3.14 in another); 128 and 512 tokens unchanged (the first chunk stays below).
BLAS_ATTENTION = 10_000_000


def _one_query_attention(node: Node, heads: int, head_dim: int, kv_heads: int, context: int, scratch):
    """attend(q, k, v, out): one query q [kv_heads, group, head_dim] over keys and values [kv_heads, n, head_dim]
    into out [kv_heads, group, head_dim]; scores [kv_heads, group, n]."""
    group = heads // kv_heads
    scale = np.float32(node.attrs["scale"])
    row_max = scratch[:heads].reshape(kv_heads, group, 1)
    row_sum = scratch[heads:2 * heads].reshape(kv_heads, group, 1)
    score_space = scratch[2 * heads:]
    ones = _ones(context)[0]                                # sums as matrix products: faster than np.sum

    def attend(q_grouped, k, v, out_grouped):
        width = k.shape[1]
        scores = score_space[:heads * width].reshape(kv_heads, group, width)
        np.matmul(q_grouped, k.transpose(0, 2, 1), out=scores)
        np.multiply(scores, scale, out=scores)
        np.maximum.reduce(scores, axis=-1, keepdims=True, out=row_max)   # np.max adds a Python wrapper
        np.subtract(scores, row_max, out=scores)
        np.exp(scores, out=scores)
        np.matmul(scores, ones[:width, None], out=row_sum)
        np.matmul(scores, v, out=out_grouped)
        np.divide(out_grouped, row_sum, out=out_grouped)
    return attend


_attention_kernel_module = None


def _attention_kernels():
    # Imported when an engine is made or a program whose products run in Numba is (its decode uses them too):
    # Numba costs ~0.2-0.5 s and ~60 MB to import, which a float32 model held as arrays (a small one, or any
    # without AVX-512) that never batches does not pay. Kept in a global, as quantized.py keeps its kernels:
    # an import statement costs ~1 µs even when done, and every layer asks.
    global _attention_kernel_module
    if _attention_kernel_module is None:
        from . import attention_kernels

        _attention_kernel_module = attention_kernels
    return _attention_kernel_module


_panel_kernel_module = None


@lru_cache(maxsize=1)
def _has_avx512() -> bool:
    """Whether this machine has AVX-512, which the panel kernels need: asked of llvmlite (~30 ms and ~40 MB to
    load) only where a program could use them, not of Numba (~200 ms)."""
    from llvmlite import binding

    return "avx512f" in binding.get_host_cpu_features()


def _panel_kernels():
    # Imported when a program that multiplies by panels is made, kept as the other kernels are.
    global _panel_kernel_module
    if _panel_kernel_module is None:
        from . import panel_kernels

        _panel_kernel_module = panel_kernels
    return _panel_kernel_module


_row_kernel_module = None


def _row_kernels():
    # Imported when a step first binds them, in a process that runs Numba already (see StepState).
    global _row_kernel_module
    if _row_kernel_module is None:
        from . import row_kernels

        _row_kernel_module = row_kernels
    return _row_kernel_module


def warm_up_step_kernels() -> None:
    """Compile (or load from Numba's cache) the paged attention and row kernels, on tiny arrays of the types a
    step passes, so that the first step that runs them (an engine's of several sequences, a quantised
    program's) does not pay for them, and load-and-compile times count it."""
    q = np.zeros((2, 1, 1), np.float32)
    pool = np.zeros((1, 1, 1), np.float32)
    kernels = _attention_kernels()
    for paged_attention in (kernels.paged_decode_attention, kernels.paged_decode_attention_threaded):
        paged_attention(q, pool, pool, np.zeros((2, 1), np.intp), np.ones(2, np.intp), 0, np.float32(1), q.copy())
    rows = _row_kernels()
    x, weight = np.zeros((1, 2), np.float32), np.zeros(2, np.float32)
    rows.rms_norm(x, weight, np.float32(1), x)
    weight.flags.writeable = False                   # weights mapped from a file are read-only
    rows.rms_norm(x, weight, np.float32(1), x)
    rows.swiglu(x, np.zeros((1, 1), np.float32))
    heads = np.zeros((1, 2, 2), np.float32)
    rows.rope(heads, x, heads)
    rows.rope(np.zeros((1, 3, 2), np.float32)[:, :2], x, heads)      # q or k: a strided view of q|k|v
    rows.write_rows(q, pool, np.zeros(2, np.intp))
    rows.write_rows(np.zeros((2, 1, 2), np.float32)[:, :, :1], pool, np.zeros(2, np.intp))   # a strided view


def _many_queries_attention(node: Node, q, k, v, out, scratch) -> None:
    """Prefill of one sequence: q [n, heads, head_dim] are its newest n positions, k, v [kv_heads, T, head_dim].

    Scores are kept transposed, [kv_heads, T, rows], so the softmax's max and sum run down columns of
    contiguous rows (vectorised) rather than along thousands of short rows. The scaled queries are gathered
    once into [kv_heads, head_dim, rows], so k·q is a plain (untransposed) product: with head_dim as small
    as 16, BLAS is 4x slower on a transposed operand."""
    seq, heads, head_dim = q.shape
    kv_heads, total, _ = k.shape
    group = heads // kv_heads
    rows = group * seq                      # query rows per kv head, ordered (group member, position)
    scale, window = np.float32(node.attrs["scale"]), node.attrs["window"]
    size = heads * seq * head_dim
    q_by_column = scratch[:size].reshape(kv_heads, head_dim, rows)
    q_source = q.reshape(seq, kv_heads, group, head_dim).transpose(1, 3, 2, 0)
    q_target = q_by_column.reshape(kv_heads, head_dim, group, seq)
    out_grouped = scratch[size:2 * size].reshape(kv_heads, rows, head_dim)
    out_source = out_grouped.reshape(kv_heads, group, seq, head_dim).transpose(2, 0, 1, 3)
    out_target = out.reshape(seq, kv_heads, group, head_dim)
    column_max = scratch[2 * size:2 * size + heads * seq].reshape(kv_heads, 1, rows)
    column_sum = scratch[2 * size + heads * seq:2 * size + 2 * heads * seq].reshape(kv_heads, 1, rows)
    scores = scratch[2 * size + 2 * heads * seq:][:kv_heads * total * rows].reshape(kv_heads, total, rows)
    np.multiply(q_source, scale, out=q_target)
    np.matmul(k, q_by_column, out=scores)
    by_group = scores.reshape(kv_heads, total, group, seq)
    np.add(by_group, _causal_mask(seq, total, window), out=by_group)
    np.maximum.reduce(scores, axis=1, keepdims=True, out=column_max)
    np.subtract(scores, column_max, out=scores)
    np.exp(scores, out=scores)
    np.matmul(_ones(total), scores, out=column_sum)
    np.matmul(scores.transpose(0, 2, 1), v, out=out_grouped)
    np.divide(out_grouped, column_sum.transpose(0, 2, 1), out=out_grouped)
    np.copyto(out_target, out_source)


@lru_cache(maxsize=8)
def _causal_mask(seq: int, total: int, window: int) -> np.ndarray:
    """[T, 1, S]: -inf where query i (at position total-seq+i) must not see key j (the future, or past the
    window), else 0. C-contiguous: adding a transposed mask is 5x slower than adding it in row order.
    Prefill chunks come at a few offsets, so a handful of masks cover a prompt."""
    query = np.arange(total - seq, total)[None, :]
    key = np.arange(total)[:, None]
    hidden = key > query
    if window > 0:
        hidden |= key <= query - window
    return np.where(hidden, np.float32(-np.inf), np.float32(0))[:, None, :]


@lru_cache(maxsize=4)
def _ones(total: int) -> np.ndarray:
    return np.ones((1, total), np.float32)
