"""Project configuration: ``infoptc.toml`` or ``[tool.infoptc]`` in ``pyproject.toml``.

Looked up from the current folder upwards; the first file found wins. Keys are the compile
flags in kebab-case (``opt-level = "3"``, ``target = "onnx"``, ``input-shape = ["x:1x3x8x8"]``).
Flags given on the command line always win over the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import UsageError

KEYS = {
    "target": str, "opt-level": str, "passes": str, "input-shape": list, "external-data": bool,
    "freeze-initializers": bool, "time-passes": bool, "stats": bool, "print-after": list, "verify-each": bool,
    "opt-bisect-limit": int, "threads": int, "load-plugin": list, "tune": int, "tune-time": float, "tuning-db": str,
    "arch": str, "mcpu": str, "mattr": str, "mtriple": str, "target-opt": list,
    # quantization (docs/quantization.md)
    "quantize": str, "calibration": str, "calibration-method": str, "calibration-samples": int,
    "calibration-cache": str, "per-tensor": bool, "exclude": list, "isa": str, "requantize": bool,
    "no-speed-check": bool, "equalize": bool, "bias-correction": bool, "smooth-quant": float,
    "metric": str, "accuracy-budget": float, "force": bool, "pareto-plot": str,
}


def find(start: Path | None = None) -> tuple[Path, dict] | None:
    folder = (start or Path.cwd()).resolve()
    for d in [folder, *folder.parents]:
        for name in ("infoptc.toml", "pyproject.toml"):
            path = d / name
            if not path.is_file():
                continue
            try:
                data = tomllib.loads(path.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise UsageError(f"{path}: not valid TOML ({e})") from None
            if name == "pyproject.toml":
                data = data.get("tool", {}).get("infoptc")
                if data is None:
                    continue
            return path, data
    return None


def load(start: Path | None = None) -> tuple[Path | None, dict]:
    found = find(start)
    if found is None:
        return None, {}
    path, data = found
    for key, value in data.items():
        if key not in KEYS:
            raise UsageError(f"{path}: unknown setting {key!r} (known: {', '.join(sorted(KEYS))})")
        want = KEYS[key]
        if want is str and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise UsageError(f"{path}: setting {key!r} must be a {want.__name__}, got {value!r}")
        data[key] = value
    return path, data


def apply(args: argparse.Namespace, found: tuple[Path | None, dict]) -> None:
    """Fill every flag the user left unset from the config file."""
    _, data = found
    for key, value in data.items():
        attr = key.replace("-", "_")
        if key == "load-plugin":
            continue  # plugins are loaded before the command runs; see cli.main
        if getattr(args, attr, None) in (None, []):
            setattr(args, attr, str(value).lstrip("O") if key == "opt-level" else value)


def plugin_files(found: tuple[Path | None, dict]) -> list[str]:
    path, data = found
    return [str((path.parent / p)) for p in data.get("load-plugin", [])] if path else []
