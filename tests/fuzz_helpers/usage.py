"""What a model that loaded from damaged files must then do: encode and decode text, render a chat
prompt and generate a few tokens. Loading is only half the contract; a tokenizer that loads and then
panics on its first text would pass a load-only fuzzer.
"""

from __future__ import annotations

import pytest

from minitorch_infer.generation.chat import render_chat_prompt
from minitorch_infer.errors import PromptError, TemplateError


def use_model(model) -> None:
    """A damaged template may fail to render, and a damaged vocabulary may encode text to no tokens at all;
    both end in their documented errors. Anything else must work, in whatever context the files declare
    (which can be a single position: the prompt is then cut to fit)."""
    ids = model.encode("hello world <s>")
    model.tokenizer.decode(ids)
    try:
        prompt = render_chat_prompt(model, [{"role": "user", "content": "hello"}])
    except TemplateError:
        prompt = ids
    settings = {"max_new_tokens": 3, "greedy": True, "truncate_prompt": "left"}
    if prompt:
        model.generate(prompt, **settings)
    else:
        with pytest.raises(PromptError, match="the prompt is empty"):
            model.generate(prompt, **settings)
