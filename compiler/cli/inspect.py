"""`infoptc inspect MODEL`: opset, inputs/outputs, op histogram, parameters, size, FLOPs."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from .. import analysis, ir, memory
from ..errors import UsageError
from .output import emit_json, human_bytes, out


def add_parser(subparsers, common) -> dict:
    i = subparsers.add_parser("inspect", help="opset, inputs/outputs, op histogram, parameters, size, FLOPs")
    i.add_argument("model")
    i.add_argument("--quant", action="store_true",
                   help="which int8 regions ONNX Runtime really fuses into int8 kernels (loads the model in ORT)")
    i.add_argument("--memory", action="store_true",
                   help="activation memory: peak with no reuse, the planned arena, the lower bound, weights")
    i.add_argument("--input-shape", action="append", default=None, metavar="NAME:DIMS",
                   help="with --memory: bind an input's shape, e.g. input:1x3x224x224 (repeatable)")
    i.add_argument("--plot", default=None, metavar="PNG", help="with --memory: plot live bytes over the schedule")
    i.add_argument("--prune-groups", action="store_true",
                   help="the channel dependency groups that prune-channels sees, and why the others are left alone")
    common(i)
    return {"inspect": cmd_inspect}


def cmd_inspect(args: argparse.Namespace) -> int:
    model = ir.load_model(args.model)
    if args.quant:
        return _inspect_quant(args, model)
    if args.memory:
        return _inspect_memory(args, model)
    if args.input_shape or args.plot:
        raise UsageError("--input-shape and --plot go with --memory")
    if getattr(args, "prune_groups", False):
        return _inspect_prune_groups(args, model)
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


def _inspect_quant(args: argparse.Namespace, model) -> int:
    """The intended int8 regions (QDQ groups, int8 kernels) and what ONNX Runtime made of them."""
    import json

    from ..passes.quantize.fusion_check import fusion_report

    report = fusion_report(model)
    meta = {m.key: m.value for m in model.metadata_props}
    if "infoptc.quantization" in meta:
        report["recipe"] = json.loads(meta["infoptc.quantization"])
    if args.json:
        emit_json(report)
        return 0
    table = Table(title=f"{args.model}: int8 regions in ONNX Runtime (CPU)", title_justify="left", show_header=False)
    table.add_column()
    table.add_column()
    table.add_row("intended int8 ops", str(report["intended"]))
    table.add_row("fused into int8 kernels", str(report["fused"]))
    table.add_row("left in fp32 between Q/DQ", ", ".join(report["left_fp32"]) or "none")
    table.add_row("int8 kernels", ", ".join(f"{k} {v}" for k, v in report["kernels"].items()) or "none")
    table.add_row("Q/DQ conversions left", str(report["conversions"]))
    if "recipe" in report:
        table.add_row("recipe", escape(json.dumps(report["recipe"], sort_keys=True)))
    out.print(table)
    return 0


def _inspect_memory(args: argparse.Namespace, model) -> int:
    from ..driver import parse_input_shapes

    rep = memory_report(model, parse_input_shapes(args.input_shape or []))
    if args.plot:
        memory.plot_live_bytes(rep, args.plot, title=f"{args.model}: live activation bytes")
    if args.json:
        emit_json(rep.as_dict())
        return 0
    out.print(memory_table(rep, f"{args.model}: activation memory"))
    return 0


def memory_report(model, bind: dict) -> memory.MemoryReport:
    """The memory report of ``model`` with ``bind``'s input shapes; a name that is not an input
    is a usage error."""
    names = {vi.name for vi in model.graph.input}
    for name in bind:
        if name not in names:
            raise UsageError(f"--input-shape names {name!r}, which is not a model input "
                             f"(inputs: {', '.join(map(repr, sorted(names)))})")
    return memory.report(memory.program_of(model, bind))


def memory_table(rep: memory.MemoryReport, title: str, live_rows: int = 8) -> Table:
    per_unit = f" per unit of {', '.join(rep.symbols)}" if rep.symbols else ""
    table = Table(title=title + per_unit, title_justify="left", show_header=False)
    table.add_column()
    table.add_column(justify="right")
    table.add_row("schedule steps", str(rep.steps))
    table.add_row("peak with no reuse", human_bytes(rep.no_reuse))
    table.add_row(f"planned arena ({rep.plan.alignment}-byte aligned)", human_bytes(rep.planned))
    table.add_row("lower bound (most bytes live at one step)", human_bytes(rep.lower_bound))
    if rep.lower_bound:
        table.add_row("planned / lower bound", f"{rep.planned / rep.lower_bound:.3f}")
    table.add_row("weights", human_bytes(rep.weights))
    table.add_row("graph inputs", human_bytes(rep.inputs))
    table.add_row("peak at", escape(f"step {rep.peak_step}: {rep.peak_node}"))
    for name, size in rep.live_at_peak[:live_rows]:
        table.add_row(escape(f"  live: {name}"), human_bytes(size))
    if len(rep.live_at_peak) > live_rows:
        table.add_row(f"  ... {len(rep.live_at_peak) - live_rows} more live tensors", "")
    if rep.unknown:
        table.add_row(escape(f"unknown shapes (counted as 0 bytes): {', '.join(rep.unknown[:5])}"
                             + (" ..." if len(rep.unknown) > 5 else "")), str(len(rep.unknown)))
    return table
def _inspect_prune_groups(args: argparse.Namespace, model) -> int:
    """The channel groups of prune-channels' analysis: members, and reasons where not prunable."""
    from ..passes.compress.channel_groups import channel_groups

    groups = channel_groups(ir.to_graph(ir.infer_shapes(model))).groups
    if args.json:
        emit_json({"groups": [g.as_dict() for g in groups]})
        return 0
    prunable = [g for g in groups if g.prunable]
    table = Table(title=f"{args.model}: channel groups ({len(prunable)} of {len(groups)} prunable)",
                  title_justify="left")
    for col in ("group", "channels", "producers", "consumers", "per-channel members", "prunable / why not"):
        table.add_column(col, justify="right" if col in ("group", "channels") else "left")
    for g in groups:
        shape = f" (in {g.blocks} equal blocks)" if g.blocks > 1 else f" (whole heads of {g.unit})" if g.unit > 1 else ""
        why = "yes" + shape if g.prunable else (
            g.reasons[0] + (f" (+{len(g.reasons) - 1} more)" if len(g.reasons) > 1 else "") if g.reasons
            else "no producer with constant weights")
        table.add_row(str(g.root), str(g.size), escape("\n".join(g.producers)), escape("\n".join(g.consumers)),
                      escape("\n".join(g.members)), escape(why))
    out.print(table)
    return 0
