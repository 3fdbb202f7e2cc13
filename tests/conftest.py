"""Shared test helpers: finding real models and the reference outputs, skipping or failing as CI wants.

On a user's machine a test that needs a missing model skips; with MINITORCH_REQUIRE_MODELS=1 (CI) it fails.
"""

import json
import os
from pathlib import Path

import pytest

import minitorch_infer
from minitorch_infer.errors import ModelNotFoundError
from minitorch_infer.formats.model_files import find_model

# transformers' outputs on the real models, copied from ../shared/reference (its README says how they were made)
REFERENCE_DIR = Path(__file__).resolve().parent / "fixtures" / "reference"


def missing(what: str):
    if os.environ.get("MINITORCH_REQUIRE_MODELS") == "1":
        pytest.fail(f"{what} is required (MINITORCH_REQUIRE_MODELS=1) but missing")
    pytest.skip(f"{what} not available")


def kinds_of_steps(model) -> tuple:
    """Logits of a 5-token prompt, of one decode token, and of a batched step of three sequences (for comparing
    two ways of computing the same model)."""
    sequences = [model.kv_cache.open() for _ in range(3)]
    try:
        for s in sequences:
            s.reserve(8)
        prompt = model.step(sequences[:1], [[1, 5, 9, 200, 7]]).copy()
        decode = model.step(sequences[:1], [[11]]).copy()
        batched = model.step(sequences, [[12, 13], [7, 8], [9, 10]]).copy()
        return prompt, decode, batched
    finally:
        for s in sequences:
            s.close()


def require_model(name: str) -> Path:
    try:
        return find_model(name)
    except ModelNotFoundError:
        missing(f"model {name!r}")


def reference(model: str) -> dict:
    """The transformers reference outputs for 'story' or 'smollm2', with that model's prompts merged in."""
    outputs, prompts = REFERENCE_DIR / "reference_outputs.json", REFERENCE_DIR / "prompts.json"
    data = json.loads(outputs.read_text())[model]
    data["prompts"] = json.loads(prompts.read_text())[model]
    return data


@pytest.fixture(scope="session")
def story_model():
    return minitorch_infer.load(require_model("story"))


@pytest.fixture(scope="session")
def story_reference():
    return reference("story")


@pytest.fixture(scope="session")
def smollm2_model():
    return minitorch_infer.load(require_model("smollm2-135m-instruct"), context=1024)


@pytest.fixture(scope="session")
def smollm2_reference():
    return reference("smollm2")


def numba_threads_under_a_limit_of_one(call) -> list[int]:
    """Run call() in a new thread with `--threads 1` in force (quantized.limit_threads) and return the Numba
    thread count that thread has afterwards: the limit belongs to each calling thread, set on its first kernel."""
    import threading

    import numba

    from minitorch_infer.backends import quantized

    seen = []

    def in_thread():
        call()
        seen.append(numba.get_num_threads())

    quantized.limit_threads(1)
    try:
        worker = threading.Thread(target=in_thread)
        worker.start()
        worker.join()
    finally:
        quantized.limit_threads(0)
    return seen
