"""ModelConfig: the parts of an HF config.json the engine runs on, checked at load time.

A config the engine cannot run (unknown architecture, activation or rope type) is refused here, naming the
field and value, rather than producing wrong text later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFormatError, UnsupportedModelError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = {"default", "linear", "dynamic", "llama3"}
ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    layer_windows: tuple[int, ...] = ()       # per layer: how many positions a query sees (0 = all)
    rope_scaling: tuple = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    source: str = "<config>"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelFormatError(f"{path}: cannot read config: {error}") from None
        if not isinstance(raw, dict):
            raise ModelFormatError(f"{path}: config must be a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<config>") -> ModelConfig:
        fields = _ConfigFields(raw, source)
        architectures = fields.get("architectures", list, ["LlamaForCausalLM"])
        architecture = architectures[0] if architectures else None
        if architecture not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{source}: architectures = {architectures!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        family = ARCHITECTURES[architecture]
        hidden_act = fields.get("hidden_act", str, "silu")
        if hidden_act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act = {hidden_act!r} is not supported (only 'silu')")

        hidden = fields.positive_int("hidden_size")
        heads = fields.positive_int("num_attention_heads")
        kv_heads = fields.positive_int("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise ModelFormatError(
                f"{source}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}")
        head_dim = fields.positive_int("head_dim", default=hidden // heads if hidden % heads == 0 else None)
        if head_dim % 2:
            raise ModelFormatError(f"{source}: head_dim = {head_dim} must be even for rotary embeddings")

        layer_windows = _layer_windows(fields, family, fields.positive_int("num_hidden_layers"))
        attention_bias = fields.get("attention_bias", bool, False)
        eos = fields.get("eos_token_id", (int, list, type(None)), None)
        return cls(
            architecture=architecture,
            hidden_size=hidden,
            intermediate_size=fields.positive_int("intermediate_size"),
            num_layers=fields.positive_int("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=fields.positive_int("vocab_size"),
            rms_norm_eps=float(fields.get("rms_norm_eps", (int, float), 1e-6)),
            rope_theta=_rope_theta(raw, fields),
            max_position_embeddings=fields.positive_int("max_position_embeddings", default=2048),
            tie_word_embeddings=fields.get("tie_word_embeddings", bool, False),
            qkv_bias=attention_bias or family == "qwen2",
            o_bias=attention_bias and family == "llama",
            mlp_bias=fields.get("mlp_bias", bool, False),
            layer_windows=layer_windows,
            rope_scaling=_rope_scaling(raw, source, fields.positive_int("max_position_embeddings", default=2048)),
            bos_token_id=fields.get("bos_token_id", (int, type(None)), None),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            source=source,
            raw=raw,
        )


class _ConfigFields:
    """Typed access to config.json fields, with errors that name the file, field and value."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def get(self, key: str, types, default):
        value = self.raw.get(key, default)
        if value is None and default is not None:
            value = default
        if not isinstance(value, types) or (isinstance(value, bool) and types in (int, (int, float))):
            raise ModelFormatError(f"{self.source}: field {key!r} = {value!r} has the wrong type")
        return value

    def positive_int(self, key: str, default: int | None = None) -> int:
        if key not in self.raw or self.raw[key] is None:
            if default is None:
                raise ModelFormatError(f"{self.source}: required field {key!r} is missing")
            return default
        value = self.raw[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelFormatError(f"{self.source}: field {key!r} = {value!r} must be a positive integer")
        return value


def _layer_windows(fields: _ConfigFields, family: str, num_layers: int) -> tuple[int, ...]:
    """Per-layer sliding windows, as transformers reads them (0 = full attention)."""
    if family == "mistral":
        # MistralConfig's default is 4096 when the key is absent; null means no window.
        windows = [_window(fields)] * num_layers
    elif family == "qwen2" and fields.get("use_sliding_window", bool, False):
        # Only layers marked "sliding_attention" slide: by default those from max_window_layers on.
        window = _window(fields)
        first_sliding = fields.get("max_window_layers", int, 28)
        types = fields.get("layer_types", (list, type(None)), None) or [
            "sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)]
        if len(types) != num_layers or not set(types) <= {"sliding_attention", "full_attention"}:
            raise ModelFormatError(f"{fields.source}: layer_types = {types!r} must name one attention type per layer")
        windows = [window if kind == "sliding_attention" else 0 for kind in types]
    else:
        windows = [0] * num_layers      # Llama ignores any sliding_window key
    return tuple(windows)


def _window(fields: _ConfigFields) -> int:
    window = fields.raw.get("sliding_window", 4096)
    if window is None:
        return 0
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ModelFormatError(f"{fields.source}: sliding_window = {window!r} must be a positive integer or null")
    return window


def _rope_options(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The rope settings from either spelling: v4 `rope_scaling` (wins when non-empty) or v5 `rope_parameters`."""
    options = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(options, dict):
        raise ModelFormatError(f"{source}: rope_scaling = {options!r} must be an object or null")
    return options


def _rope_theta(raw: dict[str, Any], fields: _ConfigFields) -> float:
    theta = _rope_options(raw, fields.source).get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ModelFormatError(f"{fields.source}: rope_theta = {theta!r} must be a positive number")
    return float(theta)


def _rope_scaling(raw: dict[str, Any], source: str, max_position_embeddings: int) -> tuple:
    """rope scaling as sorted (key, value) pairs with a normalised 'rope_type'; () for none."""
    scaling = _rope_options(raw, source)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: rope_scaling type {rope_type!r} is not supported; supported: {', '.join(sorted(ROPE_TYPES))}")
    if rope_type == "default":
        return ()
    for key in ROPE_REQUIRED_KEYS[rope_type]:
        if key == "original_max_position_embeddings":
            continue
        if not isinstance(scaling.get(key), (int, float)) or isinstance(scaling.get(key), bool):
            raise ModelFormatError(f"{source}: rope_scaling[{key!r}] = {scaling.get(key)!r} must be a number")
    kept = {k: v for k, v in scaling.items()
            if k in ROPE_REQUIRED_KEYS[rope_type] and isinstance(v, (int, float))}
    kept["rope_type"] = rope_type
    if rope_type == "dynamic":
        # transformers scales from max_position_embeddings, whatever the dict says.
        kept["original_max_position_embeddings"] = max_position_embeddings
    else:
        kept.setdefault("original_max_position_embeddings", max_position_embeddings)
    return tuple(sorted(kept.items()))
