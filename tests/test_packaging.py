"""A regular (non-editable) install works from outside the checkout: every subpackage imports, the story
model ships inside it, and nothing goes under a generic top-level name."""

import os
import site
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_regular_install_runs_the_story_model_from_outside_the_checkout(tmp_path):
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    site_packages = next(environment.glob("lib/python*/site-packages"))
    # Our dependencies (numpy, tokenizers, ...) come from the interpreter running the tests, added as plain
    # path entries: .pth files there (an editable install of this checkout) are not processed, and the new
    # environment's own site-packages comes first, so only the installed copy of minitorch_infer is seen.
    (site_packages / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = environment / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
                             capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    # Every subpackage of the checkout must be installed (pyproject lists them one by one).
    subpackages = sorted(f"minitorch_infer.{d.name}" for d in (ROOT / "minitorch_infer").iterdir()
                         if (d / "__init__.py").exists())
    probe = ("import importlib, importlib.util, minitorch_infer as m;"
             f"[importlib.import_module(n) for n in {subpackages}];"
             "import minitorch_infer.ir, minitorch_infer.passes, minitorch_infer.backends.numpy;"
             "print(m.__file__);"
             "print([n for n in ('ir', 'passes', 'backends', 'architectures', 'models') if importlib.util.find_spec(n)]);"
             "model = m.load('story'); print(model.source);"
             "print(len(model.generate('Once upon a time', max_new_tokens=8, greedy=True).token_ids))")
    environ = {k: v for k, v in os.environ.items() if k != "MINITORCH_MODELS"}
    done = subprocess.run([str(python), "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env=environ)
    assert done.returncode == 0, done.stderr
    location, generic_names, story_source, new_tokens = done.stdout.strip().splitlines()
    assert location.startswith(str(environment)), location
    assert generic_names == "[]"
    assert story_source.startswith(str(site_packages / "minitorch_infer" / "models" / "story")), story_source
    assert new_tokens == "8"
    assert not (site_packages / "ir").exists() and (site_packages / "minitorch_infer" / "ir" / "ops.py").exists()
