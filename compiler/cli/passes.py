"""`infoptc passes`: the registered passes, or the pipeline of an -O level."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.markup import escape
from rich.table import Table

from .. import plugins
from .output import emit_json, out


def add_parser(subparsers, common) -> dict:
    p = subparsers.add_parser("passes", help="list registered passes, or print the pipeline of an -O level")
    p.add_argument("--pipeline", action="store_true", help="print the pipeline string of the -O level instead")
    p.add_argument("-O", dest="opt_level", default="2", choices=["0", "1", "2", "3", "s"], metavar="LEVEL")
    common(p)
    return {"passes": cmd_passes}


def cmd_passes(args: argparse.Namespace) -> int:
    from ..pass_manager import PASS_REGISTRY
    from ..pipelines import parse_pipeline, pipeline_for_level

    plugins.load_builtin_passes()
    if args.pipeline:
        text = pipeline_for_level(args.opt_level)
        parse_pipeline(text)  # proves every pass of the level exists
        if args.json:
            emit_json({"level": f"O{args.opt_level}", "pipeline": text})
        else:
            sys.stdout.write(text + "\n")
        return 0
    rows = []
    for name in sorted(PASS_REGISTRY):
        cls = PASS_REGISTRY[name]
        rows.append({"name": name, "summary": cls.summary, "contract": cls.contract.value,
                     "options": {k: {"default": o.default, "help": o.help} for k, o in cls.options.items()},
                     "module": cls.__module__})
    if args.json:
        emit_json(rows)
        return 0
    table = Table(title="registered passes", title_justify="left")
    for col in ("pass", "contract", "summary", "options (default)"):
        table.add_column(col)
    for r in rows:
        opts = "\n".join(f"{k}={_plain(v['default'])}" for k, v in r["options"].items())
        table.add_row(r["name"], r["contract"], escape(r["summary"]), escape(opts))  # "E[x]" is no markup
    out.print(table)
    return 0


def _plain(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)
