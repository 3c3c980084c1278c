"""Finding passes and targets: built-ins, entry points, and plugin files.

Third-party packages declare entry points in the groups ``infoptc.passes`` and
``infoptc.targets``; loading the entry point's object is enough, since registration happens
by decorator at import. A plugin that fails to import is a warning naming it, never a crash.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path

log = logging.getLogger("infoptc")

PASS_GROUP = "infoptc.passes"
TARGET_GROUP = "infoptc.targets"

_loaded_groups: set[str] = set()
failed_plugins: list[tuple[str, str]] = []  # (plugin, one-line reason), for the CLI to show


def load_builtin_passes() -> None:
    """Import the built-in pass modules (they register themselves) and entry-point passes."""
    importlib.import_module("infoptc.passes")
    load_entry_points(PASS_GROUP)


def load_entry_points(group: str) -> None:
    if group in _loaded_groups:
        return
    _loaded_groups.add(group)
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            ep.load()
        except Exception as e:  # any error inside someone else's package
            _warn(f"{ep.name} ({ep.value})", e)


def load_plugin_file(path: str | Path) -> bool:
    """Import a Python file so that the passes/targets it registers become available."""
    path = Path(path)
    if not path.is_file():
        _warn(str(path), FileNotFoundError("no such file"))
        return False
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"infoptc_plugin_{path.stem}_{digest}"
    if name in sys.modules:
        return True
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        _warn(str(path), e)
        return False
    return True


def _warn(plugin: str, error: BaseException) -> None:
    reason = f"{type(error).__name__}: {error}".splitlines()[0]
    failed_plugins.append((plugin, reason))
    log.warning("plugin %s failed to load and is ignored: %s", plugin, reason)
