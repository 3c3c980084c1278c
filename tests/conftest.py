"""Shared fixtures: golden models built once per session, a CLI runner."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def golden(tmp_path_factory):
    """``golden("mlp") -> Path`` of the built model (each built at most once per session)."""
    import onnx

    from golden_models import BUILDERS

    folder = tmp_path_factory.mktemp("golden")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            path = folder / f"{name}.onnx"
            onnx.save(BUILDERS[name](), path)
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture
def cli(capsys):
    """``cli("compile", "m.onnx") -> (exit_code, stdout, stderr)``, in process."""
    from infoptc.cli import main

    def run(*argv: str):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
