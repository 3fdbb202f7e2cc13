"""When generation ends and why: stop strings matched across streamed pieces, and the finish reasons."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from ..errors import SamplingError


class FinishReason(str, Enum):
    """Why a generation ended (the values match OpenAI's `finish_reason` where one exists)."""

    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CONTEXT = "context"  # the context window is full
    INTERRUPTED = "interrupted"  # stopped from outside (Ctrl-C, or the stream closed) before it ended


def first_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Where text is cut by the stop string that ends first in it, as generation token by token would meet
    them (on a tie, the longer one, which starts earlier); -1 if none occurs. Which pieces the text arrived in
    never changes the answer."""
    found = [(i + len(stop), i) for stop in stop_strings if (i := text.find(stop)) >= 0]
    return min(found)[1] if found else -1


class StopStringMatcher:
    """Filters streamed text so that no stop string is ever emitted, even one split over several pieces.

    Text is emitted as soon as it cannot be the start of a stop string; a suffix that could be is held
    back until the next piece settles it. Once a stop string appears, the text before it is emitted and
    the matcher reports stopped; everything after it is dropped.
    """

    def __init__(self, stop_strings: Sequence[str]):
        for stop in stop_strings:
            if not stop:
                raise SamplingError(f"stop strings must be non-empty, got {list(stop_strings)!r}")
        self.stop_strings = tuple(stop_strings)
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Feed newly decoded text; return the text safe to emit now and whether a stop string ended it."""
        if self.stopped:
            return "", True
        if not self.stop_strings:
            return text, False
        pending = self._held + text
        # Only `pending` can contain a stop: emitted text never ends with the start of one.
        stop_at = first_stop(pending, self.stop_strings)
        if stop_at >= 0:
            self.stopped = True
            self._held = ""
            return pending[:stop_at], True
        held = self._longest_partial_stop(pending)
        self._held = pending[len(pending) - held :] if held else ""
        return pending[: len(pending) - held], False

    def flush(self) -> str:
        """At the end of generation: the held-back text, which turned out not to start a stop string."""
        held, self._held = self._held, ""
        return held

    def _longest_partial_stop(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest_prefix = max((len(stop) - 1 for stop in self.stop_strings), default=0)
        for length in range(min(len(text), longest_prefix), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self.stop_strings):
                return length
        return 0
