"""`infoptc compile MODEL` (also the bare `infoptc MODEL`): optimize, lower for a target, write
the artifact, and show what changed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from .. import analysis, config, ir
from ..errors import UsageError
from .output import emit_json, err, human_bytes, out


def add_parser(subparsers, common) -> dict:
    c = subparsers.add_parser("compile", help="optimize a model and lower it for a target (the default command)")
    c.add_argument("model", help="input .onnx model (never modified)")
    c.add_argument("-o", "--output", help="artifact path (default: MODEL_STEM.opt<suffix> in the current folder)")
    c.add_argument("-O", dest="opt_level", default=None, choices=["0", "1", "2", "3", "s"], metavar="LEVEL",
                   help="optimization level: -O0 -O1 -O2 (default) -O3 -Os")
    c.add_argument("--target", default=None, help="backend: onnx (default); see `infoptc targets`")
    c.add_argument("--passes", default=None, metavar="PIPELINE",
                   help='explicit pipeline, replacing -O: "dce,fold-constants{size-limit=1MB},fixpoint(cse,dce)"')
    c.add_argument("--input-shape", action="append", default=None, metavar="NAME:DIMS",
                   help="bind an input's shape, e.g. input:1x3x224x224 (repeatable)")
    c.add_argument("--freeze-initializers", action="store_true", default=None,
                   help="treat initializers listed as graph inputs as constants (as onnxsim does); "
                        "the output stops accepting them as inputs")
    c.add_argument("--external-data", action="store_true", default=None,
                   help="write tensors to OUTPUT.data beside the model (automatic above 1.8 GB)")
    c.add_argument("--time-passes", action="store_true", default=None, help="table of time per pass")
    c.add_argument("--stats", action="store_true", default=None, help="the counters of every pass")
    c.add_argument("--print-after", action="append", default=None, metavar="PASS|all",
                   help="dump the graph (on stderr) after the named pass, or after all (repeatable)")
    c.add_argument("--verify-each", action="store_true", default=None,
                   help="after every changing pass: checker, shape inference and a numerical check vs the input")
    c.add_argument("--opt-bisect-limit", type=int, default=None, metavar="N",
                   help="run only the first N pass applications (find a bad pass by bisection)")
    c.add_argument("--threads", type=int, default=None, help="threads for the runtime of the artifact")
    tv = c.add_argument_group("TVM targets (llvm, cuda)")
    tv.add_argument("--tune", type=int, default=None, metavar="TRIALS",
                    help="MetaSchedule trial budget (default: untuned rule-based schedules)")
    tv.add_argument("--tune-time", type=float, default=None, metavar="SECONDS",
                    help="MetaSchedule time budget; with --tune, whichever runs out first")
    tv.add_argument("--tuning-db", default=None, metavar="DIR",
                    help="tuning records, reused by the next compile (default with --tune/--tune-time: "
                         "~/.cache/infoptc/tune)")
    tv.add_argument("--arch", default=None, help="cuda: GPU architecture, e.g. sm_90")
    tv.add_argument("--mcpu", default=None, help="llvm: CPU name (default: the host's, detected)")
    tv.add_argument("--mattr", default=None, help="llvm: comma-separated CPU features, e.g. +avx2,+fma")
    tv.add_argument("--mtriple", default=None, help="llvm: cross-compilation triple, e.g. aarch64-linux-gnu")
    tv.add_argument("--target-opt", action="append", default=None, metavar="KEY=VALUE",
                    help="any other target option (repeatable), e.g. schedules=none, fast_math=false")
    c.add_argument("--bisect", action="store_true",
                   help="find the first pass application that breaks equivalence (same as `infoptc reduce`)")
    common(c)
    return {"compile": cmd_compile}


def cmd_compile(args: argparse.Namespace) -> int:
    from ..driver import compile as compile_model
    from ..driver import parse_input_shapes
    from ..instruments import PrintAfter, Stats, TimePasses
    from ..targets import get_target

    config.apply(args, args.config)
    if args.bisect:
        from .reduce import run_bisect_cli

        return run_bisect_cli(args)
    target = args.target or "onnx"
    opt_level = args.opt_level or "2"
    input_path = Path(args.model)
    output = Path(args.output) if args.output else Path(input_path.stem + ".opt" + get_target(target).suffix)
    if input_path.exists() and output.exists() and output.resolve() == input_path.resolve():
        raise UsageError(f"output {output} is the input model; choose another path (the input is never modified)")
    if output.parent != Path("") and not output.parent.is_dir():
        raise UsageError(f"cannot write {output}: folder {output.parent} does not exist")

    timing, stats = TimePasses(), Stats()
    instruments: list = [timing, stats]
    if args.print_after:
        instruments.append(PrintAfter(set(args.print_after), lambda text: sys.stderr.write(text)))
    target_options = _target_options(args)
    artifact = compile_model(
        input_path, target=target, opt_level=opt_level, passes=args.passes,
        input_shapes=parse_input_shapes(args.input_shape or []), instruments=instruments,
        freeze_initializers=bool(args.freeze_initializers),
        verify_each=bool(args.verify_each), opt_bisect_limit=args.opt_bisect_limit, **target_options,
    )
    if args.opt_bisect_limit is not None:
        for rec in artifact.pass_records:
            err.print(f"BISECT: {'running' if not rec.skipped else 'NOT running'} pass ({rec.index}) {rec.pass_}",
                      markup=False)
    written = artifact.save(output) if not args.external_data else _save_external(artifact, output)
    after = getattr(artifact, "model", None)
    report = {
        "input": str(input_path),
        "output": [str(p) for p in written],
        "target": artifact.describe(),
        "pipeline": artifact.pipeline,
        "before": _size_facts(artifact.source),
        "after": _size_facts(after) if after is not None else None,
    }
    if args.time_passes:
        report["time_passes"] = [dict(zip(("pass", "runs", "changed", "seconds"), r)) for r in timing.rows()]
    if args.stats:
        report["stats"] = stats.as_dict()
    if args.json:
        emit_json(report)
        return 0
    if after is not None:
        out.print(_before_after_table(artifact.source, after))
    facts = report["target"]
    target_text = facts.get("target_text") or facts.get("target")
    out.print(f"wrote {', '.join(report['output'])}\n  target: {target_text}\n"
              f"  pipeline: {artifact.pipeline or '<empty>'}", markup=False)
    if args.time_passes:
        out.print(_time_table(timing.rows()))
    if args.stats:
        out.print(_stats_table(stats.as_dict()))
    return 0


def _target_options(args: argparse.Namespace) -> dict:
    """Target options from the flags the user gave (a target rejects the ones it does not know)."""
    options = {key: getattr(args, key) for key in ("threads", "tune", "tune_time", "tuning_db", "arch", "mcpu", "mattr",
                                                   "mtriple")
               if getattr(args, key, None) is not None}
    for item in args.target_opt or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"bad --target-opt {item!r}; expected KEY=VALUE")
        options[key.replace("-", "_")] = value
    if (options.get("tune") or options.get("tune_time")) and "tuning_db" not in options:
        options["tuning_db"] = str(Path.home() / ".cache" / "infoptc" / "tune")
    return options


def _save_external(artifact, output: Path):
    if artifact.target != "onnx":
        raise UsageError("--external-data applies to the onnx target only")
    return ir.save_model(artifact.model, output, external_data=True)


def _size_facts(model) -> dict:
    return {
        "nodes": analysis.node_count(model),
        "initializers": sum(len(g.initializer) for g in ir.iter_graphs(model.graph)),
        "bytes": analysis.model_bytes(model),
        "ops": dict(analysis.op_histogram(model)),
    }


def _before_after_table(before, after) -> Table:
    """onnxsim-style table: nodes per op type, initializers, size, before and after."""
    hb, ha = analysis.op_histogram(before), analysis.op_histogram(after)
    table = Table(title="infoptc: before / after", title_justify="left")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("optimized", justify="right")
    for op in sorted(set(hb) | set(ha)):
        a, b = hb.get(op, 0), ha.get(op, 0)
        table.add_row(op, str(a), str(b), style=None if a == b else "bold green" if b < a else "bold yellow")
    table.add_section()
    fb, fa = _size_facts(before), _size_facts(after)
    table.add_row("nodes", str(fb["nodes"]), str(fa["nodes"]))
    table.add_row("initializers", str(fb["initializers"]), str(fa["initializers"]))
    table.add_row("model size", human_bytes(fb["bytes"]), human_bytes(fa["bytes"]))
    return table


def _time_table(rows) -> Table:
    total = sum(r[3] for r in rows) or 1e-12
    table = Table(title="time per pass", title_justify="left")
    for col in ("pass", "runs", "changed", "ms", "%"):
        table.add_column(col, justify="left" if col == "pass" else "right")
    for name, runs, changed, seconds in rows:
        table.add_row(name, str(runs), str(changed), f"{seconds * 1e3:.2f}", f"{100 * seconds / total:.1f}")
    table.add_section()
    table.add_row("total", "", "", f"{total * 1e3:.2f}", "100.0")
    return table


def _stats_table(stats: dict) -> Table:
    table = Table(title="pass statistics", title_justify="left")
    table.add_column("pass")
    table.add_column("counter")
    table.add_column("value", justify="right")
    for name, counters in stats.items():
        for key, value in counters.items():
            table.add_row(name, key, str(value))
    return table
