"""Model: a loaded model compiled into a program, with the calls users make (logits, generate, stream, chat).

compile() runs the whole pipeline: trace the architecture, run the passes (verifying after each), plan
memory, and bind the NumPy program. The KV cache is planned once per compile from the graph's states.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .architectures import architecture, build_graph
from .backends import numpy as numpy_backend
from .config import ModelConfig
from .errors import ContextOverflowError, MinitorchError, PromptError
from .ir import Graph
from .backends.layout import StepLayout
from .kv_cache import DEFAULT_BLOCK_SIZE, KVCache, KVSequence, parse_kv_memory
from .passes import DEFAULT_PASSES, PassManager, PassReport, quantize_weights
from .passes.memory_plan import MemoryPlan, plan_memory
from .quantized import weight_type
from .tokenizer import Tokenizer
from .formats.weights import WeightStore
from .engine import DEFAULT_MAX_BATCH_TOKENS, Engine
from .generation import loop
from .generation.loop import GenerationResult
from .generation.chat import Session

DEFAULT_PREFILL_CHUNK = 128
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_KV_CONTEXTS = 4          # without a KV budget, the pool holds this many full contexts
DEFAULT_MAX_BATCH = 32           # sequences in one step, at most


@dataclass
class CompiledGraph:
    """One traced-and-optimised graph with its memory plan and bound program."""

    graph: Graph
    plan: MemoryPlan
    program: numpy_backend.Program
    report: PassReport


class Model:
    """A loaded model compiled into a program: logits, generate, stream, chat, and batches of sequences.

    The KV cache is one paged pool (`kv_memory`: bytes, or a string such as "512MiB" or "8192tokens";
    default four full contexts' worth, committed only as it is written), shared by every generate call, chat
    session and batched request; `max_batch` bounds the sequences one step carries.

    `weight_type` is what the weights are computed from: "f32", "q8_0", "q4_0", "q4_1", or "native" (as the
    file stores them: a GGUF's Q8_0/Q4_x matrices stay quantised). The conversion is the `quantize_weights`
    pass, which every compile runs first.
    """

    def __init__(self, config: ModelConfig, weights: WeightStore, tokenizer: Tokenizer | None, source: str,
                 context: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 passes: Sequence[str] | None = None, memory_plan: bool = True, kv_memory: int | str | None = None,
                 kv_block_size: int = DEFAULT_BLOCK_SIZE, max_batch: int = DEFAULT_MAX_BATCH,
                 weight_type: str = "native"):
        self.config = config
        self.weight_pass = quantize_weights(weight_type)          # checks the name before any work
        self.weight_type = weight_type
        self.weights = weights
        self.tokenizer = tokenizer
        self.source = source
        self.context = context or min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        if self.context < 1:
            raise MinitorchError(f"context length must be positive, got {self.context}")
        self.prefill_chunk = min(prefill_chunk, self.context)
        if max_batch < 1:
            raise MinitorchError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.kv_block_size = kv_block_size
        self.kv_slots = self._kv_slots(kv_memory, kv_block_size)
        self._step_token = np.zeros(1, np.int64)
        self._step_position = np.zeros(1, np.int64)
        self._step_inputs = {"tokens": self._step_token, "positions": self._step_position}
        # Once, before any pass adds packed weights: the architecture puts the file's tensors in the layout its
        # graph reads, and then they must be exactly the params the config implies.
        prepare_weights = architecture(config.architecture).prepare_weights
        if prepare_weights is not None:
            prepare_weights(config, weights)
        weights.check_params(self.trace().params, config.source)
        self.compile(passes, memory_plan)

    def _kv_slots(self, kv_memory: int | str | None, block_size: int) -> int:
        """Positions the KV pool holds, from the budget, in whole blocks; refused if not one block fits."""
        c = self.config
        bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
        if kv_memory is None:                    # whole blocks, however short the context
            return -(-DEFAULT_KV_CONTEXTS * self.context // block_size) * block_size
        unit, amount = parse_kv_memory(kv_memory)
        tokens = amount if unit == "tokens" else amount // bytes_per_token
        blocks = tokens // block_size
        if blocks < 1:
            raise ContextOverflowError(
                f"KV memory {kv_memory!r} holds {tokens} positions ({bytes_per_token / 1024:.1f} KiB each), less than "
                f"one block of {block_size}")
        return blocks * block_size

    # --- compiling -------------------------------------------------------------------------------
    def compile(self, passes: Sequence[str] | None = None, memory_plan: bool = True) -> None:
        """(Re)build the program with the named passes (None: the architecture's defaults, normally
        passes.DEFAULT_PASSES; []: none), or pass functions.

        The KV cache is planned anew, so sessions and engines made before a recompile must be made again.
        """
        if passes is None:
            passes = architecture(self.config.architecture).passes or DEFAULT_PASSES
        self.passes = list(passes)
        self.memory_plan_enabled = memory_plan
        self._last = self._compile_graph(all_logits=False)
        self._all: CompiledGraph | None = None       # the every-position-logits program, built when first asked
        self.kv_cache = KVCache({n: v.type for n, v in self._last.graph.states.items()}, self.context,
                                self.kv_block_size)

    def trace(self, all_logits: bool = False) -> Graph:
        """A freshly traced, unoptimised graph of this model (what the passes start from)."""
        return build_graph(self.config, self.context, self.prefill_chunk, all_logits, self.kv_slots, self.max_batch)

    def _compile_graph(self, all_logits: bool) -> CompiledGraph:
        graph = self.trace(all_logits)
        graph, report = PassManager([self.weight_pass, *self.passes]).run(graph, self.weights)
        plan = plan_memory(graph, reuse=self.memory_plan_enabled)
        weights = report.weights(self.weights)
        # Handed over in panels, not copied into them by the program: the weights are then held once.
        for name in numpy_backend.params_held_in_panels(graph, weights):
            if name in report.derived:
                report.derived[name] = numpy_backend.in_panels(report.derived[name])
            else:
                self.weights.panelise(name)
        return CompiledGraph(graph, plan, numpy_backend.compile(graph, plan, weights), report)

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
        """Where each activation lives in the program's one arena (print it for the arena against the naive sum)."""
        return self._last.plan

    @property
    def pass_report(self) -> PassReport:
        """What each pass of the last compile did (print it: one aligned row per pass, with its notes)."""
        return self._last.report

    # --- running ---------------------------------------------------------------------------------
    def forward(self, sequence: KVSequence, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Run token_ids through the model after what `sequence` already holds, in prefill chunks.

        Returns the last position's logits [vocab] (a copy), or every position's [n, vocab] with all_logits.
        """
        ids = self._checked_ids(token_ids)
        sequence.reserve(len(ids))
        compiled = self._every_position() if all_logits else self._last
        rows = []
        for begin in range(0, len(ids), self.prefill_chunk):
            chunk = ids[begin:begin + self.prefill_chunk]
            start = sequence.length
            inputs = {"tokens": chunk, "positions": np.arange(start, start + len(chunk))}
            (logits,) = compiled.program.run(inputs, sequence.arrays, _layout([sequence], [len(chunk)]))
            sequence.advance(chunk)
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
        (logits,) = self._last.program.run(self._step_inputs, sequence.arrays, _layout((sequence,), (1,)))
        sequence.advance((token,))
        return logits[-1]

    def step(self, sequences: Sequence[KVSequence], token_ids: Sequence[Sequence[int]],
             logit_rows: Sequence[int] | None = None) -> np.ndarray:
        """One step over several sequences: token_ids[i] are sequence i's next tokens (a prefill chunk, one
        decode token, or a token and the guesses to verify), all run as the S rows of one graph. Returns logits
        [rows, vocab], a view the next step overwrites: for each sequence in order, its newest logit_rows[i]
        rows (default one; speculative decoding asks for every row it verifies). The rows wanted count
        against the model's max_batch. Each sequence must have room reserved for its tokens."""
        counts = [len(t) for t in token_ids]
        tokens = self._checked_ids([t for chunk in token_ids for t in chunk])
        if all(n == 1 for n in counts):                          # one token each (a decode step)
            positions = np.fromiter([s.length for s in sequences], np.int64, len(sequences))
        else:
            positions = np.concatenate([np.arange(s.length, s.length + n) for s, n in zip(sequences, counts)])
        if any(s.cache is not self.kv_cache for s in sequences):
            raise MinitorchError("a sequence from another KV cache: the model was recompiled since it was opened "
                                 "(open sequences, sessions and engines anew after compile())")
        if logit_rows is None or all(m == 1 for m in logit_rows):             # one row of logits each
            layout = _layout(sequences, counts)
        else:
            layout = _layout_with_rows(sequences, counts, logit_rows)
        (logits,) = self._last.program.run({"tokens": tokens, "positions": positions}, self.kv_cache.arrays, layout)
        for sequence, chunk in zip(sequences, token_ids):
            sequence.advance(chunk)
        return logits

    def _checked_ids(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size == 0:
            raise PromptError("no tokens to run: the prompt is empty")
        # A batched decode step's few ids: Python's min and max cost less than NumPy's reductions.
        low, high = (min(token_ids), max(token_ids)) if len(ids) <= 64 else (ids.min(), ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.config.vocab_size)][0])
            raise PromptError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids

    def _every_position(self) -> CompiledGraph:
        if self._all is None:
            self._all = self._compile_graph(all_logits=True)
        return self._all

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits [len(token_ids), vocab] (float32) of every position, from an empty sequence, which is then
        closed (its full blocks stay registered, so a later prompt that starts the same can reuse them)."""
        if len(token_ids) > self.context:
            raise ContextOverflowError(f"{len(token_ids)} tokens exceed the context length {self.context}")
        sequence = self.kv_cache.open()
        try:
            return self.forward(sequence, token_ids, all_logits=True)
        finally:
            sequence.close()

    def encode(self, prompt: str | Sequence[int], add_bos: bool | None = None) -> list[int]:
        """Token ids of a prompt: text is encoded with the model's tokenizer; a list of ids is taken as it is.

        BOS: with add_bos=None (the default) text gets a BOS first exactly when the model's tokenizer adds one
        (the story model's does; SmolLM2's does not: its tokenizer_config has no add_bos_token, and its chat
        template starts each turn with <|im_start|> instead); ids are left alone. add_bos=True puts the
        model's BOS first (once) on text and ids alike; add_bos=False encodes text without any special tokens.
        """
        if not isinstance(prompt, str) and any(isinstance(t, str) for t in prompt):
            raise PromptError("a prompt is a string or a list of token ids; for several prompts use generate_batch")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError(f"{self.source} has no tokenizer.json: pass token ids, not text")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_bos is not False)
        else:
            ids = [int(t) for t in prompt]
        if add_bos and (not ids or ids[0] != self.config.bos_token_id):
            if self.config.bos_token_id is None:
                raise PromptError(f"add_bos=True, but {self.config.source} names no bos_token_id")
            ids = [self.config.bos_token_id] + ids
        return ids

    def generate(self, prompt: str | Sequence[int], **settings):
        """Generate a continuation of a prompt (text, or a list of token ids; BOS as `encode` says, add_bos=
        to choose); returns a GenerationResult (new tokens only, and the prompt's ids). Settings (see
        generation.loop.start): max_new_tokens, stop, ignore_eos, greedy, temperature, top_k, top_p, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, seed, truncate_prompt, logprobs, add_bos."""
        return loop.generate(self, prompt, **settings)

    def stream(self, prompt: str | Sequence[int], **settings) -> Iterator[str]:
        """Yield the continuation's text as it is produced; the pieces join to the final text."""
        return loop.stream(self, prompt, **settings)

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                       **settings) -> list[GenerationResult]:
        """Generate a continuation of every prompt, many sequences per step (continuous batching); settings
        as generate's, shared by all. Each result equals what generate gives that prompt alone (a seeded
        sampled request too). Returns the results in the prompts' order."""
        if isinstance(prompts, str):
            raise PromptError("generate_batch takes a list of prompts; for one prompt use generate")
        engine = self.engine(max_batch_tokens)
        handles = [engine.submit(prompt, **settings) for prompt in prompts]
        engine.run()
        return [handle.result() for handle in handles]

    def engine(self, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> Engine:
        """A batched engine over this model, for concurrent use: `submit(prompt, **settings)` returns a handle
        to stream, wait on or cancel; `start()` steps it on a background thread (see engine.Engine)."""
        return Engine(self, max_batch_tokens)

    def chat(self, system: str | None = None) -> Session:
        """A chat Session: keeps its KV cache across turns (see minitorch_infer.generation.chat.Session)."""
        return Session(self, system=system)

    def weight_summary(self) -> str:
        """The weights' size and types as computed from: "107.4 MiB (210 q4_1, 61 f32, 1 q8_0 tensors)"."""
        types = Counter(weight_type(self.weights[name]) for name in self.trace().params)
        listed = ", ".join(f"{count} {kind}" for kind, count in types.most_common())
        return f"{self.weights.nbytes / 2**20:.1f} MiB ({listed} tensors)"

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({self.source}: {c.architecture}, {c.num_layers} layers, hidden {c.hidden_size}, "
                f"heads {c.num_heads}/{c.num_kv_heads}, vocab {c.vocab_size}, context {self.context})")


def _layout(sequences: Sequence[KVSequence], new_tokens: Sequence[int]) -> StepLayout:
    """The layout of a step in which sequence i (room already reserved) gets new_tokens[i] more positions."""
    if len(sequences) == 1 and sequences[0].run_start is not None:
        return StepLayout.single(new_tokens[0], sequences[0].length + new_tokens[0], sequences[0].run_start)
    if all(n == 1 for n in new_tokens):
        return _decode_layout(sequences)
    return StepLayout.of(new_tokens, [s.slots(s.length + n) for s, n in zip(sequences, new_tokens)],
                         [s.run_start for s in sequences])


def _decode_layout(sequences: Sequence[KVSequence]) -> StepLayout:
    """A step of one new token per sequence: its padded slots are the sequences' rows of the cache's slot table,
    taken in one call."""
    totals = [sequence.length + 1 for sequence in sequences]
    padded = sequences[0].cache.slot_rows(sequences, max(totals))
    return StepLayout.decode(totals, [sequence.run_start for sequence in sequences], padded)


def _layout_with_rows(sequences: Sequence[KVSequence], new_tokens: Sequence[int], logit_rows: Sequence[int]
                      ) -> StepLayout:
    """A step's layout in which sequence i's newest logit_rows[i] rows each get their logits.

    The graph gives one logits row per sequence of the layout (its newest), so a sequence that wants m rows
    enters the layout as m parts over the same slots: its first n - m + 1 new rows, then each later row
    alone, every part seeing the positions up to its own. Each row thus attends exactly as it would have in
    a step of its own, and kv_write stores the rows where the sequence's next positions live."""
    parts, slots, starts = [], [], []
    for sequence, n, m in zip(sequences, new_tokens, logit_rows):
        if not 1 <= m <= n:
            raise ValueError(f"a sequence with {n} new rows can give logits for 1..{n} of them, not {m}")
        first_total = sequence.length + n - m + 1
        parts += [n - m + 1] + [1] * (m - 1)
        slots += [sequence.slots(total) for total in range(first_total, sequence.length + n + 1)]
        starts += [sequence.run_start] * m
    return StepLayout.of(parts, slots, starts)
