"""Bad requests at run time end in one documented error, before any work, and leave nothing behind.

Prompts longer than the context (refused, or cut by the "left" policy), generation running into the end
of the context, empty prompts, invalid sampling values through the API, bad bytes on chat's stdin, and
graph faults reached through load(): a user pass that breaks the graph, an op without a kernel.
"""

import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minitorch_infer
from conftest import require_model
from minitorch_infer.backends import numpy as numpy_backend
from minitorch_infer.cli import main
from minitorch_infer.errors import ContextOverflowError, GraphError, PromptError, SamplingError
from minitorch_infer.passes import PassResult

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time there was a little girl who loved to play in the park with her friends."


@pytest.fixture(scope="module")
def short_story():
    """The story model with a 32-token context, so prompts overflow it easily."""
    return minitorch_infer.load(require_model("story"), context=32, prefill_chunk=8)


def long_prompt_ids(model, length: int) -> list[int]:
    ids = model.encode(PROMPT * 10)
    assert len(ids) >= length and ids[0] == model.config.bos_token_id
    return ids[:length]


# --- prompts longer than the context -----------------------------------------------------------------

def test_a_prompt_longer_than_the_context_is_refused_before_any_work(short_story):
    with pytest.raises(ContextOverflowError, match=r"the prompt is 40 tokens, longer than the context length 32.*"
                                                   r"truncate_prompt='left'"):
        short_story.generate(long_prompt_ids(short_story, 40), max_new_tokens=4)
    assert short_story.kv_cache.open_sequences == 0


def test_left_truncation_keeps_bos_and_the_last_tokens_leaving_room_to_generate(short_story):
    ids = long_prompt_ids(short_story, 40)
    result = short_story.generate(ids, max_new_tokens=4, greedy=True, truncate_prompt="left")
    # room for the 4 new tokens: 28 prompt tokens, BOS and the last 27
    assert result.prompt_ids == ids[:1] + ids[-27:]
    assert result.stats.dropped_prompt_tokens == 12
    assert result.finish_reason == "length" and len(result.token_ids) == 4
    assert result.token_ids == short_story.generate(result.prompt_ids, max_new_tokens=4, greedy=True).token_ids


def test_left_truncation_leaves_at_most_half_the_context_for_new_tokens(short_story):
    result = short_story.generate(long_prompt_ids(short_story, 40), max_new_tokens=100, greedy=True,
                                  ignore_eos=True, truncate_prompt="left")
    assert len(result.prompt_ids) == 16
    assert result.finish_reason == "context" and len(result.token_ids) == 32 - 16 + 1


def test_an_unknown_truncation_policy_names_the_setting(short_story):
    with pytest.raises(SamplingError, match="truncate_prompt must be one of 'error', 'left', got 'right'"):
        short_story.generate(long_prompt_ids(short_story, 40), truncate_prompt="right")
    assert short_story.kv_cache.open_sequences == 0


def test_the_cli_refuses_a_long_prompt_or_cuts_it_with_truncate_prompt_left(capsys):
    story = str(require_model("story"))
    args = ["generate", "--model", story, "--context", "32", "-n", "4", "--greedy", "--prompt", PROMPT * 3]
    assert main(args) == 2
    assert "longer than the context length 32" in capsys.readouterr().err
    assert main(args + ["--truncate-prompt", "left"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "dropped" in err and "tokens from the start of the prompt" in err


def test_generation_that_runs_into_the_end_of_the_context_stops_with_finish_reason_context(short_story):
    prompt = long_prompt_ids(short_story, 20)
    stream = short_story.stream(prompt, max_new_tokens=500, greedy=True, ignore_eos=True)
    text = "".join(stream)
    assert stream.result.finish_reason == "context"
    assert len(stream.result.token_ids) == 32 - 20 + 1      # the last token is sampled, never run
    assert text == stream.result.text
    assert short_story.kv_cache.open_sequences == 0


# --- empty prompts and bad token ids -----------------------------------------------------------------

def test_an_empty_text_prompt_is_just_bos_for_a_model_that_adds_one(short_story):
    result = short_story.generate("", max_new_tokens=3, greedy=True)
    assert result.prompt_ids == [short_story.config.bos_token_id] and len(result.token_ids) == 3


def test_an_empty_prompt_without_bos_is_refused(short_story, smollm2_model):
    with pytest.raises(PromptError, match="the prompt is empty"):
        smollm2_model.generate("", max_new_tokens=3)        # SmolLM2 adds no BOS
    with pytest.raises(PromptError, match="the prompt is empty"):
        short_story.generate([], max_new_tokens=3)
    assert short_story.kv_cache.open_sequences == smollm2_model.kv_cache.open_sequences == 0


def test_a_token_id_outside_the_vocabulary_is_refused_before_any_work(short_story):
    with pytest.raises(PromptError, match=r"prompt token id 2048 is outside the vocabulary \(0\.\.2047\)"):
        short_story.generate([1, 2048], max_new_tokens=3)
    with pytest.raises(PromptError, match="prompt token id -1 is outside"):
        short_story.generate([-1], max_new_tokens=3)
    assert short_story.kv_cache.open_sequences == 0


def test_a_chat_turn_that_would_overflow_is_refused_and_the_session_goes_on():
    model = minitorch_infer.load(require_model("smollm2-135m-instruct"), context=64)
    with model.chat() as session:
        session.send("Hi!", greedy=True, max_new_tokens=4)
        with pytest.raises(ContextOverflowError, match="do not fit"):
            session.send("word " * 80, greedy=True)
        assert len(session.messages) == 2
        assert session.send("Hi!", greedy=True, max_new_tokens=4).token_ids


# --- invalid sampling values through the API ---------------------------------------------------------

@pytest.mark.parametrize("settings_, name", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "0.5"}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": "high"}, "top_p"),
    ({"top_k": 2.5}, "top_k"), ({"top_k": -1}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"seed": -3}, "seed"),
    ({"seed": True}, "seed"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": float("inf")}, "presence_penalty"), ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": "10"}, "max_new_tokens"), ({"max_new_tokens": 2.0}, "max_new_tokens"),
    ({"stop": [""]}, "stop"), ({"stop": [3]}, "stop"), ({"greedy": "yes"}, "greedy"),
    ({"ignore_eos": 1}, "ignore_eos"), ({"temprature": 0.5}, "temprature"),
])
def test_invalid_sampling_values_name_the_setting(short_story, settings_, name):
    for run in (short_story.generate, short_story.stream):
        with pytest.raises(SamplingError, match=name):
            run("Once", **settings_)
    with short_story.chat() as session, pytest.raises(SamplingError, match=name):
        session.send("Hi", **settings_)
    assert short_story.kv_cache.open_sequences == 0


def test_a_single_stop_string_is_one_stop_string_not_its_characters(short_story):
    full = short_story.generate("Once upon a time", max_new_tokens=12, greedy=True).text
    stop = full.split()[3]
    assert min(full.index(char) for char in stop) < full.index(stop)   # one of its characters comes earlier
    stopped = short_story.generate("Once upon a time", max_new_tokens=12, greedy=True, stop=stop)
    assert stopped.text == full[:full.index(stop)]


SETTING_NAMES = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "penalty_last_n", "seed", "max_new_tokens", "greedy", "ignore_eos"]
any_value = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.integers(), st.floats(),
                      st.text(max_size=3), st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(name=st.sampled_from(SETTING_NAMES), value=any_value)
def test_any_value_of_any_setting_runs_or_is_a_sampling_error_naming_it(short_story, name, value):
    try:
        result = short_story.generate([1, 80, 147], **{"max_new_tokens": 2, name: value})
    except SamplingError as error:
        assert name in str(error)
    else:
        assert all(0 <= token < short_story.config.vocab_size for token in result.token_ids)
    assert short_story.kv_cache.open_sequences == 0


# --- bad bytes on chat's stdin -----------------------------------------------------------------------

def test_chat_reports_a_line_that_is_not_utf8_and_answers_the_next():
    require_model("story")
    done = subprocess.run(["minitorch-infer", "chat", "--model", "story", "-n", "4", "--greedy"],
                          input=b"Once \xff upon\nOnce upon a time\n", capture_output=True, cwd=ROOT, timeout=300)
    stderr = done.stderr.decode()
    assert "stdin line 1 is not valid UTF-8 (byte 5: b'\\xff'); line skipped" in stderr
    assert done.stdout.decode().strip()          # line 2 got a reply
    assert done.returncode == 2


# --- graph faults reached through load() -------------------------------------------------------------

def test_a_user_pass_that_breaks_the_graph_is_named_at_load():
    def drops_an_input(graph, ctx):
        node = next(n for n in graph.nodes if n.op == "rms_norm")
        node.inputs[0].users.remove(node)
        return PassResult(graph, changed=1)

    with pytest.raises(GraphError, match=r"pass 'drops_an_input' produced an invalid graph"):
        minitorch_infer.load(require_model("story"), passes=[drops_an_input])


def test_an_op_without_a_kernel_fails_at_load_naming_the_op(monkeypatch):
    monkeypatch.delitem(numpy_backend.KERNELS, "silu")
    with pytest.raises(GraphError, match="numpy backend has no kernel for op 'silu'"):
        minitorch_infer.load(require_model("story"), passes=[])
