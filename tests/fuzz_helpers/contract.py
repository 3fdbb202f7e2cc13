"""The contract every fuzz case is held to, and the tally of how cases ended.

A case loads a (mutated) model file and must end in one of two ways: success, or one of the documented
error types with a short, one-line message that names the file. It must finish within CASE_SECONDS and
its peak traced allocation must stay within what the files on disk justify (allocation_bound): a loader
that believes a corrupt size field and allocates from it fails here even when it would later raise.
"""

from __future__ import annotations

import os
import signal
import tracemalloc
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

from hypothesis import HealthCheck, settings

from minitorch_infer.errors import ModelFormatError, UnsupportedModelError

LOADER_ERRORS = (ModelFormatError, UnsupportedModelError)
# Generous: a case takes milliseconds; this only has to tell a hang from a busy machine.
CASE_SECONDS = 10.0
MAX_MESSAGE_CHARS = 600
# Loading widens bf16/f16 to float32 (2x) and builds the compiled model's buffers, KV cache included.
ALLOCATION_PER_FILE_BYTE = 16
ALLOCATION_OVERHEAD_BYTES = 8 * 2**20

# Fixed cases (derandomize) so CI never flakes; MINITORCH_FUZZ_EXAMPLES runs more of them locally.
FUZZ_EXAMPLES = int(os.environ.get("MINITORCH_FUZZ_EXAMPLES", "1000"))
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,  # the per-case limit is ours (time_limit), which also stops a real hang
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class _CaseTimeout(BaseException):
    """Raised into a case that runs too long. A BaseException, so no `except Exception` in a loader hides it."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def interrupt(signum, frame):
        raise _CaseTimeout()

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def allocation_bound(file_bytes: int) -> int:
    return ALLOCATION_PER_FILE_BYTE * file_bytes + ALLOCATION_OVERHEAD_BYTES


class FuzzTally:
    """Runs cases of one format against the contract and counts how they ended ("ok" or the error type)."""

    def __init__(self, format_name: str):
        self.format_name = format_name
        self.outcomes: Counter[str] = Counter()

    def run(self, case: Callable[[], object], must_name: str, file_bytes: int) -> None:
        """Run `case`; a documented error's message must contain `must_name` (the file or folder)."""
        outcome = "ok"
        tracemalloc.start()
        try:
            with time_limit(CASE_SECONDS):
                case()
        except _CaseTimeout:
            raise AssertionError(f"the case was stopped after {CASE_SECONDS} s (a hang?)") from None
        except LOADER_ERRORS as error:
            outcome = type(error).__name__
            self._check_message(str(error), must_name)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak <= allocation_bound(file_bytes), (
            f"peak allocation {peak:,} bytes for {file_bytes:,} bytes of files "
            f"(bound {allocation_bound(file_bytes):,})")
        self.outcomes[outcome] += 1

    @staticmethod
    def _check_message(message: str, must_name: str) -> None:
        assert must_name in message, f"the message does not name {must_name}: {message}"
        assert "\n" not in message, f"the message is not one line: {message!r}"
        assert len(message) <= MAX_MESSAGE_CHARS, f"the message is {len(message)} characters long: {message[:200]}..."

    @property
    def cases(self) -> int:
        return sum(self.outcomes.values())

    def summary(self) -> str:
        counts = ", ".join(f"{name} {count}" for name, count in self.outcomes.most_common())
        return f"{self.format_name}: {self.cases} cases: {counts}"

    def report(self, record_property, *expected_outcomes: str) -> None:
        """Print and record the counts; check that every case ran and each expected outcome occurred."""
        print(self.summary())
        record_property("outcomes", dict(self.outcomes))
        assert self.cases >= FUZZ_EXAMPLES
        missing = [outcome for outcome in expected_outcomes if not self.outcomes[outcome]]
        assert not missing, f"no case ended in {missing}: {self.summary()}"
