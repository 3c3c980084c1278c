"""Targets (backends) and the artifacts they produce.

A target lowers an optimized ``onnx.ModelProto`` to an ``Artifact`` that can be saved and run.
Targets register by decorator; third-party ones through the entry-point group
``infoptc.targets``. ``load()`` reopens any saved artifact by asking each target if it knows it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from .errors import InvalidModelError, UsageError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple  # ints, or strings for symbolic dims, or None for unknown ones


class Artifact:
    """A compiled model: ``save(path)`` writes it, ``run(inputs)`` executes it."""

    target: str = ""

    def save(self, path: str | os.PathLike) -> list[Path]:
        raise NotImplementedError

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @property
    def inputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    @property
    def outputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Facts for the compile summary (target string, versions, ...)."""
        return {"target": self.target}

    def analysis_model(self) -> onnx.ModelProto | None:
        """An ONNX model with the artifact's graph and shapes (its weights may be left out), for
        FLOPs estimates; None when the artifact does not know it."""
        return getattr(self, "model", None)

    def __repr__(self) -> str:
        def specs(items) -> str:
            return ", ".join(f"{s.name}: {s.dtype}[{', '.join('?' if d is None else str(d) for d in s.shape)}]"
                             if s.shape is not None else f"{s.name}: {s.dtype}[?]" for s in items)

        size = self.size_bytes()
        return (f"<{type(self).__name__} target={self.target!r} inputs=({specs(self.inputs)}) "
                f"outputs=({specs(self.outputs)})" + (f" size={size:,} B" if size is not None else "") + ">")

    def size_bytes(self) -> int | None:
        """The size of the saved artifact, where known without writing it."""
        return None


class Target:
    """Base class for backends."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    suffix: ClassVar[str] = ".onnx"  # default file name suffix of the artifact

    def __init__(self, **options: Any):
        self.options = options

    def check_available(self) -> None:
        """Raise ``MissingDependencyError`` naming what this target lacks on this machine."""

    def lower(self, model: onnx.ModelProto) -> Artifact:
        raise NotImplementedError

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return False

    @classmethod
    def load(cls, path: Path) -> Artifact:
        raise NotImplementedError


TARGET_REGISTRY: dict[str, type[Target]] = {}


def register_target(cls: type[Target]) -> type[Target]:
    if not cls.name:
        raise ValueError("a target needs a name")
    TARGET_REGISTRY[cls.name] = cls
    return cls


def load_targets() -> None:
    import importlib

    from . import plugins

    importlib.import_module("infoptc.backends")
    plugins.load_entry_points(plugins.TARGET_GROUP)


def get_target(name: str) -> type[Target]:
    load_targets()
    if name not in TARGET_REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(TARGET_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; available: {', '.join(sorted(TARGET_REGISTRY))}"
        raise UsageError(f"unknown target {name!r}{hint}")
    return TARGET_REGISTRY[name]


def load(path: str | os.PathLike) -> Artifact:
    """Reopen a saved artifact (an .onnx model or any target's own format)."""
    load_targets()
    path = Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    for cls in TARGET_REGISTRY.values():
        if cls.can_load(path):
            return cls.load(path)
    raise InvalidModelError(f"{path}: not an artifact any installed target can load")
