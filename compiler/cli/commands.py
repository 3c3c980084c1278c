"""Extra CLI commands (bench, verify, profile, reduce, ...), each in its own module.

A module listed in ``MODULES`` defines ``add_parser(subparsers, common)`` that adds its
subcommand and returns ``{name: handler}``; ``handler(args) -> exit code``.
"""

from __future__ import annotations

import importlib

MODULES: list[str] = ["bench", "profile", "compare", "bisect"]


def add_all(subparsers, common) -> dict:
    handlers = {}
    for name in MODULES:
        module = importlib.import_module(f"infoptc.{name}")
        handlers.update(module.add_parser(subparsers, common))
    return handlers
