"""`infoptc bench`: latency statistics of models and artifacts, several of them interleaved.

    infoptc bench model.onnx                       the model as-is, with ONNX Runtime
    infoptc bench model.onnx -O 0 -O 2             compiled twice, run A B A B ...
    infoptc bench a.onnx b.so --json out.json --plot latency.png

The measuring is library code (infoptc.bench); this module owns the table, the progress bar
and the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bench import (MIXED_RUNTIMES_SETTLE, batch_sweep, benchmark, cpu_info, open_subjects, parse_batches, parse_dims,
                     plot_latencies, plot_sweep, report)
from ..errors import UsageError
from ..files import load_npz, write_json
from .output import emit_json, err, note, out, progress


HELP = """\
figures (latencies are wall time of one artifact.run call, first run and warm-up excluded):
  min, max     fastest and slowest run
  mean         arithmetic mean of the runs
  p50 .. p99   percentiles (linear interpolation): p90 = 90% of runs took at most this long
  CV           coefficient of variation, std / mean (sample std); above ~5% the machine was noisy
  throughput   batch / mean latency, in inferences (batch items) per second, one stream
  time vs first
               p50 of this column / p50 of the first column: lower is faster (0.5x = twice as fast)
  FLOPs        estimated per inference (analysis.estimate_flops: a multiply-add counts 2, other
               ops 1 per output element), symbolic dims bound to the batch and --dim values;
               "unknown" (and why, below the table) where shape inference leaves a shape unknown;
               a TVM .so counts from the model it was built from, kept in its manifest
  GFLOP/s      FLOPs / p50
  % of peak    GFLOP/s / the machine's fp32 peak, an ESTIMATE: physical cores used x clock
               (cpufreq max MHz, else /proc/cpuinfo cpu MHz) x FLOPs/cycle/core, where
               FLOPs/cycle/core = 2 FP units x vector width/32 x 2 with FMA (AVX-512: 64, AVX2: 32)
  peak RSS     the process's peak resident memory (getrusage), all subjects together

Several models/artifacts, targets (--target repeated) or levels (-O repeated) run interleaved:
each round runs every subject once (A B A B ...), so drift hits all alike. A plain .onnx model
with neither --target nor -O runs as-is with ONNX Runtime.
"""


def add_parser(subparsers, common) -> dict:
    p = subparsers.add_parser("bench", help="latency statistics of models/artifacts, interleaved",
                              description="Measure inference latency and throughput.", epilog=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve")
    p.add_argument("subjects", nargs="+", metavar="ARTIFACT_OR_MODEL")
    p.add_argument("--target", action="append", default=[],
                   help="compile each model for this target first (repeatable)")
    p.add_argument("-O", dest="opt_level", action="append", default=[], choices=["0", "1", "2", "3", "s"],
                   metavar="LEVEL", help="compile each model at this level first (repeatable: -O 0 -O 2)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="timed runs per subject (default 100; with turns, rounded up to whole --block)")
    n.add_argument("--duration", type=float, default=None, metavar="S", help="time rounds for S seconds instead")
    p.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed rounds first (default 10)")
    p.add_argument("--settle", type=float, default=None, metavar="S",
                   help="take turns: S seconds of pause and 5 untimed runs before each subject's --block timed "
                        f"runs, so one runtime's spinning threads do not slow the next (default: "
                        f"{MIXED_RUNTIMES_SETTLE:g} when the subjects run on different runtimes, e.g. ORT and a "
                        "TVM .so; else 0, run by run)")
    p.add_argument("--block", type=int, default=30, metavar="N", help="timed runs per turn with --settle (default 30)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="intra-op threads (default: the runtime's)")
    p.add_argument("--batch", default=None, metavar="N[,N...]",
                   help="bind the leading symbolic dim (default 1); a list (1,2,4,8,16) sweeps one model: p50, p99, "
                        "throughput and per-sample speedup vs the first size, sizes measured side by side")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N", help="bind a symbolic dim, e.g. seq=128")
    p.add_argument("--inputs", metavar="DATA.npz", help="inputs by name (default: generated from --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="LATENCY.png", help="draw the latency distributions (needs matplotlib)")
    common(p)
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="OUT.json",
                   help="write every figure and sample as JSON to OUT.json (no file: to stdout, instead of the table)")
    return {"bench": cmd_bench}


def cmd_bench(args: argparse.Namespace) -> int:
    if args.batch is not None:
        batches = parse_batches(args.batch)
        if len(batches) > 1:
            return cmd_sweep(args, batches)
        args.batch = batches[0]
    if args.json not in (None, "-") and not args.json.endswith(".json"):
        raise UsageError(f"--json takes a .json file name, got {args.json!r}")
    for path, what in ((args.json, "--json"), (args.plot, "--plot")):
        if path not in (None, "-") and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"cannot write {path}: folder {Path(path).parent} does not exist")
    if args.warmup < 0 or any(v is not None and v < 1 for v in (args.threads, args.batch)):
        raise UsageError("--warmup must be >= 0, --threads and --batch >= 1")
    iterations = args.iterations if args.iterations is not None or args.duration is not None else 100
    dims = parse_dims(args.dim)
    inputs = load_npz(args.inputs) if args.inputs else None
    subjects = open_subjects(args.subjects, args.target, args.opt_level, args.threads)
    settle = args.settle
    if settle is None:  # different runtimes spin after runs and steal each other's cores
        settle = MIXED_RUNTIMES_SETTLE if len({type(s.artifact) for s in subjects}) > 1 else 0.0
        if settle:
            note(args, f"subjects run on different runtimes: taking turns of {args.block} runs after a "
                       f"{settle:g} s pause (--settle 0 to interleave run by run)")
    block = args.block if settle else 1
    rounds = -(-iterations // block) if iterations is not None else None  # --iterations: timed runs per subject

    bar = progress(err, disable=args.quiet)
    with bar:
        total = args.duration if args.duration is not None else rounds
        task = bar.add_task("bench", total=total)
        on_round = (lambda r, t: bar.update(task, completed=t if args.duration is not None else r))
        results, batch = benchmark(subjects, iterations=rounds if args.duration is None else None,
                                   duration=args.duration, warmup=args.warmup, batch=args.batch, dims=dims,
                                   inputs=inputs, seed=args.seed, on_round=on_round, settle=settle,
                                   block=block)
    settings = {"iterations": iterations if args.duration is None else None, "duration_s": args.duration,
                "warmup": args.warmup, "batch": batch, "dims": dims, "seed": args.seed,
                "settle_s": settle, "block": block,
                "inputs": args.inputs or "generated"}
    data = report(results, cpu_info(), threads=args.threads, settings=settings)
    return _finish(args, data, lambda: plot_latencies(results, args.plot), table)


def _finish(args: argparse.Namespace, data: dict, plot, make_table) -> int:
    """The plot and JSON file when asked, then the JSON on stdout (--json alone) or the table."""
    if args.plot:
        plot()
        note(args, f"wrote {args.plot}")
    if args.json == "-":
        emit_json(data)
        return 0
    if args.json:
        write_json(args.json, data)
        note(args, f"wrote {args.json}")
    out.print(make_table(data))
    return 0


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 100 else f"{x:.1f}"


def _human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.3g} {prefix}{unit}".strip()
        n /= 1000
    return str(n)


def _how_run(settings: dict, subjects: int) -> str:
    """How the subjects shared the machine, as the stderr note says it."""
    if subjects < 2:
        return ""
    if settings.get("settle_s"):
        return f", in turns of {settings['block']} runs after a {settings['settle_s']:g} s pause"
    return ", interleaved run by run"


def table(data: dict):
    """Statistics down, subjects across (the table stays narrow however many figures there are)."""
    from rich.table import Table

    s, m, rows = data["settings"], data["machine"], data["results"]
    shapes = "; ".join(f"{k} {'x'.join(map(str, v)) or 'scalar'}" for k, v in rows[0]["input_shapes"].items())
    title = (f"latency in ms, {rows[0]['runs']} runs after {s['warmup']} warm-up rounds{_how_run(s, len(rows))}; "
             f"batch {s['batch']}, threads {s['threads_effective']}")
    peak = m["peak_gflops_used"]
    caption = (f"inputs: {shapes}\n"
               f"peak (estimate): {peak:.0f} GFLOP/s = {m['cores_used_for_peak']} cores x {m['mhz']:.0f} MHz x "
               f"{m['fp32_flops_per_cycle_per_core']} FLOPs/cycle ({m['isa']}); {m['model']}\n" if peak else
               f"inputs: {shapes}\npeak: unknown for this CPU ({m['isa']}, clock {m['mhz_source']})\n")
    if any((r["percent_of_peak_estimate"] or 0) > 100 for r in rows):
        caption += (f"above 100% of peak: the clock read ({m['mhz_source']}) is below the real (boost) clock, "
                    "as often in VMs\n")
    for r in rows:
        if r["flops_estimate"] is None and r.get("flops_unknown"):
            caption += f"FLOPs of {r['label']} unknown: {r['flops_unknown']}\n"
    caption += f"peak RSS: {_human(data['peak_rss_bytes'], 'B')}"
    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    t.add_column("")
    for r in rows:
        t.add_column(r["label"], justify="right")

    def row(name, fn):
        t.add_row(name, *[fn(r) for r in rows])

    for key in ("min", "mean", "p50", "p90", "p95", "p99", "max"):
        row(key, lambda r, k=key: _ms(r["latency_ms"][k]))
    row("CV", lambda r: f"{100 * r['cv']:.1f}%")
    t.add_section()
    row("throughput (inf/s)", lambda r: f"{r['throughput_per_s']:.1f}")
    if len(rows) > 1:
        row("time vs first (p50)", lambda r: f"{r['ratio_to_first']:.3f}x" if r["ratio_to_first"] is not None else "-")
    row("first run (ms)", lambda r: _ms(r["first_run_ms"]))
    t.add_section()
    row("FLOPs (est.)", lambda r: "unknown" if r["flops_estimate"] is None and r.get("flops_unknown")
        else _human(r["flops_estimate"]))
    row("GFLOP/s", lambda r: f"{r['gflops_per_s']:.2f}" if r["gflops_per_s"] is not None else "-")
    row("% of peak (est.)", lambda r: f"{r['percent_of_peak_estimate']:.2f}%"
        if r["percent_of_peak_estimate"] is not None else "-")
    return t


def cmd_sweep(args: argparse.Namespace, batches: list[int]) -> int:
    """``--batch 1,2,4,...``: one model at each batch size, measured side by side."""
    if len(args.subjects) != 1 or len(args.target) > 1 or len(args.opt_level) > 1:
        raise UsageError("--batch with several sizes sweeps one model (one target, one -O level)")
    if args.inputs:
        raise UsageError("--batch with several sizes generates its inputs; --inputs fixes one batch")
    (subject,) = open_subjects(args.subjects, args.target, args.opt_level, args.threads)
    iterations = args.iterations or 30
    bar = progress(err, disable=args.quiet)
    with bar:
        task = bar.add_task("sweep", total=iterations)
        rows = batch_sweep(subject.artifact, batches, iterations=iterations, warmup=min(args.warmup, 3),
                           dims=parse_dims(args.dim), seed=args.seed, on_round=lambda r, t: bar.update(task, completed=r))
    data = {"subject": subject.label, "threads": args.threads, "iterations": iterations,
            "rows": [r.as_dict() for r in rows]}
    return _finish(args, data, lambda: plot_sweep(rows, args.plot, f"{subject.label}: batch sweep"), sweep_table)


def sweep_table(data: dict):
    from rich.table import Table

    t = Table(title=f"{data['subject']}: batch sweep, {data['iterations']} runs per size, sizes interleaved",
              title_justify="left")
    for col in ("batch", "p50 ms", "p99 ms", "throughput /s", "speedup per sample"):
        t.add_column(col, justify="right")
    for r in data["rows"]:
        t.add_row(str(r["batch"]), _ms(r["p50_ms"]), _ms(r["p99_ms"]), f"{r['throughput_per_s']:.1f}",
                  f"{r['speedup_per_sample']:.2f}x")
    return t
