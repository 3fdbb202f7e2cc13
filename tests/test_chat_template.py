"""Tests for chat templates: real-model output, the ChatML fallback, the sandbox, and error messages."""

import builtins
import copy
from datetime import datetime
import json
import os
from pathlib import Path

import pytest

from minitorch_infer.generation.chat_template import CHATML_TEMPLATE, ChatTemplate
from minitorch_infer.errors import ModelNotFoundError, TemplateError
from minitorch_infer.formats.model_files import find_model

PROMPTS_JSON = Path(__file__).resolve().parent / "fixtures" / "reference" / "prompts.json"
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _missing(reason: str) -> None:
    """Skip a test whose model or reference file is absent, or fail it when MINITORCH_REQUIRE_MODELS=1."""
    if os.environ.get("MINITORCH_REQUIRE_MODELS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def smollm2_template() -> ChatTemplate:
    import gguf

    try:
        path = find_model("smollm2-135m-instruct")
    except ModelNotFoundError as exc:
        _missing(str(exc))
    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    # GGUF stores a string as a uint8 array in the part that data[0] points at.
    source = bytes(field.parts[field.data[0]]).decode("utf-8")
    return ChatTemplate(source, origin=f"{path} tokenizer.chat_template")


# --- real template -------------------------------------------------------------------------------


def test_smollm2_template_matches_transformers_reference(smollm2_template: ChatTemplate) -> None:
    expected = json.loads(PROMPTS_JSON.read_text())["smollm2"]["short_text"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert smollm2_template.render(messages, add_generation_prompt=True) == expected
    assert not smollm2_template.is_fallback


def test_smollm2_template_adds_its_system_prompt_only_when_none_given(smollm2_template: ChatTemplate) -> None:
    with_system = smollm2_template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=False,
    )
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert SMOLLM2_DEFAULT_SYSTEM in smollm2_template.render([{"role": "user", "content": "Hi"}])


# --- ChatML fallback ------------------------------------------------------------------------------

TWO_TURNS = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there!"},
]
TWO_TURNS_CHATML = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n"


def test_chatml_fallback_renders_known_text() -> None:
    template = ChatTemplate(None)
    assert template.is_fallback
    assert template.render(TWO_TURNS, add_generation_prompt=False) == TWO_TURNS_CHATML
    assert template.render(TWO_TURNS, add_generation_prompt=True) == TWO_TURNS_CHATML + "<|im_start|>assistant\n"


def test_a_shipped_template_is_not_the_fallback_even_if_it_is_chatml() -> None:
    assert not ChatTemplate(CHATML_TEMPLATE).is_fallback


# --- the globals, filters and variables transformers provides --------------------------------------


def test_whitespace_control_and_loop_controls_match_transformers() -> None:
    # trim_blocks drops the newline after a tag, lstrip_blocks the indentation before it.
    source = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'assistant' %}\n"
        "        {% break %}\n"
        "    {% endif %}\n"
        "{{ m.role }}: {{ m.content }}\n"
        "{% endfor %}\n"
    )
    assert ChatTemplate(source).render(TWO_TURNS + TWO_TURNS) == "user: Hello\n"


def test_tojson_matches_transformers() -> None:
    value = {"b": "é<&>'", "a": [1, 2]}
    template = ChatTemplate(
        "{{ v|tojson }}\n{{ v|tojson(indent=2, sort_keys=true) }}\n{{ v|tojson(separators=(',', ':')) }}"
    )
    assert template.render([], v=value) == "\n".join([
        json.dumps(value, ensure_ascii=False),  # no HTML escaping, unlike Jinja's own tojson
        json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True),
        json.dumps(value, ensure_ascii=False, separators=(",", ":")),
    ])


def test_strftime_now_formats_the_current_date() -> None:
    before = datetime.now().strftime("%d %b %Y")
    rendered = ChatTemplate("{{ strftime_now('%d %b %Y') }}").render([])
    assert rendered in {before, datetime.now().strftime("%d %b %Y")}  # either side of midnight


def test_variables_passed_to_the_template() -> None:
    template = ChatTemplate(
        "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools is none }}|{{ documents is none }}"
        "|{{ extra_var }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    assert template.render([], add_generation_prompt=False, extra_var=7) == "<s>|</s>|False|True|True|7"
    assert template.render([], tools=[{"name": "f"}], extra_var=7) == "<s>|</s>|True|False|True|7"


def test_tokens_cannot_be_overridden_through_extra() -> None:
    with pytest.raises(TemplateError, match="bos_token"):
        ChatTemplate("{{ bos_token }}", bos_token="<s>").render([], bos_token="<evil>")


def test_generation_tag_renders_its_body() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    )
    assert template.render(TWO_TURNS) == "[Hello][Hi there!]"


def test_list_content_is_passed_through() -> None:
    template = ChatTemplate(
        "{% for part in messages[0].content %}{{ part.type }}:{{ part.text }};{% endfor %}"
    )
    content = [{"type": "text", "text": "look"}, {"type": "image", "text": ""}]
    assert template.render([{"role": "user", "content": content}]) == "text:look;image:;"


def test_small_repetitions_and_powers_still_work() -> None:
    template = ChatTemplate("{{ '-' * 3 }} {{ 3 * [0] }} {{ 2 ** 10 }} {{ 6 * 7 }}")
    assert template.render([]) == "--- [0, 0, 0] 1024 42"


# --- hostile templates ----------------------------------------------------------------------------

HOSTILE_TEMPLATES = [
    # (template, a fragment of the error that shows the sandbox, not some other fault, stopped it)
    ("{{ messages.__class__ }}", "'__class__' of 'list' object is unsafe"),
    ("{{ raise_exception.__globals__ }}", "'__globals__' of 'function' object is unsafe"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "'__class__' of 'str' object is unsafe"),
    ("{{ namespace.__subclasses__() }}", "'__subclasses__'"),
    ("{{ __builtins__ }}", "'__builtins__' is unsafe"),
    ("{{ __import__('os').system('true') }}", "'__import__' is unsafe"),
    ("{{ dict.mro() }}", "'mro' of 'type' object is unsafe"),
    ("{% import 'os' as os %}", "cannot load other templates"),
    ("{% from 'os' import path %}", "cannot load other templates"),
    ("{% include '/etc/passwd' %}", "cannot load other templates"),
    ("{% extends 'base.html' %}", "cannot load other templates"),
    ("{{ open('/etc/passwd').read() }}", "'open' is undefined"),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "'__init__' of 'type' object is unsafe"),
    ("{{ joiner.__init__.__globals__ }}", "'__init__' of 'type' object is unsafe"),
    ("{{ self._TemplateReference__context }}", "'_TemplateReference__context'"),
    ("{{ lipsum.__globals__['os'] }}", "'lipsum' is undefined"),
    ("{{ lipsum(n=1000000) }}", "'lipsum' is undefined"),
    ("{{ '{0.__class__}'.format(messages) }}", "'__class__' of 'list' object is unsafe"),
    ("{{ '{m.__class__.__mro__}'.format_map({'m': messages}) }}", "'__class__' of 'list' object is unsafe"),
    ("{{ messages|attr('__class__') }}", "'__class__' of 'list' object is unsafe"),
    ("{{ messages['__class__'] }}", "'__class__' of 'list' object is unsafe"),
    ("{% for i in range(10**9) %}{% endfor %}", "Range too big"),
    ("{{ 'a' * 10**10 }}", "too big"),  # Jinja would build this constant while compiling
    ("{{ 10**10 * ['a'] }}", "too big"),
    ("{{ 7 ** (10 ** 8) }}", "too big"),
    ("{{ messages.append({'role': 'user', 'content': 'injected'}) }}", "'append' of 'list' object is unsafe"),
    ("{% set _ = messages.pop() %}", "'pop' of 'list' object is unsafe"),
    ("{% set _ = messages[0].update({'content': 'changed'}) %}", "'update' of 'dict' object is unsafe"),
    ("{{ messages[0].clear() }}", "'clear' of 'dict' object is unsafe"),
]


@pytest.mark.parametrize("source, reason", HOSTILE_TEMPLATES, ids=[source for source, _ in HOSTILE_TEMPLATES])
def test_hostile_template_is_refused(source: str, reason: str) -> None:
    messages = [{"role": "user", "content": "hello"}]
    untouched = copy.deepcopy(messages)
    with pytest.raises(TemplateError) as caught:
        ChatTemplate(source, origin="hostile.jinja").render(messages)
    assert reason in str(caught.value)
    assert "hostile.jinja" in str(caught.value)
    assert messages == untouched


def test_deeply_nested_template_is_refused_when_compiled() -> None:
    with pytest.raises(TemplateError, match=r"deep\.jinja: RecursionError"):
        ChatTemplate("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", origin="deep.jinja")


def test_template_cannot_read_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-42")
    monkeypatch.chdir(tmp_path)  # so a relative name would find the file too
    opened = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)

    for source in [
        f"{{% include '{secret}' %}}",
        "{% include 'secret.txt' %}",
        "{% import 'secret.txt' as s %}",
        "{% extends 'secret.txt' %}",
        f"{{{{ open('{secret}').read() }}}}",
    ]:
        with pytest.raises(TemplateError) as caught:
            ChatTemplate(source).render([])
        assert "TOP-SECRET-42" not in str(caught.value)
    assert not [name for name in opened if "secret" in name]


# --- error messages -------------------------------------------------------------------------------


def test_syntax_error_names_origin_and_line() -> None:
    with pytest.raises(TemplateError, match=r"models/x/tokenizer_config\.json, line 2: "):
        ChatTemplate("{{ bos_token }}\n{% for m in %}{% endfor %}", origin="models/x/tokenizer_config.json")


def test_raise_exception_gives_the_template_message_and_line() -> None:
    source = (
        "{{ bos_token }}\n"
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    )
    template = ChatTemplate(source, origin="gemma.jinja")
    expected = r"^chat template from gemma\.jinja, line 2: .*System role not supported$"
    with pytest.raises(TemplateError, match=expected):
        template.render([{"role": "system", "content": "x"}])


def test_runtime_failure_names_line_and_cause() -> None:
    with pytest.raises(TemplateError, match=r"line 3: ZeroDivisionError"):
        ChatTemplate("a\nb\n{{ 1 / 0 }}").render([])


@pytest.mark.parametrize(
    "messages, expected",
    [
        ({"role": "user", "content": "hi"}, "messages must be a list"),
        ([{"role": "user", "content": "hi"}, "hello"], "messages[1] must be a dict"),
        ([{"role": "user", "content": "hi"}, {"content": "hi"}], "messages[1] has no 'role'"),
        ([{"role": "user"}], "messages[0] has no 'content'"),
        ([{"role": 3, "content": "hi"}], "messages[0]['role'] must be str"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": None}],
         "messages[1]['content'] must be str or list"),
        ([{"role": "user", "content": 12}], "messages[0]['content'] must be str or list"),
    ],
)
def test_bad_message_is_refused_naming_index_and_field(messages: object, expected: str) -> None:
    with pytest.raises(TemplateError) as caught:
        ChatTemplate(None).render(messages)
    assert expected in str(caught.value)
