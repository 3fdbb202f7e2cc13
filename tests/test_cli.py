"""The command line and the generation API as a new user meets them."""

import subprocess
import sys
from pathlib import Path

import pytest

from minitorch_infer.generation.detokenizer import IncrementalDetokenizer
from conftest import require_model

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, stdin: bytes | None = None):
    return subprocess.run([sys.executable, str(ROOT / "examples" / "generate.py"), *args], input=stdin,
                          capture_output=True, cwd=ROOT)


def test_generate_example_prints_the_reference_continuation(story_reference):
    require_model("story")
    done = run_cli("--greedy", "--max-new-tokens", "32", "--prompt", "Once upon a time")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == story_reference["greedy_text"].strip()


def test_prompt_from_stdin_and_stats_on_stderr():
    require_model("story")
    done = run_cli("--greedy", "-n", "8", "--stats", stdin="Once upon a time".encode())
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith(", a little girl")
    stderr = done.stderr.decode()
    for word in ("prefill:", "tok/s", "time to first token", "peak RSS", "weights", "arena", "KV cache"):
        assert word in stderr


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "argument --temperature: must be >= 0, got -1"),
    (["--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["--top-k", "-3"], "argument --top-k: must be >= 0, got -3"),
    (["--model", "/no/such/model", "--prompt", "x"], "model '/no/such/model' not found"),
])
def test_bad_flags_give_one_line_and_status_2(args, message):
    done = run_cli(*args)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_non_utf8_stdin_is_a_clear_error():
    require_model("story")
    done = run_cli("-n", "4", stdin=b"Once \xff\xfe upon")
    assert done.returncode == 2
    assert "stdin is not valid UTF-8 (byte 5" in done.stderr.decode()


def test_console_script_is_installed():
    done = subprocess.run(["minitorch-infer", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in ("generate", "graph", "chat", "bench", "fetch", "convert"):
        assert command in done.stdout


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(story_model):
    settings = dict(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=1234)
    first = story_model.generate("Once upon a time", **settings)
    assert story_model.generate("Once upon a time", **settings).text == first.text
    assert story_model.generate("Once upon a time", **{**settings, "seed": 99}).text != first.text
    greedy = story_model.generate("Once upon a time", max_new_tokens=40, greedy=True)
    assert story_model.generate("Once upon a time", max_new_tokens=40, top_k=1, seed=5).token_ids == greedy.token_ids


def test_a_stop_string_spanning_two_tokens_stops_and_is_not_printed(story_model, story_reference):
    tokenizer = story_model.tokenizer
    ids, text = story_reference["greedy_ids"], story_reference["greedy_text"]
    pieces = [tokenizer.decode(ids[:i + 1]) for i in range(len(ids))]
    boundary = next(i for i in range(5, len(ids)) if len(pieces[i]) - len(pieces[i - 1]) >= 3
                    and len(pieces[i - 1]) - len(pieces[i - 2]) >= 3)
    stop = pieces[boundary - 1][-2:] + pieces[boundary][len(pieces[boundary - 1]):][:2]
    assert text.index(stop) < len(pieces[boundary - 1]) < text.index(stop) + len(stop)   # really spans two tokens
    streamed = list(story_model.stream("Once upon a time", max_new_tokens=32, greedy=True, stop=[stop]))
    assert "".join(streamed) == text[:text.index(stop)]
    assert stop not in "".join(streamed)
    assert story_model.generate("Once upon a time", max_new_tokens=32, greedy=True, stop=[stop]).finish_reason == "stop"


@pytest.mark.parametrize("text", ["Hello 👋 world 🌍!", "北京欢迎你，东京も好き", "mixed: café ☕ 日本語 🎉🎉 end"])
def test_emoji_and_cjk_round_trip_through_encode_stream_decode(smollm2_model, text):
    tokenizer = smollm2_model.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    detokenizer = IncrementalDetokenizer(tokenizer.backend)
    pieces = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_result_carries_stats_and_finish_reason(story_model):
    result = story_model.generate("Once upon a time", max_new_tokens=5, greedy=True)
    assert result.finish_reason == "length" and len(result.token_ids) == 5
    stats = result.stats
    assert stats.prompt_tokens == 6 and stats.new_tokens == 5
    assert stats.prefill_tokens_per_second > 0 and stats.decode_tokens_per_second > 0
    assert 0 < stats.time_to_first_token and stats.peak_rss_bytes > 0


def test_dump_dot_writes_traced_and_optimised_graphs(tmp_path):
    import shutil

    require_model("story")
    target = tmp_path / "story.dot"
    done = run_cli("--greedy", "-n", "2", "--prompt", "Once", "--dump-dot", str(target))
    assert done.returncode == 0, done.stderr
    traced, optimised = tmp_path / "story.traced.dot", target
    assert "cluster_layer_1" in traced.read_text() and "@" in optimised.read_text()
    assert "arena" in optimised.read_text()                  # the memory plan is drawn on the optimised graph
    if shutil.which("dot"):
        assert (tmp_path / "story.svg").exists() and (tmp_path / "story.traced.svg").exists()
        for path in (traced, optimised):
            assert subprocess.run(["dot", "-Tsvg", str(path)], capture_output=True).returncode == 0
    else:
        assert "dot -Tsvg" in done.stderr.decode()


def test_threads_limits_blas_while_the_command_runs(monkeypatch):
    from threadpoolctl import threadpool_info

    from minitorch_infer import cli

    seen = []
    monkeypatch.setattr(cli.generate, "run", lambda args: seen.append(
        [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]))
    assert cli.main(["generate", "--threads", "1", "--prompt", "x"]) == 0
    assert seen and all(threads == [1] for threads in seen)
