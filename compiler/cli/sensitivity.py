"""`infoptc sensitivity MODEL --calibration CAL`: how much error each layer brings in int8.

For every layer quantize-int8 would quantize: the metric with only that layer in int8, and with
every layer but that one in int8; a table worst first, and optionally a plot. The measuring is
library code (infoptc.passes.quantize.sensitivity)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rich.table import Table

from ..errors import UsageError
from ..passes.quantize.metrics import METRICS
from ..plotting import figure
from .output import emit_json, out, status


def add_parser(subparsers, common) -> dict:
    p = subparsers.add_parser(
        "sensitivity", help="per-layer int8 sensitivity: the metric with each layer alone in int8, and left out",
        description="Quantize one layer at a time (and leave one out at a time) and score each model against "
                    "the fp32 one on the calibration data. Sorted worst first: the top rows are the layers "
                    "to keep in higher precision (what --quantize auto does by itself).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--calibration", required=True, metavar="CAL",
                   help=".npz with one array per input (samples stacked), or a folder of .npz files; an array "
                        "'labels' gives the accuracy metric its labels")
    p.add_argument("--metric", default="sqnr", choices=list(METRICS), help="default: sqnr (dB)")
    p.add_argument("-O", dest="opt_level", default="3", metavar="LEVEL",
                   help="the -O level the model is optimized at first, as compile would (default 3)")
    p.add_argument("--calibration-samples", type=int, default=0, metavar="N", help="use the first N samples")
    p.add_argument("--calibration-method", default="mse", choices=["minmax", "percentile", "entropy", "mse"])
    p.add_argument("--calibration-cache", default="", metavar="FILE", help="keep observed ranges here")
    p.add_argument("--no-leave-out", action="store_true", help="only the layer-alone column (half the runs)")
    p.add_argument("--top", type=int, default=None, metavar="N", help="show the N worst layers (default: all)")
    p.add_argument("--plot", metavar="FILE.png", help="draw both columns per layer (needs matplotlib)")
    common(p)
    return {"sensitivity": cmd_sensitivity}


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from ..driver import prepare_for_quantization
    from ..passes.quantize.sensitivity import analyze

    if args.calibration_samples < 0 or (args.top is not None and args.top < 1):
        raise UsageError("--calibration-samples must be >= 0 and --top >= 1")
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise UsageError(f"cannot write {args.plot}: folder {Path(args.plot).parent} does not exist")
    with status(args, "optimizing"):
        model = prepare_for_quantization(args.model, args.opt_level)
    result = analyze(model, args.calibration, args.metric, args.calibration_samples, args.calibration_cache,
                     leave_out=not args.no_leave_out, method=args.calibration_method)
    if args.plot:
        _plot(result, Path(args.plot))
    if args.json:
        emit_json(result.as_dict())
        return 0
    rows = result.rows if args.top is None else result.rows[: args.top]
    table = Table(title=f"int8 sensitivity, {result.metric} against fp32 (fp32 itself: {_fmt(result.fp32_score)}; "
                        f"every layer int8: {_fmt(result.all_int8_score)}), worst first", title_justify="left")
    for col in ("layer", "op", "alone in int8", "left out of int8"):
        table.add_column(col, justify="left" if col in ("layer", "op") else "right")
    for r in rows:
        table.add_row(r["layer"], r["op"], _fmt(r["alone"]), _fmt(r["left_out"]) if "left_out" in r else "-")
    out.print(table)
    if args.plot:
        out.print(f"wrote {args.plot}", markup=False)
    return 0


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4g}"


def _plot(result, path: Path) -> None:
    rows = result.rows
    with figure(path, figsize=(9, 1.5 + 0.25 * len(rows))) as (fig, ax):
        ys = range(len(rows))
        ax.barh([y + 0.2 for y in ys], [r["alone"] for r in rows], height=0.4, label="only this layer int8")
        if rows and "left_out" in rows[0]:
            ax.barh([y - 0.2 for y in ys], [r["left_out"] for r in rows], height=0.4,
                    label="every layer but this one int8")
        ax.axvline(result.all_int8_score, color="gray", linestyle="--", label="every layer int8")
        ax.set_yticks(list(ys), [r["layer"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel=result.metric, title="int8 sensitivity per layer (worst first)")
        ax.legend(fontsize=8)
