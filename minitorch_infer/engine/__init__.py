"""Many sequences at once: the scheduler (continuous batching over the paged KV cache, chunked prefill,
preemption) and the engine that runs its steps and streams each request's text back."""

from .engine import DEFAULT_MAX_BATCH_TOKENS, Engine, RequestHandle

__all__ = ["Engine", "RequestHandle", "DEFAULT_MAX_BATCH_TOKENS"]
