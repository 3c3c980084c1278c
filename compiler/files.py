"""Files around a model that the library and the command line both read or write: input feeds
as .npz, and JSON reports, written atomically."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .ir import write_atomic


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays by name from an .npz file (no pickles); a missing or unreadable file is a UsageError."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such inputs file")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as e:
        raise UsageError(f"{p}: not a readable .npz file ({str(e).splitlines()[0]})") from None


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    target = Path(path)
    if not target.parent.is_dir():
        raise UsageError(f"cannot write {target}: folder {target.parent} does not exist")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(target, buf.getvalue())


def dumps_json(data: Any) -> str:
    """Indented JSON, one trailing newline; what it cannot encode (paths, numpy scalars) as str."""
    return json.dumps(data, indent=2, default=str) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_atomic(Path(path), dumps_json(data).encode())
