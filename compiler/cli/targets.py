"""`infoptc targets`: the targets (backends) this installation can build for."""

from __future__ import annotations

import argparse

from rich.table import Table

from .output import emit_json, out


def add_parser(subparsers, common) -> dict:
    t = subparsers.add_parser("targets", help="list the available targets")
    common(t)
    return {"targets": cmd_targets}


def cmd_targets(args: argparse.Namespace) -> int:
    from ..targets import TARGET_REGISTRY, load_targets

    load_targets()
    rows = [{"name": n, "summary": c.summary, "suffix": c.suffix} for n, c in sorted(TARGET_REGISTRY.items())]
    if args.json:
        emit_json(rows)
        return 0
    table = Table(title="targets", title_justify="left")
    for col in ("target", "artifact", "summary"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["suffix"], r["summary"])
    out.print(table)
    return 0
