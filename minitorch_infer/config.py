"""ModelConfig: the parts of an HF config.json the engine runs on, checked at load time.

A config the engine cannot run (unknown architecture, activation or rope type) is refused here, naming the
field and value, rather than producing wrong text later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFormatError, UnsupportedModelError, shown

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = {"default", "linear", "dynamic", "llama3"}
LAYER_TYPES = ("sliding_attention", "full_attention")
# Released Llama-family models have at most ~130 layers. A count far past that is a corrupt file, and
# per-layer tables and the traced graph grow with it.
MAX_LAYERS = 10_000
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
        return cls.from_dict(read_json_object(path, "config"), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<config>") -> ModelConfig:
        fields = _ConfigFields(raw, source)
        architectures = fields.get("architectures", list, ["LlamaForCausalLM"])
        architecture = architectures[0] if architectures else None
        if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
            raise UnsupportedModelError(f"{source}: architectures = {shown(architectures)} is not supported; "
                                        f"supported: {', '.join(ARCHITECTURES)}")
        family = ARCHITECTURES[architecture]
        hidden_act = fields.get("hidden_act", str, "silu")
        if hidden_act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act = {shown(hidden_act)} is not supported (only 'silu')")

        hidden = fields.positive_int("hidden_size")
        heads = fields.positive_int("num_attention_heads")
        kv_heads = fields.positive_int("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise ModelFormatError(
                f"{source}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}")
        if hidden % heads and fields.raw.get("head_dim") is None:
            raise ModelFormatError(f"{source}: hidden_size = {hidden} does not split into num_attention_heads = "
                                   f"{heads} heads, and head_dim is missing")
        head_dim = fields.positive_int("head_dim", default=hidden // heads)
        if head_dim % 2:
            raise ModelFormatError(f"{source}: head_dim = {head_dim} must be even for rotary embeddings")

        num_layers = fields.positive_int("num_hidden_layers", limit=MAX_LAYERS)
        vocab_size = fields.positive_int("vocab_size")
        max_positions = fields.positive_int("max_position_embeddings", default=2048)
        attention_bias = fields.get("attention_bias", bool, False)
        return cls(
            architecture=architecture,
            hidden_size=hidden,
            intermediate_size=fields.positive_int("intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=vocab_size,
            rms_norm_eps=_finite(fields.get("rms_norm_eps", (int, float), 1e-6), "rms_norm_eps", source,
                                 minimum=0.0),
            rope_theta=_rope_theta(raw, fields),
            max_position_embeddings=max_positions,
            tie_word_embeddings=fields.get("tie_word_embeddings", bool, False),
            qkv_bias=attention_bias or family == "qwen2",
            o_bias=attention_bias and family == "llama",
            mlp_bias=fields.get("mlp_bias", bool, False),
            layer_windows=_layer_windows(fields, family, num_layers),
            rope_scaling=_rope_scaling(raw, source, max_positions),
            bos_token_id=_bos_token_id(fields, vocab_size),
            eos_token_ids=token_ids(fields.get("eos_token_id", (int, list, type(None)), None), vocab_size,
                                    f"{source}: eos_token_id"),
            source=source,
            raw=raw,
        )


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in the file at `path`: config.json and the other small JSON files of a model folder.
    `what` says what the file holds, for the error message."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        # ValueError: bad UTF-8, bad JSON, or an integer too long to convert; RecursionError: absurd nesting
        raise ModelFormatError(f"{path}: cannot read {what}: {error}") from None
    if not isinstance(document, dict):
        raise ModelFormatError(f"{path}: {what} must be a JSON object, got {type(document).__name__}")
    return document


def token_ids(ids: int | list | None, vocab_size: int, what: str) -> tuple[int, ...]:
    """An id, a list of ids or None (no ids) as a tuple, each checked to be a token id of the vocabulary.
    `what` names the file and field for the error message."""
    listed = [] if ids is None else ids if isinstance(ids, list) else [ids]
    if not all(_is_int(token_id) and 0 <= token_id < vocab_size for token_id in listed):
        raise ModelFormatError(f"{what} = {shown(ids)} must be token ids in 0..{vocab_size - 1}")
    return tuple(listed)


def _bos_token_id(fields: _ConfigFields, vocab_size: int) -> int | None:
    bos = fields.get("bos_token_id", (int, type(None)), None)
    return token_ids(bos, vocab_size, f"{fields.source}: bos_token_id")[0] if bos is not None else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: int | float, key: str, source: str, minimum: float) -> float:
    number = _as_finite_float(value)
    if number is None or number < minimum:
        raise ModelFormatError(f"{source}: {key} = {shown(value)} must be a finite number >= {minimum}")
    return number


def _as_finite_float(value: Any) -> float | None:
    """The value as a finite float; None for anything else: not a number, a bool, NaN, an infinity, or an
    integer too large for a float (JSON allows thousands of digits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class _ConfigFields:
    """Typed access to config.json fields, with errors that name the file, field and value."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def get(self, key: str, types, default):
        value = self.raw.get(key, default)
        if value is None and default is not None:
            value = default
        # bool is a subclass of int, but true where a number or an id belongs is a malformed file
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            raise ModelFormatError(f"{self.source}: field {key!r} = {shown(value)} has the wrong type")
        return value

    def positive_int(self, key: str, default: int | None = None, limit: int | None = None) -> int:
        if key not in self.raw or self.raw[key] is None:
            if default is None:
                raise ModelFormatError(f"{self.source}: required field {key!r} is missing")
            return default
        value = self.raw[key]
        if not _is_int(value) or value <= 0:
            raise ModelFormatError(f"{self.source}: field {key!r} = {shown(value)} must be a positive integer")
        if limit is not None and value > limit:
            raise ModelFormatError(f"{self.source}: field {key!r} = {value} is implausibly large (at most {limit})")
        return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


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
        if len(types) != num_layers or not all(kind in LAYER_TYPES for kind in types):
            raise ModelFormatError(
                f"{fields.source}: layer_types = {shown(types)} must name one attention type per layer "
                f"({' or '.join(LAYER_TYPES)})")
        windows = [window if kind == "sliding_attention" else 0 for kind in types]
    else:
        windows = [0] * num_layers      # Llama ignores any sliding_window key
    return tuple(windows)


def _window(fields: _ConfigFields) -> int:
    window = fields.raw.get("sliding_window", 4096)
    if window is None:
        return 0
    if not _is_int(window) or window <= 0:
        raise ModelFormatError(f"{fields.source}: sliding_window = {shown(window)} must be a positive integer or null")
    return window


def _rope_options(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The rope settings from either spelling: v4 `rope_scaling` (wins when non-empty) or v5 `rope_parameters`."""
    options = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(options, dict):
        raise ModelFormatError(f"{source}: rope_scaling = {shown(options)} must be an object or null")
    return options


def _rope_theta(raw: dict[str, Any], fields: _ConfigFields) -> float:
    theta = _rope_options(raw, fields.source).get("rope_theta", raw.get("rope_theta", 10000.0))
    number = _as_finite_float(theta)
    # Below 1 the rotation frequencies would grow along the head, which no model does; far below, they
    # overflow float32 and every logit becomes NaN.
    if number is None or number < 1:
        raise ModelFormatError(f"{fields.source}: rope_theta = {shown(theta)} must be a finite number >= 1")
    return number


def _rope_scaling(raw: dict[str, Any], source: str, max_position_embeddings: int) -> tuple:
    """rope scaling as sorted (key, value) pairs with a normalised 'rope_type'; () for none."""
    scaling = _rope_options(raw, source)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"{source}: rope_scaling type {shown(rope_type)} is not supported; "
                                    f"supported: {', '.join(sorted(ROPE_TYPES))}")
    if rope_type == "default":
        return ()
    kept = {}
    for key in ROPE_REQUIRED_KEYS[rope_type]:
        value = scaling.get(key)
        if key == "original_max_position_embeddings":
            if value is not None and not (_is_int(value) and value > 0):
                raise ModelFormatError(f"{source}: rope_scaling[{key!r}] = {shown(value)} must be a positive integer")
        elif key == "factor":
            # transformers' rule too: a smaller factor would shrink the context, a tiny one divides positions
            # into infinities
            if _as_finite_float(value) is None or value < 1:
                raise ModelFormatError(
                    f"{source}: rope_scaling['factor'] = {shown(value)} must be a finite number >= 1")
        elif _as_finite_float(value) is None or value <= 0:
            raise ModelFormatError(f"{source}: rope_scaling[{key!r}] = {shown(value)} must be a finite positive number")
        if value is not None:
            kept[key] = value
    kept["rope_type"] = rope_type
    if rope_type == "dynamic":
        # transformers scales from max_position_embeddings, whatever the dict says.
        kept["original_max_position_embeddings"] = max_position_embeddings
    else:
        kept.setdefault("original_max_position_embeddings", max_position_embeddings)
    return tuple(sorted(kept.items()))
