"""Figures for the commands' ``--plot`` flags: matplotlib (an optional dependency) without a
display, written atomically in the format of the file's suffix."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import MissingDependencyError, UsageError
from .ir import write_atomic


@contextlib.contextmanager
def figure(path: str | os.PathLike, flag: str = "--plot", **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """``(fig, axes)`` from ``plt.subplots(**subplots)``; the figure is laid out and written to
    ``path`` when the block ends without an error. ``flag`` names the option in error messages."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError(f"{flag} needs matplotlib (pip install matplotlib)") from None
    target = Path(path)
    fmt = target.suffix.lstrip(".").lower() or "png"
    fig, axes = plt.subplots(**subplots)
    buffer = io.BytesIO()
    try:
        yield fig, axes
        fig.tight_layout()
        try:
            fig.savefig(buffer, format=fmt, dpi=100)
        except ValueError as e:
            raise UsageError(f"{flag} {target}: {str(e).splitlines()[0]}") from None
    finally:
        plt.close(fig)
    write_atomic(target, buffer.getvalue())
