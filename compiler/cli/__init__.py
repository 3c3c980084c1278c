"""The `infoptc` command. It owns the terminal: results on stdout, logs on stderr, exit codes.

    infoptc MODEL [flags]            same as `infoptc compile MODEL`
    infoptc passes [--pipeline -O2]  registered passes, or the pipeline an -O level runs
    infoptc inspect MODEL            opset, inputs/outputs, op histogram, params, size, FLOPs
    infoptc run ARTIFACT             run a model or artifact on inputs (.npz) or generated ones

Exit codes: 0 ok, 2 usage, 3 verification failed, 4 compile/pass failure,
5 missing optional dependency or hardware, 6 bad input model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import __version__, analysis, config, ir, plugins
from . import commands
from ..errors import InfoptcError, UsageError

EXIT_OK, EXIT_USAGE, EXIT_INTERNAL = 0, 2, 4

out = Console(highlight=False, soft_wrap=True)  # follows sys.stdout, so tests can capture it
err = Console(stderr=True, highlight=False, soft_wrap=True)
log = logging.getLogger("infoptc")

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def wrap(fn):
        COMMANDS[name] = fn
        return fn

    return wrap


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so errors get our one-line format."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    p.add_argument("--load-plugin", action="append", default=[], metavar="FILE.py",
                   help="import a Python file that registers passes or targets (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="infoptc", description="ONNX graph compiler: optimize a model and build it for a target.",
                     epilog="The bare form `infoptc MODEL ...` means `infoptc compile MODEL ...`.")
    parser.add_argument("--version", action="version", version=f"infoptc {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    c = sub.add_parser("compile", help="optimize a model and lower it for a target (the default command)")
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
    _common(c)

    p = sub.add_parser("passes", help="list registered passes, or print the pipeline of an -O level")
    p.add_argument("--pipeline", action="store_true", help="print the pipeline string of the -O level instead")
    p.add_argument("-O", dest="opt_level", default="2", choices=["0", "1", "2", "3", "s"], metavar="LEVEL")
    _common(p)

    t = sub.add_parser("targets", help="list the available targets")
    _common(t)

    i = sub.add_parser("inspect", help="opset, inputs/outputs, op histogram, parameters, size, FLOPs")
    i.add_argument("model")
    _common(i)

    r = sub.add_parser("run", help="run a model or artifact and print (or save) its outputs")
    r.add_argument("artifact")
    r.add_argument("--inputs", metavar="DATA.npz", help="inputs by name (default: generated from --seed)")
    r.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                   help="value of a symbolic dim for generated inputs, e.g. seq=128 (default 2; repeatable)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--save-outputs", metavar="OUT.npz", help="write the outputs to an .npz file")
    _common(r)
    COMMANDS.update(commands.add_all(sub, _common))
    return parser


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """The bare form: a first argument that is not a command or a flag means `compile`."""
    argv = list(argv)
    if not COMMANDS.keys() - {"compile", "passes", "targets", "inspect", "run"}:
        build_parser()  # registers the extra commands' names
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        argv.insert(0, "compile")
    return argv


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(normalize_argv(argv))
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        _setup_logging(args)
        args.config = config.load()
        for path in [*config.plugin_files(args.config), *args.load_plugin]:
            plugins.load_plugin_file(path)
        return COMMANDS[args.command](args)
    except InfoptcError as e:
        err.print(f"infoptc: error: {e}", markup=False)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("infoptc: interrupted", markup=False)
        return 130
    except Exception as e:  # a bug in infoptc: one line unless asked for more
        if os.environ.get("INFOPTC_DEBUG"):
            raise
        err.print(f"infoptc: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                  "(set INFOPTC_DEBUG=1 for a traceback)", markup=False)
        return EXIT_INTERNAL


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"infoptc: {record.levelname.lower()}: {record.getMessage()}", markup=False)


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if args.quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    log.handlers[:] = [_StderrHandler()]
    log.setLevel(level)
    log.propagate = False


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- compile


@command("compile")
def cmd_compile(args: argparse.Namespace) -> int:
    from ..driver import compile as compile_model
    from ..driver import parse_input_shapes
    from ..instruments import PrintAfter, Stats, TimePasses
    from ..targets import get_target

    config.apply(args, args.config)
    if args.bisect:
        from ..bisect import run_bisect_cli

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
        _emit_json(report)
        return EXIT_OK
    if after is not None:
        out.print(_before_after_table(artifact.source, after))
    facts = report["target"]
    target_text = facts.get("tvm_target") or facts.get("target")
    out.print(f"wrote {', '.join(report['output'])}\n  target: {target_text}\n"
              f"  pipeline: {artifact.pipeline or '<empty>'}", markup=False)
    if args.time_passes:
        out.print(_time_table(timing.rows()))
    if args.stats:
        out.print(_stats_table(stats.as_dict()))
    return EXIT_OK


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


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


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
    table.add_row("model size", _human_bytes(fb["bytes"]), _human_bytes(fa["bytes"]))
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


# ----------------------------------------------------------------------------- passes / targets


@command("passes")
def cmd_passes(args: argparse.Namespace) -> int:
    from ..pass_manager import PASS_REGISTRY
    from ..pipelines import parse_pipeline, pipeline_for_level

    plugins.load_builtin_passes()
    if args.pipeline:
        text = pipeline_for_level(args.opt_level)
        parse_pipeline(text)  # proves every pass of the level exists
        if args.json:
            _emit_json({"level": f"O{args.opt_level}", "pipeline": text})
        else:
            sys.stdout.write(text + "\n")
        return EXIT_OK
    rows = []
    for name in sorted(PASS_REGISTRY):
        cls = PASS_REGISTRY[name]
        rows.append({"name": name, "summary": cls.summary, "contract": cls.contract.value,
                     "options": {k: {"default": o.default, "help": o.help} for k, o in cls.options.items()},
                     "module": cls.__module__})
    if args.json:
        _emit_json(rows)
        return EXIT_OK
    table = Table(title="registered passes", title_justify="left")
    for col in ("pass", "contract", "summary", "options (default)"):
        table.add_column(col)
    for r in rows:
        opts = "\n".join(f"{k}={_plain(v['default'])}" for k, v in r["options"].items())
        table.add_row(r["name"], r["contract"], r["summary"], opts)
    out.print(table)
    return EXIT_OK


def _plain(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


@command("targets")
def cmd_targets(args: argparse.Namespace) -> int:
    from ..targets import TARGET_REGISTRY, _load_targets

    _load_targets()
    rows = [{"name": n, "summary": c.summary, "suffix": c.suffix} for n, c in sorted(TARGET_REGISTRY.items())]
    if args.json:
        _emit_json(rows)
        return EXIT_OK
    table = Table(title="targets", title_justify="left")
    for col in ("target", "artifact", "summary"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["suffix"], r["summary"])
    out.print(table)
    return EXIT_OK


# ----------------------------------------------------------------------------- inspect / run


@command("inspect")
def cmd_inspect(args: argparse.Namespace) -> int:
    model = ir.load_model(args.model)
    summary = analysis.summarize(model)
    if args.json:
        _emit_json(summary.as_dict())
        return EXIT_OK
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
    head.add_row("size", _human_bytes(summary.bytes))
    head.add_row("FLOPs (symbolic dims = 1)", f"{summary.flops:,}")
    if summary.functions:
        head.add_row("local functions", str(summary.functions))
    out.print(head)
    hist = Table(title="ops", title_justify="left")
    hist.add_column("op")
    hist.add_column("count", justify="right")
    for op, n in summary.histogram.items():
        hist.add_row(op, str(n))
    out.print(hist)
    return EXIT_OK


@command("run")
def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..targets import load
    from ..verify import random_inputs

    artifact = load(args.artifact)
    if args.inputs:
        feeds = load_npz(args.inputs)
    else:
        from ..bench import parse_dims

        feeds = random_inputs(getattr(artifact, "model", None) or _model_from_specs(artifact.inputs), seed=args.seed,
                              dims=parse_dims(args.dim))
    outputs = artifact.run(feeds)
    if args.save_outputs:
        _save_npz(args.save_outputs, outputs)
    rows = [{"name": k, "dtype": v.dtype.name, "shape": list(v.shape),
             "mean": float(np.mean(v)) if v.size and v.dtype.kind in "fiub" else None} for k, v in outputs.items()]
    if args.json:
        _emit_json(rows)
        return EXIT_OK
    table = Table(title="outputs", title_justify="left")
    for col in ("output", "dtype", "shape", "mean"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["dtype"], "x".join(map(str, r["shape"])) or "scalar",
                      "-" if r["mean"] is None else f"{r['mean']:.6g}")
    out.print(table)
    return EXIT_OK


def _model_from_specs(specs) -> "onnx.ModelProto":
    """A stand-in model declaring only the artifact's inputs, for input generation."""
    import numpy as np
    import onnx

    inputs = [onnx.helper.make_tensor_value_info(s.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(s.dtype)),
                                                 list(s.shape) if s.shape is not None else None) for s in specs]
    return onnx.helper.make_model(onnx.helper.make_graph([], "inputs", inputs, []))


def load_npz(path: str) -> dict:
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such inputs file")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as e:
        raise UsageError(f"{p}: not a readable .npz file ({str(e).splitlines()[0]})") from None


def _save_npz(path: str, arrays: dict) -> None:
    import io

    import numpy as np

    target = Path(path)
    if not target.parent.is_dir():
        raise UsageError(f"cannot write {target}: folder {target.parent} does not exist")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    ir.write_atomic(target, buf.getvalue())


if __name__ == "__main__":
    sys.exit(main())
