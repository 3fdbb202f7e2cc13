"""The OpenAI request bodies, read into engine settings, and OpenAI-style errors.

Bodies are checked field by field so that a bad one is a 400 naming the field (`param`) and the value, as
OpenAI answers, never a traceback. Sampling follows OpenAI's defaults (temperature 1, top_p 1, nothing
else), not the command line's llama.cpp-like ones; `top_k`, `min_p`, `repetition_penalty` and `ignore_eos` are
accepted as extensions, as vLLM accepts them. So is speculative decoding, off unless a request asks for it:
`"speculate": "ngram"`, with `draft_max` and `ngram` optional (see generation.speculative).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

from ..errors import SamplingError
from ..generation.speculative import speculation_settings

MAX_CHOICES = 16
MAX_CHAT_LOGPROBS = 20         # top_logprobs, as OpenAI bounds it
MAX_COMPLETION_LOGPROBS = 5    # the legacy completions' logprobs
# OpenAI field -> the engine's setting, for the numbers both endpoints take.
NUMBER_FIELDS = {"temperature": "temperature", "top_p": "top_p", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty"}
INTEGER_FIELDS = {"top_k"}
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
SPECULATION_FIELDS = ("speculate", "draft_max", "ngram")    # extensions: prompt-lookup speculative decoding


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
    """What either endpoint asks for, ready for Engine.submit."""

    prompts: list                      # text, token ids, or (chat) message lists; one choice set each
    settings: dict = field(default_factory=dict)
    choices: int = 1
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None


def read_chat(body: Any, model_name: str) -> CompletionRequest:
    body = _object(body)
    _check_model(body, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string role and a string content",
                           f"messages[{i}]")
    request = _common(body, ("max_completion_tokens", "max_tokens"))
    request.prompts = [[{"role": m["role"], "content": m["content"]} for m in messages]]
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted not in (None, True, False):
        raise APIError(400, f"logprobs must be true or false, got {wanted!r}", "logprobs")
    if top is not None and not wanted:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if wanted:
        request.settings["logprobs"] = _count(top, "top_logprobs", MAX_CHAT_LOGPROBS)
    return request


def read_completion(body: Any, model_name: str) -> CompletionRequest:
    body = _object(body)
    _check_model(body, model_name)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise APIError(400, "prompt must be a string, a list of token ids, or a list of either", "prompt")
    if body.get("echo") or body.get("suffix") or body.get("best_of") not in (None, 1):
        raise APIError(400, "echo, suffix and best_of are not supported", "echo")
    request = _common(body, ("max_tokens",))
    request.prompts = prompts
    if body.get("logprobs") is not None:
        request.settings["logprobs"] = _count(body["logprobs"], "logprobs", MAX_COMPLETION_LOGPROBS)
    return request


def _common(body: dict, length_fields: tuple[str, ...]) -> CompletionRequest:
    settings = dict(OPENAI_DEFAULTS)
    for name, setting in NUMBER_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        kind = numbers.Integral if name in INTEGER_FIELDS else numbers.Real
        if not isinstance(value, kind) or isinstance(value, bool):
            raise APIError(400, f"{name} must be {'an integer' if kind is numbers.Integral else 'a number'}, "
                                f"got {value!r}", name)
        settings[setting] = value
    settings["max_new_tokens"] = _max_tokens(body, length_fields)
    settings.update(_speculation(body))
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
        settings["stop"] = stops
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63):
        raise APIError(400, f"seed must be an integer in [0, 2^63), got {seed!r}", "seed")
    choices = body.get("n", 1)
    if not isinstance(choices, int) or isinstance(choices, bool) or not 1 <= choices <= MAX_CHOICES:
        raise APIError(400, f"n must be an integer from 1 to {MAX_CHOICES}, got {choices!r}", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos")
    settings["ignore_eos"] = ignore_eos
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    return CompletionRequest([], settings, choices, stream, bool(options.get("include_usage")), seed)


def _speculation(body: dict) -> dict:
    """The speculation extension's fields, checked; a server speculates only from the text itself ("ngram")."""
    fields = {name: body[name] for name in SPECULATION_FIELDS if body.get(name) is not None}
    if fields.get("speculate", "ngram") != "ngram":
        raise APIError(400, f"speculate must be \"ngram\" (or absent), got {fields['speculate']!r}", "speculate")
    try:
        speculation_settings(**fields)
    except SamplingError as error:
        raise APIError(400, str(error), next(n for n in ("draft_max", "ngram", "speculate") if n in fields)) from None
    return fields


def _max_tokens(body: dict, length_fields: tuple[str, ...]) -> int:
    for name in length_fields:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise APIError(400, f"{name} must be a positive integer, got {value!r}", name)
        return value
    return 16 if length_fields == ("max_tokens",) else 512   # OpenAI's completions default; a chat reply's cap


def _count(value: Any, name: str, most: int) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
        raise APIError(400, f"{name} must be an integer from 0 to {most}, got {value!r}", name)
    return value


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_model(body: dict, model_name: str) -> None:
    requested = body.get("model")
    if not isinstance(requested, str):
        raise APIError(400, "model is required: the name GET /v1/models lists", "model")
    if requested != model_name:
        raise APIError(404, f"the model {requested!r} does not exist; this server serves {model_name!r}", "model",
                       code="model_not_found")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)
