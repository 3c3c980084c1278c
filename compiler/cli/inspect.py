"""`infoptc inspect MODEL`: opset, inputs/outputs, op histogram, parameters, size, FLOPs."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from .. import analysis, ir
from .output import emit_json, human_bytes, out


def add_parser(subparsers, common) -> dict:
    i = subparsers.add_parser("inspect", help="opset, inputs/outputs, op histogram, parameters, size, FLOPs")
    i.add_argument("model")
    common(i)
    return {"inspect": cmd_inspect}


def cmd_inspect(args: argparse.Namespace) -> int:
    model = ir.load_model(args.model)
    summary = analysis.summarize(model)
    if args.json:
        emit_json(summary.as_dict())
        return 0
    head = Table(title=f"{args.model}", title_justify="left", show_header=False)
    head.add_column()
    head.add_column()
    head.add_row("opset / ir", f"{summary.opset} / {summary.ir_version}")
    head.add_row("producer", summary.producer or "-")
    for kind in ("inputs", "outputs"):
        for s in getattr(summary, kind):
            dims = "?" if s["shape"] is None else ", ".join(str(d) if d is not None else "?" for d in s["shape"])
            head.add_row(kind[:-1], escape(f"{s['name']}: {s['dtype']}[{dims}]"))
    head.add_row("nodes", str(summary.nodes))
    head.add_row("initializers", f"{summary.initializers} ({summary.parameters:,} parameters)")
    head.add_row("size", human_bytes(summary.bytes))
    head.add_row("FLOPs (symbolic dims = 1)", f"{summary.flops:,}" if summary.flops is not None
                 else escape(f"unknown: {summary.flops_unknown}"))
    if summary.functions:
        head.add_row("local functions", str(summary.functions))
    out.print(head)
    hist = Table(title="ops", title_justify="left")
    hist.add_column("op")
    hist.add_column("count", justify="right")
    for op, n in summary.histogram.items():
        hist.add_row(op, str(n))
    out.print(hist)
    return 0
