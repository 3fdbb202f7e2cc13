"""The OpenAI-compatible server, driven by the real `openai` client (sync and async) and by plain HTTP, against
a server started here on 127.0.0.1: answers equal the engine's own, streams join to the same text, errors
come back as OpenAI errors."""

import asyncio
import http.client
import json
import socket
import threading
import time

import openai
import pytest

import minitorch_infer
from conftest import require_model
from minitorch_infer.serving.app import serving_in_thread as serving
from minitorch_infer.serving.load import PROMPTS



@pytest.fixture(scope="module")
def story_server():
    """(a model of its own to compute expected answers with, the server's URL): while a server's engine runs
    on its thread, its model is not used from others."""
    with serving(minitorch_infer.load(require_model("story")), "story") as url:
        yield minitorch_infer.load(require_model("story")), url


@pytest.fixture(scope="module")
def client(story_server):
    return openai.OpenAI(base_url=story_server[1] + "/v1", api_key="unused", max_retries=0)


def test_a_greedy_chat_completion_equals_a_chat_session(story_server, client):
    model, _ = story_server
    reply = client.chat.completions.create(model="story", messages=[{"role": "user", "content": "Once upon a time"}],
                                           temperature=0, max_tokens=24)
    expected = model.chat().send("Once upon a time", greedy=True, max_new_tokens=24)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "length" and reply.object == "chat.completion"
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.prompt_tokens == len(expected.prompt_ids)


def test_smollm2_chat_with_its_own_template():
    model = minitorch_infer.load(require_model("smollm2-135m-instruct"), context=512)
    with serving(model, "smollm2") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=12)
        stream = client.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=12,
                                                stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    expected = model.chat().send("What is the capital of France?", greedy=True, max_new_tokens=12).text
    assert reply.choices[0].message.content == streamed == expected


def test_ignore_eos_runs_past_the_end_of_the_story(story_server, client):
    """The extension vLLM also takes: the greedy story ends at its 135th token, and with ignore_eos goes on to
    max_tokens, as Model.generate(ignore_eos=True) does."""
    model, _ = story_server
    plain = client.completions.create(model="story", prompt="Once upon a time", temperature=0, max_tokens=200)
    on = client.completions.create(model="story", prompt="Once upon a time", temperature=0, max_tokens=200,
                                   extra_body={"ignore_eos": True})
    expected = model.generate("Once upon a time", max_new_tokens=200, greedy=True, ignore_eos=True)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 200
    assert on.choices[0].finish_reason == "length" and on.usage.completion_tokens == 200
    assert on.choices[0].text == expected.text


def test_streamed_deltas_join_to_the_whole_answer_with_usage_last(client):
    whole = client.completions.create(model="story", prompt="Once upon a time", temperature=0, max_tokens=30)
    stream = client.completions.create(model="story", prompt="Once upon a time", temperature=0, max_tokens=30,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_sixteen_concurrent_streams_each_equal_their_solo_answer(story_server, client):
    model, _ = story_server
    expected = {p: model.generate(p, max_new_tokens=24, greedy=True).text for p in PROMPTS}
    found: dict[str, str] = {}

    def stream(prompt: str) -> None:
        chunks = client.completions.create(model="story", prompt=prompt, temperature=0, max_tokens=24, stream=True)
        found[prompt] = "".join(c.choices[0].text for c in chunks if c.choices)

    threads = [threading.Thread(target=stream, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == expected


def test_async_client_stop_strings_and_n(story_server):
    model, url = story_server

    async def ask():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stopped = await client.completions.create(model="story", prompt="Once upon a time", temperature=0,
                                                  max_tokens=60, stop=["Lily"])
        several = await client.completions.create(model="story", prompt="The little dog", max_tokens=20, n=3,
                                                  seed=4, temperature=1.0)
        await client.close()
        return stopped, several

    stopped, several = asyncio.run(ask())
    expected = model.generate("Once upon a time", greedy=True, max_new_tokens=60, stop=["Lily"])
    assert stopped.choices[0].text == expected.text and stopped.choices[0].finish_reason == "stop"
    # OpenAI's defaults (temperature 1, nothing else), and choice i seeded with seed + i:
    alone = [model.generate("The little dog", max_new_tokens=20, seed=4 + i, temperature=1.0, top_k=0, top_p=1.0,
                            min_p=0.0) for i in range(3)]
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == [r.text for r in alone]
    assert several.usage.completion_tokens == sum(len(r.token_ids) for r in alone)
    assert several.usage.prompt_tokens == len(model.encode("The little dog"))


def test_server_sent_events_are_framed_as_openai_frames_them(story_server):
    _, url = story_server
    connection = http.client.HTTPConnection(url.removeprefix("http://"))
    body = {"model": "story", "prompt": "Once upon a time", "max_tokens": 5, "stream": True, "temperature": 0}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    frames = response.read().decode().split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    for frame in frames[:-2]:
        assert frame.startswith("data: ") and json.loads(frame[6:])["object"] == "text_completion"


def test_models_health_and_metrics(story_server, client):
    _, url = story_server
    assert [m.id for m in client.models.list()] == ["story"]
    connection = http.client.HTTPConnection(url.removeprefix("http://"))
    connection.request("GET", "/health")
    assert json.loads(connection.getresponse().read()) == {"status": "ok"}
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    for metric in ("minitorch_requests_running", "minitorch_requests_waiting", "minitorch_kv_blocks_used",
                   "minitorch_kv_blocks_free", "minitorch_prompt_tokens_total", "minitorch_generation_tokens_total",
                   "minitorch_prefix_cache_hit_tokens_total", "minitorch_time_to_first_token_seconds_bucket",
                   "minitorch_inter_token_latency_seconds_bucket"):
        assert metric in text, metric


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    ({"model": "story", "prompt": 5}, 400, "prompt", "prompt must be"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "model", "does not exist"),
    ({"model": "story", "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "positive integer"),
    ({"model": "story", "prompt": "x", "max_tokens": 10 ** 9}, 400, "max_tokens", "context length"),
    ({"model": "story", "prompt": "x", "temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"model": "story", "prompt": "x", "seed": 1.5}, 400, "seed", "seed must be an integer"),
    ({"model": "story", "prompt": "word " * 600}, 400, None, "longer than the context length"),
    ({"model": "story", "prompt": "x", "logprobs": 9}, 400, "logprobs", "integer from 0 to 5"),
    ({"model": "story", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs",
     "needs logprobs: true"),
    ({"model": "story", "messages": "hi"}, 400, "messages", "non-empty list"),
    ({"model": "story", "prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos", "true or false"),
])
def test_bad_requests_get_openai_errors(story_server, body, status, param, words):
    _, url = story_server
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    connection = http.client.HTTPConnection(url.removeprefix("http://"))
    connection.request("POST", path, body if isinstance(body, bytes) else json.dumps(body),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == status and error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_an_api_key_is_required_when_set():
    model = minitorch_infer.load(require_model("story"))
    with serving(model, "story", api_key="sesame") as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert client.completions.create(model="story", prompt="Once", max_tokens=3).choices[0].text


def metric(url: str, name: str) -> float:
    connection = http.client.HTTPConnection(url.removeprefix("http://"))
    connection.request("GET", "/metrics")
    line = next(l for l in connection.getresponse().read().decode().splitlines() if l.startswith(name + " "))
    return float(line.split()[1])


def kv_blocks_used(url: str) -> float:
    return metric(url, "minitorch_kv_blocks_used")


def paced(model, seconds: float = 0.002):
    """The model with a pause before each engine step: the engine makes a story request's 400 tokens in ~30 ms,
    sooner than a client hangs up or fills a queue, and these tests are about what happens meanwhile."""
    step = model.step

    def paced_step(*args, **kwargs):
        time.sleep(seconds)
        return step(*args, **kwargs)
    model.step = paced_step
    return model


def test_a_client_that_disconnects_mid_stream_frees_its_blocks():
    """The request ends with the connection, not with its 400 tokens (ignore_eos: the greedy story would end at
    135): fewer are generated, and its blocks return."""
    with serving(paced(minitorch_infer.load(require_model("story"))), "story") as url:
        connection = http.client.HTTPConnection(url.removeprefix("http://"))
        body = {"model": "story", "prompt": "Once upon a time", "max_tokens": 400, "stream": True, "temperature": 0,
                "ignore_eos": True}
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        connection.getresponse().read(200)                      # a few chunks, then hang up
        assert kv_blocks_used(url) > 0
        connection.close()
        deadline = time.monotonic() + 10
        while kv_blocks_used(url) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kv_blocks_used(url) == 0
        assert metric(url, "minitorch_generation_tokens_total") < 400


def test_a_full_queue_answers_429_with_retry_after():
    with serving(paced(minitorch_infer.load(require_model("story"))), "story", max_queue=1) as url:
        engine_waiting = []
        slow = {"model": "story", "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0, "stream": True}
        connections = []
        for _ in range(40):                                    # more than one step admits: some must wait
            connection = http.client.HTTPConnection(url.removeprefix("http://"))
            connection.request("POST", "/v1/completions", json.dumps(slow), {"Content-Type": "application/json"})
            connections.append(connection)
        statuses = []
        for connection in connections:
            response = connection.getresponse()
            statuses.append(response.status)
            if response.status == 429:
                engine_waiting.append(response.getheader("Retry-After"))
                assert json.loads(response.read())["error"]["code"] == "queue_full"
            connection.close()
    assert 429 in statuses and 200 in statuses and set(engine_waiting) == {"1"}


def test_sigterm_stops_the_command_cleanly():
    import signal
    import subprocess
    import sys

    require_model("story")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "minitorch_infer", "serve", "-m", "story", "--port", str(port),
                               "--shutdown-grace", "2", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                connection.request("GET", "/health")
                assert connection.getresponse().status == 200
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()


def test_load_with_disconnects_and_malformed_requests_leaves_nothing_behind(story_server):
    """The suite's small version of benchmarks/serve_load.py."""
    from minitorch_infer.serving.load import run_round

    model, url = story_server
    while kv_blocks_used(url) > 0:                              # earlier tests' cancelled streams settle first
        time.sleep(0.05)
    expected = {p: model.generate(p, max_new_tokens=12, greedy=True).text for p in PROMPTS[:6]}
    report = run_round(url, "story", expected, requests=40, clients=8, max_tokens=12)
    assert report.wrong == [] and report.completed == 40 - 4 - 2
    assert report.disconnected == 4 and report.malformed_refused == 2
    deadline = time.monotonic() + 10
    while kv_blocks_used(url) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kv_blocks_used(url) == 0


def test_logprobs_are_the_engines_whole_and_streamed(story_server, client):
    model, _ = story_server
    alone = model.generate("Once upon a time", max_new_tokens=6, greedy=True, logprobs=3)
    whole = client.completions.create(model="story", prompt="Once upon a time", max_tokens=6, temperature=0,
                                      logprobs=3).choices[0].logprobs
    assert whole.token_logprobs == pytest.approx([e.logprob for e in alone.logprobs], abs=1e-5)
    assert [list(top.values()) for top in whole.top_logprobs] == \
        [pytest.approx([lp for _, lp in e.top], abs=1e-5) for e in alone.logprobs]
    assert "".join(whole.tokens) == alone.text and whole.text_offset[0] == 0
    streamed = client.completions.create(model="story", prompt="Once upon a time", max_tokens=6, temperature=0,
                                         logprobs=3, stream=True)
    assert [lp for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
            for lp in chunk.choices[0].logprobs.token_logprobs] == pytest.approx(whole.token_logprobs, abs=1e-6)
    chat = client.chat.completions.create(model="story", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    expected = model.chat().send("Hi", greedy=True, max_new_tokens=4, logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
