"""The architecture registry: which graph function (and config reader and weight names) serves a model.

`load()` reads config.json's `architectures[0]` (e.g. "LlamaForCausalLM") and looks it up here. Registering
an architecture is how a model family from outside the package becomes loadable by `load()`, the CLI and
the server:

    from minitorch_infer.architectures import register_architecture

    @register_architecture("GPT2LMHeadModel", config=gpt2_config, tensor_name=gpt2_tensor_name)
    def gpt2(tokens, positions, *, config, total, sequences, cache_slots, all_logits):
        ...   # plain Python over minitorch_infer.ir.functional ops; returns logits [S or R, vocab]

docs/extending.md walks through a whole one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..config import ModelConfig
from ..errors import GraphError, ModelFormatError, UnsupportedModelError, shown
from ..formats.weights import canonical_name

ConfigReader = Callable[[dict[str, Any], str], ModelConfig]
TensorNamer = Callable[[str], "str | None"]
WeightPreparer = Callable[[ModelConfig, Any], None]


@dataclass(frozen=True)
class Architecture:
    """How to run one HF architecture name.

    - `build(tokens, positions, *, config, total, sequences, cache_slots, all_logits) -> logits`: the graph
      function, traced with tokens and positions i32[S]; it returns logits f32[R, vocab] (each sequence's newest
      row, `F.last_row(x, sequences)`) or, with all_logits, f32[S, vocab]. `total` is T, a sequence's past + new
      positions (for kv_write); `cache_slots` the KV pool's positions (each cache state is [kv_heads,
      cache_slots, head_dim]).
    - `config(raw, source) -> ModelConfig`: config.json's dict to a ModelConfig; fields the function needs
      beyond ModelConfig's stay in `config.raw`.
    - `tensor_name(file_name) -> name | None`: a tensor's name in the safetensors file to the param name the
      function declares (None: ignore the tensor). Params of layer i should start `layers.{i}.`.
    - `prepare_weights(config, weights)`: run once when the model is built, before every param is checked
      against the traced graph: change a tensor's layout (`weights.convert`), stack per-expert tensors, reorder
      rows. Model.weights then holds exactly the graph's params.
    - `family`: a short name for the graph's name ("llama", "gpt2").
    - `passes`: the pipeline Model.compile runs when none is named (None: passes.DEFAULT_PASSES), e.g. the
      defaults plus a pass of the plugin's own.
    """

    name: str
    build: Callable[..., Any]
    config: ConfigReader = ModelConfig.from_dict
    tensor_name: TensorNamer = canonical_name
    prepare_weights: WeightPreparer | None = None
    family: str = ""
    passes: tuple[str, ...] | None = None


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(name: str, *, config: ConfigReader = ModelConfig.from_dict,
                          tensor_name: TensorNamer = canonical_name, prepare_weights: WeightPreparer | None = None,
                          family: str | None = None, passes: Sequence[str] | None = None, replace: bool = False):
    """Decorator: make the graph function serve config.json's `architectures = [name]` (see Architecture for
    what each argument is). Registering a name twice is an error unless `replace=True`."""

    def register(build: Callable[..., Any]) -> Callable[..., Any]:
        if name in ARCHITECTURES and not replace and ARCHITECTURES[name].build is not build:
            raise GraphError(f"architecture {name!r} is already registered (by "
                             f"{ARCHITECTURES[name].build.__module__}); pass replace=True to override it")
        ARCHITECTURES[name] = Architecture(name, build, config, tensor_name, prepare_weights,
                                           family or name.removesuffix("ForCausalLM").lower(),
                                           None if passes is None else tuple(passes))
        return build

    return register


def architecture(name: str) -> Architecture:
    """The registered architecture for an HF architecture name; UnsupportedModelError naming the known ones."""
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {shown(name)} is not registered; registered: "
                                    f"{', '.join(sorted(ARCHITECTURES))} (a plugin can register more: see "
                                    "docs/extending.md)")
    return ARCHITECTURES[name]


def architecture_of(raw: dict[str, Any], source: str) -> Architecture:
    """The architecture config.json names (`architectures[0]`; LlamaForCausalLM when absent, as before)."""
    names = raw.get("architectures", ["LlamaForCausalLM"])
    if names is None:
        names = ["LlamaForCausalLM"]
    if not isinstance(names, list):
        raise ModelFormatError(f"{source}: field 'architectures' = {shown(names)} has the wrong type")
    name = names[0] if names else None
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise UnsupportedModelError(f"{source}: architectures = {shown(names)} is not supported; supported: "
                                    f"{', '.join(ARCHITECTURES)} (a plugin can register more: see docs/extending.md)")
    return ARCHITECTURES[name]


def read_config(raw: dict[str, Any], source: str) -> ModelConfig:
    """config.json's dict as a ModelConfig, by the reader of the architecture it names."""
    return architecture_of(raw, source).config(raw, source)
