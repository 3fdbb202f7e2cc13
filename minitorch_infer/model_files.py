"""Where model files are looked up: $MINITORCH_MODELS, then the checkout's models/, then ../shared/models/.

A name ("story", "smollm2-135m-instruct") is resolved against those folders; a path is taken as it is.
"""

import os
from pathlib import Path

from .errors import ModelNotFoundError

REPO_ROOT = Path(__file__).resolve().parent.parent

# Short names users may type, mapped to the file or folder name they stand for.
KNOWN_MODELS = {
    "story": "story",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
}


def model_search_dirs() -> list[Path]:
    """The folders searched for a model name, in order."""
    dirs = []
    if os.environ.get("MINITORCH_MODELS"):
        dirs.append(Path(os.environ["MINITORCH_MODELS"]))
    # The checkout's models/ and the shared folder beside it, found from the working directory (an
    # installed package lives elsewhere) and from this file (an editable install lives in the checkout).
    for root in (Path.cwd(), REPO_ROOT):
        dirs.append(root / "models")
        dirs.append(root.parent / "shared" / "models")
    unique = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find_model(name_or_path: str | os.PathLike) -> Path:
    """Resolve a model path or a known name to an existing file or folder, or raise ModelNotFoundError."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    file_name = KNOWN_MODELS.get(str(name_or_path), str(name_or_path))
    for folder in model_search_dirs():
        candidate = folder / file_name
        if candidate.exists():
            return candidate
    searched = ", ".join(str(d) for d in model_search_dirs())
    raise ModelNotFoundError(f"model {str(name_or_path)!r} not found: not a path, and not in {searched}")
