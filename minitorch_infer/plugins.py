"""Plugins: modules that register ops, kernels, passes or architectures, loaded by name.

A plugin is any module whose import registers things (`register_op`, `kernel`, `register_pass`,
`register_architecture`). The CLI's `--plugin MODULE` imports one (a dotted module name on sys.path, or a
path to a .py file); installed packages announce theirs in the `minitorch_infer.plugins` entry-point group,
which `load()` and the CLI import once:

    [project.entry-points."minitorch_infer.plugins"]
    my_gpt2 = "my_package.gpt2"

`MINITORCH_PLUGINS` (names or paths separated by the OS path separator, ':' on Linux) is read by `load()` too;
`--plugin` sets it, so the processes `bench` starts load the same plugins.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from .errors import MinitorchError

ENTRY_POINT_GROUP = "minitorch_infer.plugins"
ENVIRONMENT_VARIABLE = "MINITORCH_PLUGINS"
_installed_loaded = False


def load_plugin(name: str) -> ModuleType:
    """Import a plugin by module name (`my_package.gpt2`) or .py path (`examples/architectures/gpt2.py`); a
    plugin already imported is not imported again. Any failure is a MinitorchError naming the plugin."""
    try:
        if name.endswith(".py") or "/" in name or "\\" in name:
            return _import_file(Path(name))
        return importlib.import_module(name)
    except MinitorchError:
        raise
    except ModuleNotFoundError as error:
        if error.name and name.startswith(error.name):
            raise MinitorchError(f"plugin {name!r}: no module named {error.name!r} (is it installed, or on "
                                 "PYTHONPATH? a file is given by its path, ending in .py)") from None
        raise MinitorchError(f"plugin {name!r} failed to import: {type(error).__name__}: {error}") from error
    except Exception as error:    # a plugin's own code may fail any way: say which plugin it was
        raise MinitorchError(f"plugin {name!r} failed to import: {type(error).__name__}: {error}") from error


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise MinitorchError(f"plugin {str(path)!r}: no such file")
    resolved = str(path.resolve())
    # the path's own name, so that two plugin files called gpt2.py do not replace each other
    module_name = f"minitorch_plugin_{path.stem}_{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) == resolved:
            return module
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load_plugins(names: list[str]) -> None:
    """Import each plugin (see load_plugin) and add it to MINITORCH_PLUGINS, for the processes this one starts."""
    for name in names:
        load_plugin(name)
    listed = [n for n in os.environ.get(ENVIRONMENT_VARIABLE, "").split(os.pathsep) if n]
    os.environ[ENVIRONMENT_VARIABLE] = os.pathsep.join(dict.fromkeys(listed + list(names)))


def load_configured_plugins() -> None:
    """Import the plugins of installed packages (the `minitorch_infer.plugins` entry-point group, once per
    process) and those MINITORCH_PLUGINS names (each import happens once)."""
    global _installed_loaded
    if not _installed_loaded:
        _installed_loaded = True
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                entry.load()
            except Exception as error:
                raise MinitorchError(f"installed plugin {entry.name!r} ({entry.value}, entry-point group "
                                     f"{ENTRY_POINT_GROUP}) failed to import: {type(error).__name__}: "
                                     f"{error}") from error
    for name in os.environ.get(ENVIRONMENT_VARIABLE, "").split(os.pathsep):
        if name:
            load_plugin(name)
