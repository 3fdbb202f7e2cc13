"""Chat templates: turn a list of chat messages into the prompt text a model was trained on.

A template is Jinja2 source shipped with the model (tokenizer_config.json, or the GGUF field
`tokenizer.chat_template`). It is foreign code, so it runs in Jinja's immutable sandbox, set up as
transformers sets it up (same options, globals and `tojson` filter) so that a template renders the
same text here as with `tokenizer.apply_chat_template`. On top of that sandbox, anything a template
does that the sandbox forbids, or any other failure, ends in one error type: TemplateError.

The sandbox stops a template from reaching Python internals, files or the caller's data. It is not a
resource limit: the obvious one-line blow-ups (`range`, `*`, `**`) are capped, but a loop that keeps
doubling a string can still use a lot of time and memory.
"""

from datetime import datetime
import json
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment
from jinja2.utils import missing

from ..errors import TemplateError

# The ChatML format, used when a model ships no template (as transformers' docs suggest).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The file name Jinja gives compiled template code; frames with it carry template line numbers.
_JINJA_TEMPLATE_FILENAME = "<template>"

# Largest int a template may build with `**`; far beyond anything a chat template computes.
_MAX_POWER_BITS = 4096


class _TemplateRaised(Exception):
    """Raised by the template's own `raise_exception(msg)`; its message is the template author's."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _strftime_now(format: str) -> str:  # `format`, as in transformers, for templates that pass it by name
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Replaces Jinja's own tojson, which HTML-escapes `<`, `>`, `&` and `'` and takes only `indent`;
    # templates are written against transformers' version, which is plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _RefuseDunderUndefined(jinja2.Undefined):
    """An undefined value, except that naming a dunder (`__builtins__`, `__import__`) is refused.

    A plain Undefined would render such a probe as an empty string; no honest template needs one.
    """

    def __init__(self, hint: str | None = None, obj: Any = missing, name: str | None = None,
                 exc: type[jinja2.TemplateError] = UndefinedError) -> None:
        if name is not None and name.startswith("__"):
            raise SecurityError(f"access to {name!r} is unsafe")
        super().__init__(hint, obj, name, exc)


class _NoTemplateLoader(jinja2.BaseLoader):
    """Refuses `{% include %}`, `{% import %}` and `{% extends %}`: a chat template is one string."""

    def get_source(self, environment: jinja2.Environment, template: str) -> NoReturn:
        raise SecurityError(f"a chat template cannot load other templates (asked for {template!r})")


class _GenerationTagIgnored(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` and renders the body unchanged.

    Some templates mark the assistant's text this way for transformers' training masks; without the
    tag they would not even compile.
    """

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _ChatTemplateSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with unsafe access failing at once and big `*` / `**` results refused."""

    # Intercepting these also keeps Jinja from folding `'a' * 10**10` into a constant at compile time.
    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        # Jinja returns an Undefined here, which renders as "" and lets a probe pass silently.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _check_repetition(left, right)
            _check_repetition(right, left)
        elif isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left).bit_length() * right > _MAX_POWER_BITS:
                raise SecurityError(f"{left} ** {right} is too big (the sandbox allows {_MAX_POWER_BITS} bits)")
        return super().call_binop(context, operator, left, right)


def _check_repetition(sequence: Any, count: Any) -> None:
    """Refuse `sequence * count` when it would be longer than Jinja allows a range to be."""
    if isinstance(sequence, (str, list, tuple)) and isinstance(count, int) and count > 1:
        if len(sequence) * count > MAX_RANGE:
            raise SecurityError(f"repeating a {type(sequence).__name__} of length {len(sequence)} {count} times "
                                f"is too big (the sandbox allows {MAX_RANGE} items)")


def _make_environment() -> _ChatTemplateSandbox:
    env = _ChatTemplateSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTagIgnored],
        loader=_NoTemplateLoader(),
        undefined=_RefuseDunderUndefined,
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    # lipsum(n) builds n paragraphs of filler: useless to a chat template, and a way to exhaust memory.
    del env.globals["lipsum"]
    return env


def _template_line(exc: BaseException) -> int | None:
    """The template line an exception was raised from (Jinja rewrites tracebacks to point at it)."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _JINJA_TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _check_messages(messages: Any) -> None:
    """Raise TemplateError unless messages is a list of {"role": str, "content": str | list, ...} dicts."""
    if not isinstance(messages, (list, tuple)):
        raise TemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TemplateError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        for field, allowed in (("role", (str,)), ("content", (str, list))):
            if field not in message:
                raise TemplateError(f"messages[{index}] has no {field!r}")
            if not isinstance(message[field], allowed):
                kinds = " or ".join(kind.__name__ for kind in allowed)
                raise TemplateError(f"messages[{index}][{field!r}] must be {kinds}, "
                                    f"got {type(message[field]).__name__}")


class ChatTemplate:
    """A compiled chat template: `render(messages)` gives the prompt text."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "",
                 origin: str = "<template>") -> None:
        """Compile `source` (ChatML if None); `origin` says where it came from, for error messages."""
        self.origin = origin
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._is_fallback = source is None
        self.source = CHATML_TEMPLATE if source is None else source
        try:
            self._template = _make_environment().from_string(self.source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"chat template from {origin}, line {exc.lineno}: {exc.message}") from exc
        except Exception as exc:  # e.g. RecursionError from a deeply nested expression
            raise TemplateError(f"chat template from {origin}: {type(exc).__name__}: {exc}") from exc

    @property
    def is_fallback(self) -> bool:
        """True when the model shipped no template and ChatML is used instead."""
        return self._is_fallback

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render the conversation; `extra` are further template variables (`tools`, `documents`, ...)."""
        _check_messages(messages)
        reserved = {"bos_token", "eos_token"} & extra.keys()
        if reserved:
            raise TemplateError(f"{sorted(reserved)} are set from the tokenizer, not passed to render()")
        # transformers always passes tools and documents, so templates may test `tools is not none`.
        variables = {"tools": None, "documents": None, **extra}
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **variables,
            )
        except Exception as exc:  # a template is foreign code: any failure in it is a template error
            raise TemplateError(self._describe_failure(exc)) from exc

    def _describe_failure(self, exc: Exception) -> str:
        line = _template_line(exc)
        where = f"chat template from {self.origin}" + (f", line {line}" if line is not None else "")
        if isinstance(exc, _TemplateRaised):
            return f"{where}: the template raised: {exc}"
        if isinstance(exc, SecurityError):
            return f"{where}: refused by the sandbox: {exc}"
        return f"{where}: {type(exc).__name__}: {exc}"
