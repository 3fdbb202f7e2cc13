"""Where model files are looked up: $MINITORCH_MODELS, ./models, the models that ship with the package,
then ../shared/models/.

A name ("story", "smollm2-135m-instruct") is resolved against those folders; a path is taken as it is.
"""

import os
from pathlib import Path

from .. import models as bundled_models
from ..errors import ModelNotFoundError

# The package's own models folder: the checkout's models/ under an editable install, site-packages'
# minitorch_infer/models/ under a regular one. The story model ships there; fetched models go there.
BUNDLED_MODELS_DIR = Path(bundled_models.__file__).resolve().parent
CHECKOUT_ROOT = BUNDLED_MODELS_DIR.parent

# Short names users may type, mapped to the file or folder name they stand for.
KNOWN_MODELS = {
    "story": "story",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
}
# How to get each known model that does not ship with the package.
HOW_TO_GET = {
    "smollm2-135m-instruct": "minitorch-infer fetch smollm2-135m-instruct",
}


def model_search_dirs() -> list[Path]:
    """The folders searched for a model name, in order."""
    dirs = []
    if os.environ.get("MINITORCH_MODELS"):
        dirs.append(Path(os.environ["MINITORCH_MODELS"]))
    dirs += [Path.cwd() / "models", BUNDLED_MODELS_DIR,
             Path.cwd().parent / "shared" / "models", CHECKOUT_ROOT.parent / "shared" / "models"]
    unique = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find_model(name_or_path: str | os.PathLike) -> Path:
    """Resolve a model path or a known name to an existing file or folder, or raise ModelNotFoundError
    saying how to get a known model, or which names are known."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    file_name = KNOWN_MODELS.get(name, name)
    for folder in model_search_dirs():
        candidate = folder / file_name
        if candidate.exists():
            return candidate
    searched = ", ".join(str(d) for d in model_search_dirs())
    if name in HOW_TO_GET:
        raise ModelNotFoundError(f"model {name!r} is not downloaded yet: run `{HOW_TO_GET[name]}` "
                                 f"(searched {searched})")
    raise ModelNotFoundError(f"model {name!r} not found: it is not a path, and not a known name "
                             f"({', '.join(KNOWN_MODELS)}); a model folder (config.json + *.safetensors) "
                             f"or a .gguf file can be given by its path (searched {searched})")
