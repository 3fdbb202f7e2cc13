"""Past one machine: `batch --ray` (Ray Data) gives the local command's results, and `serve --ray` (Ray Serve
replicas) answers as the single-process server does and survives a replica's death. One local Ray cluster of
2 CPUs and a 200 MB object store serves the whole module and is shut down after it.

Without Ray installed these tests skip (fail under MINITORCH_REQUIRE_MODELS=1, as CI installs the extra),
except the ones that check the message saying what to install."""

import json
import os
import signal
import sys
import threading
import time

import openai
import pytest

import minitorch_infer
from conftest import missing, require_model
from minitorch_infer.cli import build_parser, main
from minitorch_infer.ray_cluster import RAY_MISSING
from minitorch_infer.serving.app import serving_in_thread
from minitorch_infer.serving.load import PROMPTS
from test_batch_cli import LINES, read_results, write_lines

CLUSTER_CPUS = 2
OBJECT_STORE_BYTES = 200 * 1024 * 1024
# Lines enough for several batches per worker: greedy and seeded, prompts as text, as ids and as chats.
MANY_LINES = LINES + [{"id": f"p{i}", "prompt": prompt, "max_tokens": 16, **({"greedy": True} if i % 2 else
                                                                            {"temperature": 0.8, "seed": i})}
                      for i, prompt in enumerate(PROMPTS * 3)]


# --- without Ray ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["batch", "in.jsonl", "-o", "out.jsonl"], ["serve"]])
def test_without_ray_the_flag_says_what_to_install(command, monkeypatch, tmp_path, capsys):
    write_lines(tmp_path / "in.jsonl", LINES[:1])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)          # `import ray` now fails as if it were not installed
    assert main([*command, "--ray", "-q"]) == 2
    error = capsys.readouterr().err
    assert error == f"minitorch-infer: error: {RAY_MISSING}\n"
    assert "pip install 'minitorch-infer[ray]'" in error
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command, flag", [(["batch", "in.jsonl", "-o", "out.jsonl"], ["--workers", "2"]),
                                           (["batch", "in.jsonl", "-o", "out.jsonl"], ["--address", "auto"]),
                                           (["serve"], ["--replicas", "2"]), (["serve"], ["--autoscale", "1,2"])])
def test_cluster_flags_need_ray(command, flag, monkeypatch, tmp_path, capsys):
    write_lines(tmp_path / "in.jsonl", LINES[:1])
    monkeypatch.chdir(tmp_path)
    assert main([*command, *flag, "-q"]) == 2
    assert f"{flag[0]} needs --ray" in capsys.readouterr().err


@pytest.mark.parametrize("value, words", [("2", "expected MIN,MAX"), ("3,1", "0 <= MIN <= MAX"),
                                          ("0,0", "MAX >= 1"), ("a,b", "expected MIN,MAX")])
def test_autoscale_range_is_checked(value, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--ray", "--autoscale", value])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_replicas_and_autoscale_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--ray", "--replicas", "2", "--autoscale", "1,2"])
    assert "not allowed with argument" in capsys.readouterr().err


def require_ray():
    try:
        import ray
    except ImportError:
        missing("Ray (pip install -e '.[ray]')")
    return ray


def test_an_address_nobody_answers_on_is_one_line(tmp_path, capsys):
    import socket

    require_ray()
    write_lines(tmp_path / "in.jsonl", LINES[:1])
    with socket.socket() as probe:                         # a port that was free a moment ago: nobody listens
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    assert main(["batch", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--ray", "--address",
                 address, "-q"]) == 2
    assert f"--address {address}: no Ray cluster answers there" in capsys.readouterr().err


# --- a local cluster -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    ray = require_ray()
    require_model("story")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(num_cpus=CLUSTER_CPUS, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def run_batch(tmp_path, lines, name: str, *flags) -> tuple:
    """(exit status, results by id, the output file) of one batch run over `lines`."""
    source, target = tmp_path / "in.jsonl", tmp_path / f"{name}.jsonl"
    write_lines(source, lines)
    status = main(["batch", str(source), "-o", str(target), "-q", *flags])
    return status, read_results(target), target


def test_batch_on_ray_equals_the_local_command(ray_cluster, tmp_path, capsys):
    bad = ["{not json", {"id": 7, "promt": "typo"}, {"id": 1, "prompt": "again"},
           {"id": 8, "prompt": "x", "temperature": -1}, {"id": 9, "prompt": list(range(5000)), "max_tokens": 1}]
    lines = MANY_LINES[:5] + bad + MANY_LINES[5:]
    local_status, local, local_file = run_batch(tmp_path, lines, "local")
    local_errors = set(capsys.readouterr().err.splitlines())
    ray_status, on_ray, ray_file = run_batch(tmp_path, lines, "ray", "--ray", "--workers", "2")
    ray_errors = set(capsys.readouterr().err.splitlines())
    assert local_status == ray_status == 2
    assert len(local_errors) == len(bad) and ray_errors == local_errors
    assert len(on_ray) == len(MANY_LINES) and on_ray == local
    assert sorted(ray_file.read_text().splitlines()) == sorted(local_file.read_text().splitlines())
    # A rerun finds every id done and writes nothing.
    assert main(["batch", str(tmp_path / "in.jsonl"), "-o", str(ray_file), "-q", "--ray"]) == 2
    assert len(ray_file.read_text().splitlines()) == len(MANY_LINES)


class DiesOnce:
    """Mixed into the batch worker: the first worker to meet the marked line kills its own process (once, by a
    file beside the test's output), as a worker on a lost node would die."""

    marker = None

    def __call__(self, batch):
        if 3 in [int(n) for n in batch["line"]] and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_a_worker_that_dies_is_retried_and_each_id_is_written_once(ray_cluster, tmp_path):
    from ray import cloudpickle

    from minitorch_infer.cli.ray_batch import BatchWorker, infer_on_ray

    _, local, _ = run_batch(tmp_path, MANY_LINES, "local")
    marker = tmp_path / "died"
    Dying = type("Dying", (DiesOnce, BatchWorker), {"marker": str(marker)})
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the workers cannot import this test file
    try:
        args = build_parser().parse_args(["batch", "in", "-o", "out", "--ray", "--workers", "2", "-q"])
        rows = [{"line": number, "request": json.dumps(line)} for number, line in enumerate(MANY_LINES, start=1)]
        out = list(infer_on_ray(rows, args, worker=Dying))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert marker.exists(), "no worker died"
    assert sorted(row["line"] for row in out) == list(range(1, len(MANY_LINES) + 1))
    assert not any(row["error"] for row in out)
    found = [json.loads(row["result"]) for row in out]
    assert {json.dumps(r["id"]): r for r in found} == local


# --- Ray Serve -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def serve_url(ray_cluster):
    """Two replicas of the story model behind Serve's proxy on a free port."""
    import functools
    import socket

    from ray import serve

    from minitorch_infer.serving.ray_serve import openai_application, run_openai_application

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    application = openai_application(functools.partial(minitorch_infer.load, "story"), "story", replicas=2)
    url = run_openai_application(application, "127.0.0.1", port)
    yield url
    serve.shutdown()


def replica_pids() -> set[int]:
    import ray._private.state

    return {actor["Pid"] for actor in ray._private.state.actors().values()
            if actor["State"] == "ALIVE" and actor["ActorClassName"].startswith("ServeReplica:")}


def client(url: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=retries, timeout=60)


def test_replicas_answer_as_the_single_process_server(serve_url):
    chat = [{"role": "user", "content": "Once upon a time"}]
    with serving_in_thread(minitorch_infer.load("story"), "story") as single_url:
        answers = []
        for url in (single_url, serve_url):
            api = client(url)
            texts = [api.completions.create(model="story", prompt=p, temperature=0, max_tokens=20).choices[0].text
                     for p in PROMPTS[:6]]
            stream = api.chat.completions.create(model="story", messages=chat, temperature=0, max_tokens=20,
                                                 stream=True)
            texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
            texts.append(api.completions.create(model="story", prompt="The dog", max_tokens=12, seed=4).choices[0].text)
            answers.append(texts)
    assert answers[0] == answers[1]
    assert len(replica_pids()) == 2


def test_replicas_give_the_same_errors_and_metrics(serve_url):
    api = client(serve_url)
    with pytest.raises(openai.NotFoundError) as not_found:
        api.completions.create(model="other", prompt="x", max_tokens=2)
    assert not_found.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model="story", prompt="x", max_tokens=-1)
    assert bad.value.body["param"] == "max_tokens"
    assert [m.id for m in api.models.list()] == ["story"]
    import urllib.request
    metrics = urllib.request.urlopen(serve_url + "/metrics", timeout=30).read().decode()
    assert "minitorch_kv_blocks_free" in metrics and "minitorch_generation_tokens_total" in metrics


def test_killing_a_replica_loses_no_request_that_had_not_started_and_serve_restarts_it(serve_url):
    # The client retries an answer of 5xx, as the openai client does by default; a request whose stream had
    # begun (its 200 and headers sent) when its replica died ends with a broken stream instead.
    refused = []                                          # the 5xx answers the client retried
    hook = {"response": [lambda response: response.status_code >= 500 and refused.append(response.status_code)]}
    api = openai.OpenAI(base_url=serve_url + "/v1", api_key="unused", max_retries=3, timeout=60,
                        http_client=openai.DefaultHttpxClient(event_hooks=hook))
    tokens = 128                                          # long enough that requests are running at the kill
    expected = {p: client(serve_url).completions.create(model="story", prompt=p, temperature=0,
                                                        max_tokens=tokens).choices[0].text for p in PROMPTS}
    before = replica_pids()
    assert len(before) == 2
    outcomes: dict[int, tuple[str, str]] = {}
    started = threading.Semaphore(0)

    def stream(index: int, prompt: str) -> None:
        try:
            chunks = api.completions.create(model="story", prompt=prompt, temperature=0, max_tokens=tokens,
                                            stream=True)
        except openai.APIError as error:
            outcomes[index] = ("lost", repr(error))
            return
        started.release()
        try:
            outcomes[index] = ("done", "".join(c.choices[0].text for c in chunks if c.choices))
        except (openai.APIError, Exception) as error:   # the stream broke: it had begun
            outcomes[index] = ("broken", repr(error))

    from minitorch_infer.serving.ray_serve import MAX_ONGOING_REQUESTS

    # More requests than the two replicas take at once: the rest wait in Serve's proxy.
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(3 * MAX_ONGOING_REQUESTS)]
    threads = [threading.Thread(target=stream, args=(i, p)) for i, p in enumerate(prompts)]
    for thread in threads:
        thread.start()
    assert started.acquire(timeout=60)                   # requests are running: kill one replica now
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=120)
    assert all(not thread.is_alive() for thread in threads)
    lost = {i: o for i, o in outcomes.items() if o[0] == "lost"}
    assert not lost, lost
    broken = [o for o in outcomes.values() if o[0] == "broken"]
    assert broken or refused, "the kill met no running request: nothing was tested"
    for index, (kind, text) in outcomes.items():
        if kind == "done":
            assert text == expected[prompts[index]], index
    # Serve notices the death and starts a replica in a new process.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (len(replica_pids()) == 2 and victim not in replica_pids()):
        time.sleep(0.5)
    after = replica_pids()
    assert len(after) == 2 and victim not in after and after & before
    answer = api.completions.create(model="story", prompt=PROMPTS[0], temperature=0, max_tokens=tokens)
    assert answer.choices[0].text == expected[PROMPTS[0]]
