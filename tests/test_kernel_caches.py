"""Numba keeps compiled kernels in a disk cache keyed on the text of the kernel's own source file (a hash of it,
in Numba 0.68), so a change to a module whose intrinsics or functions a kernel compiles in (vector_lanes.py,
dot_tiles.py) would leave the kernel running its old machine code, in a checkout that pulls the change or a
developer's own run. Each backends module with cached kernels therefore carries a fingerprint of the sibling
modules it compiles in, so that a change to them changes its text too; this test keeps the fingerprints
current."""

import hashlib
import re
from pathlib import Path

import pytest

BACKENDS = Path(__file__).resolve().parent.parent / "backends"
FINGERPRINT = re.compile(r"^# Compiled with the helpers of fingerprint ([0-9a-f]{12}) ", re.MULTILINE)


def _sibling_imports(module: Path) -> set[str]:
    return set(re.findall(r"^from \.(\w+) import", module.read_text(), re.MULTILINE))


def _helpers(module: Path) -> list[Path]:
    """The sibling modules `module` imports, and theirs, transitively."""
    found, waiting = set(), list(_sibling_imports(module))
    while waiting:
        name = waiting.pop()
        if name not in found:
            found.add(name)
            waiting.extend(_sibling_imports(BACKENDS / f"{name}.py"))
    return [BACKENDS / f"{name}.py" for name in sorted(found)]


def fingerprint(helpers: list[Path]) -> str:
    digest = hashlib.sha256()
    for helper in helpers:
        digest.update(helper.name.encode() + b"\0" + helper.read_bytes())
    return digest.hexdigest()[:12]


CACHED_KERNEL_MODULES = sorted(path for path in BACKENDS.glob("*.py")
                               if "cache=True" in path.read_text() and _helpers(path))


def test_the_modules_with_cached_kernels_are_found():
    names = {path.name for path in CACHED_KERNEL_MODULES}
    assert {"attention_kernels.py", "row_kernels.py", "panel_kernels.py", "quantized_kernels.py"} <= names


@pytest.mark.parametrize("module", CACHED_KERNEL_MODULES, ids=lambda path: path.name)
def test_each_cached_kernel_module_names_the_current_fingerprint_of_its_helpers(module):
    helpers = _helpers(module)
    expected = fingerprint(helpers)
    found = FINGERPRINT.findall(module.read_text())
    line = (f"# Compiled with the helpers of fingerprint {expected} "
            f"({', '.join(helper.name for helper in helpers)}; tests/test_kernel_caches.py).")
    assert found == [expected], (
        f"backends/{module.name} compiles in code from {', '.join(h.name for h in helpers)}, whose text changed: "
        f"Numba would run its cached kernels' old machine code. Set its fingerprint line (after the docstring) "
        f"to:\n{line}")
