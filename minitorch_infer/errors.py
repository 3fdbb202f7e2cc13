"""The error types users see. Each message names the file, field, tensor or flag and the wrong value.

Every error the engine raises on bad input derives from MinitorchError, so a caller (or the CLI) can
catch one type and print one line.
"""


class MinitorchError(Exception):
    """Base of every error this package raises on purpose."""


class ModelFormatError(MinitorchError):
    """A model file (safetensors, GGUF, config.json, tokenizer file) is malformed or inconsistent."""


class UnsupportedModelError(MinitorchError):
    """A well-formed model that this engine cannot run (architecture, activation, rope type, tensor type)."""


class ModelNotFoundError(MinitorchError):
    """No model file or directory at the path or name given."""


class TraceError(MinitorchError):
    """An architecture function did something a graph cannot record (e.g. branch on a traced value)."""


class GraphError(MinitorchError):
    """An invalid graph: found by the verifier, by a pass, or by a backend at compile time."""


class ContextOverflowError(MinitorchError):
    """A request needs more positions or KV-cache memory than were planned."""


class SamplingError(MinitorchError):
    """An invalid sampling setting (negative temperature, top-p outside (0, 1], ...)."""


class TemplateError(MinitorchError):
    """A chat template failed to render or tried something the sandbox forbids."""
