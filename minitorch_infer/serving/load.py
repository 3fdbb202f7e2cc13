"""A load and fault test for a running server: many concurrent clients on loopback, some disconnecting
mid-stream, some sending malformed bodies; every valid request's text is checked against what it should be.

`run_round(url, model_name, expected, ...)` sends one round and returns its `RoundReport`;
benchmarks/serve_load.py runs rounds against a server it starts and prints them.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np


# Story openings for the story model: sixteen different prompts, so sixteen clients differ.
PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park. They", "One day, a cat",
           "Lily had a red ball", "The sun", "A big bear", "Mom said", "The boy ran", "It was a cold day",
           "The bird sang", "Max the cat", "In the garden", "Ben found a box", "The girl smiled", "Sam and Mia"]


@dataclass
class RoundReport:
    completed: int = 0
    disconnected: int = 0
    malformed_refused: int = 0
    wrong: list = field(default_factory=list)          # (prompt, expected, got) of valid requests gone wrong
    completion_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: list = field(default_factory=list)

    def summary(self) -> str:
        ttft = np.percentile(self.first_token_seconds, [50, 99]) * 1e3 if self.first_token_seconds else [0, 0]
        return (f"{self.completed} completed, {self.disconnected} disconnected early, {self.malformed_refused} "
                f"malformed refused, {len(self.wrong)} wrong; {self.completion_tokens / self.seconds:,.1f} "
                f"completion tok/s; time to first token p50 {ttft[0]:.0f} ms, p99 {ttft[1]:.0f} ms")


def run_round(url: str, model_name: str, expected: dict[str, str], requests: int, clients: int,
              max_tokens: int, disconnect_every: int = 10, malformed_every: int = 20) -> RoundReport:
    """`requests` streamed greedy completions of the prompts in `expected` (prompt -> its text), from `clients`
    threads; every disconnect_every-th hangs up after its first chunk, every malformed_every-th is bad JSON."""
    address = urlparse(url)
    prompts = list(expected)
    report, lock = RoundReport(), threading.Lock()
    numbers = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                number = next(numbers, None)
            if number is None:
                return
            prompt = prompts[number % len(prompts)]
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
            try:
                outcome = _one_request(connection, model_name, prompt, max_tokens, number, disconnect_every,
                                       malformed_every)
            finally:
                connection.close()
            with lock:
                kind, text, tokens, first_token = outcome
                if kind == "disconnected":
                    report.disconnected += 1
                elif kind == "malformed":
                    report.malformed_refused += 1
                elif text != expected[prompt]:
                    report.wrong.append((prompt, expected[prompt], text))
                else:
                    report.completed += 1
                    report.completion_tokens += tokens
                    report.first_token_seconds.append(first_token)

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.seconds = time.perf_counter() - began
    return report


def _one_request(connection, model_name: str, prompt: str, max_tokens: int, number: int, disconnect_every: int,
                 malformed_every: int) -> tuple[str, str, int, float]:
    """(kind, text, completion tokens, seconds to the first token) of one request."""
    if malformed_every and number % malformed_every == malformed_every - 1:
        connection.request("POST", "/v1/completions", b'{"model": "' + model_name.encode() + b'", "prompt": ',
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return ("malformed" if response.status == 400 else f"status {response.status}"), "", 0, 0.0
    body = {"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    pieces, tokens, first_token = [], 0, 0.0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"]:
            if not first_token:
                first_token = time.perf_counter() - began
            pieces.append(chunk["choices"][0]["text"])
            if disconnect_every and number % disconnect_every == 0:
                return "disconnected", "", 0, 0.0       # hang up after the first chunk
        else:
            tokens = chunk["usage"]["completion_tokens"]
    return "completed", "".join(pieces), tokens, first_token
