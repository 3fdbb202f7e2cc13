"""A non-editable install works from outside the checkout, and puts nothing under a generic top-level name."""

import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_regular_install_imports_from_outside_the_checkout(tmp_path):
    environment = tmp_path / "venv"
    # Reuse this interpreter's dependencies (numpy, tokenizers, ...): the test is about our own packaging.
    venv.create(environment, system_site_packages=True, with_pip=True)
    python = environment / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                              str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    probe = ("import importlib.util, minitorch_infer, minitorch_infer.ir, minitorch_infer.passes, "
             "minitorch_infer.backends.numpy, minitorch_infer.architectures;"
             "print(minitorch_infer.__file__);"
             "print([n for n in ('ir', 'passes', 'backends', 'architectures') if importlib.util.find_spec(n)])")
    done = subprocess.run([str(python), "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    location, generic_names = done.stdout.strip().splitlines()
    assert location.startswith(str(environment)), location
    assert generic_names == "[]"
    site_packages = next(environment.glob("lib/python*/site-packages"))
    assert not (site_packages / "ir").exists() and (site_packages / "minitorch_infer" / "ir" / "ops.py").exists()
