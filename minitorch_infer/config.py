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
    sliding_window: int | None = None
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

        sliding_window = None
        if family == "mistral":
            sliding_window = fields.get("sliding_window", (int, type(None)), None)
        elif family == "qwen2" and fields.get("use_sliding_window", bool, False):
            raise UnsupportedModelError(f"{source}: use_sliding_window = true is not supported for Qwen2")
        if sliding_window is not None and sliding_window <= 0:
            raise ModelFormatError(f"{source}: sliding_window = {sliding_window} must be positive")

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
            rope_theta=float(fields.get("rope_theta", (int, float), 10000.0)),
            max_position_embeddings=fields.positive_int("max_position_embeddings", default=2048),
            tie_word_embeddings=fields.get("tie_word_embeddings", bool, False),
            qkv_bias=attention_bias or family == "qwen2",
            o_bias=attention_bias and family == "llama",
            mlp_bias=fields.get("mlp_bias", bool, False),
            sliding_window=sliding_window,
            rope_scaling=_rope_scaling(raw.get("rope_scaling"), source, fields.positive_int("max_position_embeddings", default=2048)),
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


def _rope_scaling(scaling: Any, source: str, max_position_embeddings: int) -> tuple:
    """rope_scaling as sorted (key, value) pairs with a normalised 'rope_type'; () for none."""
    if scaling is None:
        return ()
    if not isinstance(scaling, dict):
        raise ModelFormatError(f"{source}: rope_scaling = {scaling!r} must be an object or null")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: rope_scaling type {rope_type!r} is not supported; supported: {', '.join(sorted(ROPE_TYPES))}")
    for key in ROPE_REQUIRED_KEYS.get(rope_type, ()):
        if not isinstance(scaling.get(key), (int, float)) or isinstance(scaling.get(key), bool):
            raise ModelFormatError(f"{source}: rope_scaling[{key!r}] = {scaling.get(key)!r} must be a number")
    kept = {k: v for k, v in scaling.items() if k not in ("type", "rope_type") and isinstance(v, (int, float))}
    kept["rope_type"] = rope_type
    if rope_type == "dynamic":
        # NTK scaling starts past the trained context; HF takes it from max_position_embeddings.
        kept.setdefault("original_max_position_embeddings", max_position_embeddings)
    if rope_type == "default":
        return ()
    return tuple(sorted(kept.items()))
