"""Stop strings: never emitted, even split across pieces; everything before them is; nothing is lost."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitorch_infer.errors import SamplingError
from minitorch_infer.generation.stopping import FinishReason, StopStringMatcher


def stream(matcher: StopStringMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    """Push every piece until a stop; flush if none came. Returns the emitted pieces and whether it stopped."""
    emitted = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        emitted.append(text)
        if stopped:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


def test_stop_string_split_over_two_pushes_stops_and_is_not_emitted():
    matcher = StopStringMatcher(["</s>"])
    assert matcher.push("Hello </") == ("Hello ", False)
    assert matcher.push("s> and more") == ("", True)
    assert matcher.flush() == ""


def test_text_before_the_stop_in_the_same_push_is_emitted():
    assert StopStringMatcher(["STOP"]).push("abc STOP def") == ("abc ", True)


def test_stop_string_spread_over_many_single_character_pushes():
    emitted, stopped = stream(StopStringMatcher(["\nUser:"]), list("Sure.\nUsed\nUser: hi"))
    assert stopped
    assert "".join(emitted) == "Sure.\nUsed"


def test_partial_prefix_that_never_completes_is_emitted():
    matcher = StopStringMatcher(["</s>"])
    assert matcher.push("a <") == ("a ", False)
    assert matcher.push("/") == ("", False)
    assert matcher.push("x") == ("</x", False)
    assert matcher.push("b </") == ("b ", False)
    assert matcher.flush() == "</"  # generation ended (e.g. length) mid-prefix: the text is real output


def test_the_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["###", "\nUser:"])
    assert matcher.push("answer\nUser: x ### y") == ("answer", True)


def test_a_shorter_stop_inside_a_longer_ones_prefix():
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.push("xab") == ("x", False)
    assert matcher.push("c") == ("a", True)


def test_after_stopping_nothing_more_is_emitted():
    matcher = StopStringMatcher(["!"])
    assert matcher.push("hi! there") == ("hi", True)
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_no_stop_strings_passes_everything_through():
    matcher = StopStringMatcher([])
    assert matcher.push("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(SamplingError, match="stop strings must be non-empty"):
        StopStringMatcher(["ok", ""])


def test_finish_reasons():
    assert [reason.value for reason in FinishReason] == ["stop", "length", "context", "interrupted"]
    assert FinishReason.LENGTH == "length"


small_text = st.text(alphabet="ab<>/", max_size=40)


@given(
    text=small_text,
    stops=st.lists(st.text(alphabet="ab<>/", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stream_equals_the_text_up_to_the_first_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *(cut for cut in cuts if cut <= len(text))})
    pieces = [text[start:end] for start, end in zip(bounds, bounds[1:])]
    emitted, stopped = stream(StopStringMatcher(stops), pieces)

    # The stop that ends first (the longer on a tie) cuts the text, wherever the pieces were cut.
    found = [(index + len(stop), index) for stop in stops if (index := text.find(stop)) >= 0]
    assert stopped == bool(found)
    assert "".join(emitted) == (text[: min(found)[1]] if found else text)


def test_overlapping_stops_cut_where_the_first_to_end_starts_however_the_text_is_split():
    """Found by the test above: '<' ends before '><<' does, so '><<' cut at 0 in one piece but at 1 when
    streamed as '><' then '<'."""
    for pieces in (["><<"], ["><", "<"], [">", "<", "<"]):
        emitted, stopped = stream(StopStringMatcher(["<", "><<"]), pieces)
        assert "".join(emitted) == ">" and stopped


@given(text=small_text, stops=st.lists(st.text(alphabet="ab<>/", min_size=1, max_size=4), min_size=1, max_size=3))
def test_only_a_possible_stop_start_is_held_back(text, stops):
    matcher = StopStringMatcher(stops)
    emitted = ""
    for position, char in enumerate(text):
        piece, stopped = matcher.push(char)
        if stopped:
            return
        emitted += piece
        held = text[len(emitted) : position + 1]
        # Held text is the start of a stop string, and the emitted text could not have been.
        assert any(stop.startswith(held) for stop in stops) or held == ""
        assert all(not stop.startswith(text[start : position + 1]) for stop in stops for start in range(len(emitted)))
