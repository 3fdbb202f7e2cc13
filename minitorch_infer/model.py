"""Model: a loaded model compiled into a program, with the calls users make (logits, generate, stream, chat).

compile() runs the whole pipeline: trace the architecture, run the passes (verifying after each), plan
memory, and bind the NumPy program. The KV cache is planned once per compile from the graph's states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .architectures import build_graph, rope_pair_order
from .backends import numpy as numpy_backend
from .config import ModelConfig
from .errors import ContextOverflowError, MinitorchError, PromptError
from .ir import Graph
from .kv_cache import KVCache, KVSequence
from .passes import DEFAULT_PASSES, PassManager, PassReport
from .passes.memory_plan import MemoryPlan, plan_memory
from .tokenizer import Tokenizer
from .formats.weights import WeightStore
from .generation import loop
from .generation.chat import Session

DEFAULT_PREFILL_CHUNK = 128
DEFAULT_MAX_CONTEXT = 4096


@dataclass
class CompiledGraph:
    """One traced-and-optimised graph with its memory plan and bound program."""

    graph: Graph
    plan: MemoryPlan
    program: numpy_backend.Program
    report: PassReport


class Model:
    def __init__(self, config: ModelConfig, weights: WeightStore, tokenizer: Tokenizer | None, source: str,
                 context: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_sequences: int = 4,
                 passes: Sequence[str] | None = None, memory_plan: bool = True, kv_budget_bytes: int | None = None):
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.source = source
        self.context = context or min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        if self.context < 1:
            raise MinitorchError(f"context length must be positive, got {self.context}")
        self.prefill_chunk = min(prefill_chunk, self.context)
        self._step_token = np.zeros(1, np.int64)
        self._step_position = np.zeros(1, np.int64)
        self._step_inputs = {"tokens": self._step_token, "positions": self._step_position}
        self.max_sequences = max_sequences
        self.kv_budget_bytes = kv_budget_bytes
        # Once, before any pass adds packed weights: the file's tensors are exactly what the config implies.
        weights.check_params(self.trace().params, config.source)
        rope_pair_order(config, weights)
        self.compile(passes, memory_plan)

    # --- compiling -------------------------------------------------------------------------------
    def compile(self, passes: Sequence[str] | None = None, memory_plan: bool = True) -> None:
        """(Re)build the program with the named passes (None: the defaults; []: none), or pass functions.

        The KV cache is planned anew, so sessions opened before a recompile must be opened again.
        """
        self.passes = list(DEFAULT_PASSES if passes is None else passes)
        self.memory_plan_enabled = memory_plan
        self._last = self._compile_graph(all_logits=False)
        self._all: CompiledGraph | None = None       # the every-position-logits program, built when first asked
        self.kv_cache = KVCache({n: v.type for n, v in self._last.graph.states.items()}, self.max_sequences,
                                self.kv_budget_bytes)

    def trace(self, all_logits: bool = False) -> Graph:
        """A freshly traced, unoptimised graph of this model (what the passes start from)."""
        return build_graph(self.config, self.context, self.prefill_chunk, all_logits)

    def _compile_graph(self, all_logits: bool) -> CompiledGraph:
        graph = self.trace(all_logits)
        graph, report = PassManager(self.passes).run(graph, self.weights)
        plan = plan_memory(graph, reuse=self.memory_plan_enabled)
        return CompiledGraph(graph, plan, numpy_backend.compile(graph, plan, self.weights), report)

    @property
    def graph(self) -> Graph:
        """The compiled (optimised) graph used for generation."""
        return self._last.graph

    @property
    def program(self) -> numpy_backend.Program:
        """The bound NumPy program used for generation."""
        return self._last.program

    @property
    def memory_plan(self) -> MemoryPlan:
        return self._last.plan

    @property
    def pass_report(self) -> PassReport:
        return self._last.report

    # --- running ---------------------------------------------------------------------------------
    def forward(self, sequence: KVSequence, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Run token_ids through the model after what `sequence` already holds, in prefill chunks.

        Returns the last position's logits [vocab] (a copy), or every position's [n, vocab] with all_logits.
        """
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size == 0:
            raise PromptError("no tokens to run: the prompt is empty")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.config.vocab_size)][0])
            raise PromptError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        sequence.reserve(len(ids))
        compiled = self._every_position() if all_logits else self._last
        rows = []
        for begin in range(0, len(ids), self.prefill_chunk):
            chunk = ids[begin:begin + self.prefill_chunk]
            start = sequence.length
            inputs = {"tokens": chunk, "positions": np.arange(start, start + len(chunk))}
            (logits,) = compiled.program.run(inputs, sequence.arrays, total=start + len(chunk))
            sequence.advance(len(chunk))
            if all_logits:
                rows.append(logits.copy())
        return np.concatenate(rows) if all_logits else logits[-1].copy()

    def decode_step(self, sequence: KVSequence, token: int) -> np.ndarray:
        """One generated token through the model: the lean per-token path. Returns logits [vocab], a view
        into the program's output buffer that the next step overwrites."""
        sequence.reserve(1)
        start = sequence.length
        self._step_token[0] = token
        self._step_position[0] = start
        (logits,) = self._last.program.run(self._step_inputs, sequence.arrays, total=start + 1)
        sequence.advance(1)
        return logits[-1]

    def _every_position(self) -> CompiledGraph:
        if self._all is None:
            self._all = self._compile_graph(all_logits=True)
        return self._all

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits [len(token_ids), vocab] (float32) of every position, from an empty cache; keeps no state."""
        if len(token_ids) > self.context:
            raise ContextOverflowError(f"{len(token_ids)} tokens exceed the context length {self.context}")
        sequence = self.kv_cache.open()
        try:
            return self.forward(sequence, token_ids, all_logits=True)
        finally:
            sequence.close()

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError(f"{self.source} has no tokenizer.json: pass token ids, not text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompt: str | Sequence[int], **settings):
        """Generate a continuation; returns a GenerationResult (new tokens only). See generation.loop.start."""
        return loop.generate(self, prompt, **settings)

    def stream(self, prompt: str | Sequence[int], **settings) -> Iterator[str]:
        """Yield the continuation's text as it is produced; the pieces join to the final text."""
        return loop.stream(self, prompt, **settings)

    def chat(self, system: str | None = None) -> Session:
        """A chat Session: keeps its KV cache across turns (see minitorch_infer.generation.chat.Session)."""
        return Session(self, system=system)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({self.source}: {c.architecture}, {c.num_layers} layers, hidden {c.hidden_size}, "
                f"heads {c.num_heads}/{c.num_kv_heads}, vocab {c.vocab_size}, context {self.context})")
