"""Chat sessions: a conversation whose KV cache is kept across turns, so each turn prefills only its own tokens.

A Session owns one KV-cache sequence and the conversation's tokens. A new turn renders the whole
conversation with the chat template, and feeds the model only the text past what the cache already
holds. rollback() undoes the last turn by truncating the cache; reset() starts over.

A turn stopped midway (Ctrl-C, or a consumer that stops reading its stream) is kept as far as it got:
the user's message and the reply so far. The cache only ever counts positions whose step completed, so
the next turn reuses exactly the part of the conversation that was really computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import ContextOverflowError
from .chat_template import ChatTemplate
from .loop import GenerationResult, TextStream, check_prompt, sampling_params
from .speculative import speculation_settings


def chat_template_for(model) -> ChatTemplate:
    tokenizer = model.tokenizer
    bos = tokenizer.token_text(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else ""
    eos = tokenizer.token_text(tokenizer.eos_token_ids[0]) if tokenizer.eos_token_ids else ""
    return ChatTemplate(tokenizer.chat_template, bos_token=bos or "", eos_token=eos or "",
                        origin=tokenizer.template_origin)


def render_chat_prompt(model, messages: list[dict], system: str | None = None) -> list[int]:
    """Token ids of messages rendered with the model's template (ChatML if it has none), ready to generate."""
    if system is not None:
        messages = [{"role": "system", "content": system}] + list(messages)
    text = chat_template_for(model).render(messages, add_generation_prompt=True)
    return model.tokenizer.encode(text, add_special_tokens=False)


@dataclass
class _Turn:
    """Where the conversation stood before a turn, so rollback() can return there."""

    messages: int
    tokens: int


class Session:
    """A conversation with a model (`Model.chat()`): `send`/`stream` a user turn, `rollback` the last turn,
    `reset`, `close` (or use it as a context manager). Its KV-cache sequence keeps the conversation, so each
    turn prefills only its own tokens; a session dropped without close() returns its blocks all the same."""

    def __init__(self, model, system: str | None = None):
        self.model = model
        self.template = chat_template_for(model)
        self.system = system
        self.sequence = model.kv_cache.open()
        self.messages: list[dict] = []
        self.token_ids: list[int] = []        # the conversation as the model saw (or will see) it
        self._turns: list[_Turn] = []
        self._unfinished: TextStream | None = None   # the turn being streamed, until it is recorded
        self.reset()

    # --- turns -----------------------------------------------------------------------------------
    def send(self, text: str, **settings) -> GenerationResult:
        """Add a user turn and return the assistant's reply (a GenerationResult, like generate's)."""
        return self.stream(text, **settings).finish()

    def stream(self, text: str, max_new_tokens: int = 256, stop: str | Sequence[str] = (), ignore_eos: bool = False,
               greedy: bool = False, logprobs: int | None = None, speculate: str | None = None,
               draft_max: int | None = None, ngram: int | None = None, draft_model=None, **sampling) -> TextStream:
        """Add a user turn and yield the reply as it is produced; the turn is recorded when the stream ends.
        Settings as generate's (speculative decoding included)."""
        self._end_unfinished_turn()
        params = sampling_params(greedy=greedy, **sampling)
        speculation = speculation_settings(speculate, draft_max, ngram, draft_model)
        messages = self.messages + [{"role": "user", "content": text}]
        prompt_ids = self._conversation_ids(messages)
        check_prompt(self.model, prompt_ids)
        own = self._reusable_prefix(prompt_ids)
        self.sequence.truncate(own)
        # With nothing of its own cached, share what another sequence computed (e.g. the system prompt).
        cached = own or self.sequence.share_prefix(prompt_ids)
        try:
            self.sequence.reserve(len(prompt_ids) - cached)
        except ContextOverflowError:
            self.sequence.truncate(own)                       # the turn never started: hold only our own
            raise
        turn = _Turn(len(self.messages), len(self.token_ids))

        def record(stream: TextStream) -> None:
            self._turns.append(turn)
            self.messages = messages + [{"role": "assistant", "content": stream.result.text}]
            self.token_ids = prompt_ids + stream.result.token_ids
            self._unfinished = None

        self._unfinished = TextStream(self.model, self.sequence, prompt_ids[:cached], prompt_ids[cached:],
                                      max_new_tokens, stop, ignore_eos, params, on_finish=record, logprobs=logprobs,
                                      speculation=speculation)
        return self._unfinished

    def _end_unfinished_turn(self) -> None:
        """Close a stream left unfinished (interrupted, or no longer read), which records its turn. Done before
        anything else touches the conversation, so the record happens now: not later, whenever the garbage
        collector finalises the abandoned stream, on top of whatever came since."""
        if self._unfinished is not None:
            self._unfinished.close()

    def _conversation_ids(self, messages: list[dict]) -> list[int]:
        """The rendered conversation as tokens: our own tokens for what came before, encoding only the new text.

        Re-encoding the whole text could split the model's earlier replies differently from how they were
        generated, which would throw away cache for no reason.
        """
        full_text = self.template.render(messages, add_generation_prompt=True)
        tokenizer = self.model.tokenizer
        known_text = tokenizer.decode(self.token_ids, skip_special_tokens=False)
        if self.token_ids and full_text.startswith(known_text):
            return self.token_ids + tokenizer.encode(full_text[len(known_text):], add_special_tokens=False)
        return tokenizer.encode(full_text, add_special_tokens=False)

    def _reusable_prefix(self, prompt_ids: list[int]) -> int:
        """How many leading tokens the cache already holds for this prompt."""
        limit = min(self.sequence.length, len(self.token_ids), len(prompt_ids) - 1)   # feed one token for logits
        shared = 0
        while shared < limit and self.token_ids[shared] == prompt_ids[shared]:
            shared += 1
        return shared

    # --- history ---------------------------------------------------------------------------------
    def rollback(self) -> None:
        """Undo the last turn (the user message and the reply)."""
        self._end_unfinished_turn()
        if not self._turns:
            return
        turn = self._turns.pop()
        del self.messages[turn.messages:]
        del self.token_ids[turn.tokens:]
        self.sequence.truncate(min(self.sequence.length, turn.tokens))

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self._end_unfinished_turn()
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.token_ids = []
        self._turns = []
        self.sequence.truncate(0)

    @property
    def cached_tokens(self) -> int:
        return self.sequence.length

    def close(self) -> None:
        """Give the session's KV-cache slot back."""
        self._end_unfinished_turn()
        self.sequence.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
