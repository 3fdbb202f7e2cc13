"""`minitorch-infer batch`: a JSONL file of prompts in, one result per id out, resumable, bad lines named."""

import json

import pytest

from minitorch_infer.cli import main
from minitorch_infer.generation.chat import render_chat_prompt
from conftest import require_model

LINES = [
    {"id": 1, "prompt": "Once upon a time", "max_tokens": 24, "greedy": True},
    {"id": "two", "prompt": "The little dog", "max_tokens": 24, "temperature": 0.9, "seed": 5},
    {"id": 3, "prompt": [1, 80, 147], "max_tokens": 12, "greedy": True, "stop": ["."]},
    {"id": 4, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 10, "seed": 2},
]


def write_lines(path, lines) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def read_results(path) -> dict:
    results = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({json.dumps(r["id"]) for r in results}) == len(results), "an id was written twice"
    return {json.dumps(r["id"]): r for r in results}


def expected(story_model, line: dict) -> dict:
    prompt = (render_chat_prompt(story_model, line["messages"]) if "messages" in line else line["prompt"])
    settings = {k: v for k, v in line.items() if k not in ("id", "prompt", "messages", "max_tokens")}
    result = story_model.generate(prompt, max_new_tokens=line["max_tokens"], **settings)
    return {"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason}


def test_each_result_equals_generate_alone(tmp_path, story_model):
    require_model("story")
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, LINES)
    assert main(["batch", str(source), "-o", str(target), "-q"]) == 0
    results = read_results(target)
    assert set(results) == {json.dumps(line["id"]) for line in LINES}
    for line in LINES:
        found = results[json.dumps(line["id"])]
        assert {k: found[k] for k in ("text", "token_ids", "finish_reason")} == expected(story_model, line)


def test_a_rerun_resumes_after_a_result_cut_short(tmp_path):
    require_model("story")
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, LINES)
    assert main(["batch", str(source), "-o", str(target), "-q"]) == 0
    complete = read_results(target)
    lines = target.read_text().splitlines(keepends=True)
    target.write_text(lines[0] + lines[1][:20])              # killed while writing the second result
    assert main(["batch", str(source), "-o", str(target), "-q"]) == 0
    assert read_results(target) == complete
    assert main(["batch", str(source), "-o", str(target), "-q"]) == 0   # nothing left to do
    assert len(target.read_text().splitlines()) == len(LINES)


def test_bad_lines_are_named_and_the_others_still_run(tmp_path, capsys):
    require_model("story")
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, [LINES[0], "{not json", {"id": 7, "promt": "typo"}, {"id": 1, "prompt": "again"},
                         {"id": 8, "prompt": "x", "temperature": -1}, {"prompt": "no id"}, LINES[2]])
    assert main(["batch", str(source), "-o", str(target), "-q"]) == 2
    errors = capsys.readouterr().err
    for number, words in ((2, "not JSON"), (3, "unknown field(s) promt"), (4, "id 1 appears twice"),
                          (5, "temperature"), (6, "id must be a string or an integer")):
        assert f"in.jsonl line {number}: " in errors and words in errors, (number, errors)
    assert set(read_results(target)) == {"1", "3"}


def test_an_output_file_of_something_else_is_refused(tmp_path, capsys):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, LINES[:1])
    target.write_text("hello\n")
    assert main(["batch", str(source), "-o", str(target), "-q"]) == 2
    assert "out.jsonl line 1 is not a result written by this command" in capsys.readouterr().err
    assert target.read_text() == "hello\n"


def test_engine_flags_are_checked(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    write_lines(source, LINES[:1])
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", str(source), "-o", str(tmp_path / "o.jsonl"), "--max-batch-tokens", "0"])
    assert exit_info.value.code == 2 and "--max-batch-tokens: must be > 0" in capsys.readouterr().err
    assert main(["batch", str(source), "-o", str(tmp_path / "o.jsonl"), "--kv-memory", "lots"]) == 2
    assert "KV memory 'lots' is not a size" in capsys.readouterr().err
