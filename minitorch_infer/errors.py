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


class KVCacheFullError(ContextOverflowError):
    """The KV pool has no free block left for a sequence that must grow (the batched engine preempts instead)."""


class SamplingError(MinitorchError):
    """An invalid generation setting: sampling (negative temperature, top-p outside (0, 1], ...),
    max_new_tokens, stop strings or the prompt truncation policy."""


class PromptError(MinitorchError):
    """A prompt the model cannot run: no tokens at all, or a token id outside the vocabulary."""


class OutputExistsError(MinitorchError, FileExistsError):
    """The output folder of a conversion already holds files, which a conversion will not overwrite."""


class TemplateError(MinitorchError):
    """A chat template failed to render or tried something the sandbox forbids."""


def shown(value: object, limit: int = 80) -> str:
    """A value from a file, quoted for an error message and cut short: a corrupt file can put megabytes
    where a name or a number belongs, and the message should stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
