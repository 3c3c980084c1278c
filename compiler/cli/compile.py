"""`infoptc compile MODEL` (also the bare `infoptc MODEL`): optimize, lower for a target, write
the artifact, and show what changed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from .. import analysis, config, ir
from ..plotting import figure
from ..errors import UsageError
from ..passes.quantize.metrics import DEFAULT_BUDGET, METRICS
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
    c.add_argument("--ops", default=None, choices=["standard", "ort"],
                   help="op policy of the fusions: ort (default) may emit ONNX Runtime's com.microsoft ops "
                        "(FusedConv, Gelu, SkipLayerNormalization, MultiHeadAttention...); standard emits only "
                        "ai.onnx ops at the model's opset. Recorded in the output's metadata as infoptc.ops")
    c.add_argument("--opset", default=None, metavar="N",
                   help="raise the model's ai.onnx opset to N first (ONNX's version converter; the converted "
                        "model is checked against the original on ONNX Runtime). Default: keep the model's opset. "
                        "--ops standard --opset 23 lets the fusions emit Attention and RMSNormalization")
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
    q = c.add_argument_group("quantization (see docs/quantization.md)")
    q.add_argument("--quantize", default=None, choices=["int8", "int8-dynamic", "auto", "fp16", "bf16", "int4"],
                   help="int8: calibrated static (needs --calibration); int8-dynamic: int8 weights, "
                        "activations quantized at run time; auto: int8 where --accuracy-budget allows, "
                        "fp32 elsewhere, measured (needs --calibration); fp16/bf16: low-precision float weights "
                        "and compute; int4: block-wise int4 MatMul/Gemm weights")
    q.add_argument("--calibration", default=None, metavar="CAL",
                   help=".npz with one array per input (samples stacked on a new first axis), "
                        "or a folder of one-sample .npz files")
    q.add_argument("--calibration-method", default=None, choices=["minmax", "percentile", "entropy", "mse"],
                   help="how activation ranges are chosen (default: mse)")
    q.add_argument("--calibration-samples", type=int, default=None, metavar="N", help="use the first N samples")
    q.add_argument("--calibration-cache", default=None, metavar="FILE",
                   help="keep observed ranges here; a rerun with other options does not recalibrate")
    q.add_argument("--per-tensor", action="store_true", default=None, help="one weight scale per tensor, not per channel")
    q.add_argument("--exclude", action="append", default=None, metavar="NAME_OR_OPTYPE",
                   help="leave a node (by name) or an op type in fp32 (repeatable)")
    q.add_argument("--isa", default=None, choices=["auto", "vnni", "avx2", "generic"],
                   help="CPU the int8 kernels target (default: this host's; avx2 keeps weights to 7 bits)")
    q.add_argument("--requantize", action="store_true", default=None, help="quantize a model that already is")
    q.add_argument("--no-speed-check", action="store_true", default=None,
                   help="quantize even where int8 measures slower than fp32 on this host (byte-identical reruns)")
    q.add_argument("--equalize", action="store_true", default=None, help="cross-layer equalization first")
    q.add_argument("--bias-correction", action="store_true", default=None,
                   help="move the int8 weights' mean output error into the biases (static int8)")
    q.add_argument("--smooth-quant", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant: migrate activation outliers of LayerNorm->MatMul into weights (e.g. 0.5)")
    q.add_argument("--keep-io-types", action="store_true", default=None,
                   help="fp16/bf16: keep the model's float inputs and outputs fp32 (Casts at the borders)")
    q.add_argument("--block-size", type=int, default=None, choices=[16, 32, 64, 128, 256], metavar="N",
                   help="int4: weights per scale along K (default 128)")
    q.add_argument("--int4-method", default=None, choices=["rtn", "gptq"],
                   help="int4: rtn (round to nearest, default) or gptq (error compensation; needs --calibration)")
    q.add_argument("--int4-symmetric", action="store_true", default=None,
                   help="int4: symmetric blocks (no zero points) instead of asymmetric")
    a = c.add_argument_group("automatic mixed precision (--quantize auto; see docs/quantization.md)")
    a.add_argument("--metric", default=None, choices=list(METRICS),
                   help="what the budget limits, against the fp32 model on the calibration data (default: sqnr)")
    a.add_argument("--accuracy-budget", type=float, default=None, metavar="B",
                   help="sqnr: the lowest dB allowed; cosine, top1-agreement, accuracy: the largest drop from "
                        "the fp32 model's score (defaults: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_BUDGET.items()) + ")")
    a.add_argument("--force", action="store_true", default=None,
                   help="when no int8 assignment meets the budget, write the best one found instead of exit 3")
    a.add_argument("--pareto-plot", default=None, metavar="FILE.png",
                   help="draw the assignments tried (latency, size, metric) and their Pareto front (matplotlib)")
    trt = c.add_argument_group("TensorRT target (see docs/targets/tensorrt.md)")
    trt.add_argument("--emit-onnx", action="store_true", default=None,
                     help="write the prepared ONNX and its build script and stop (exit 0 without TensorRT/GPU); "
                          "--input-shape NAME:MIN,OPT,MAX gives an optimization profile")
    trt.add_argument("--timing-cache", default=None, metavar="FILE", help="TensorRT timing cache, reused across builds")
    trt.add_argument("--workspace", type=int, default=None, metavar="MIB", help="TensorRT workspace limit in MiB")
    trt.add_argument("--builder-opt-level", type=int, default=None, metavar="0-5",
                     help="TensorRT builder optimization level (default 3)")
    mm = c.add_argument_group("memory (see docs/memory.md)")
    mm.add_argument("--memory-report", action="store_true", default=None,
                    help="onnx target: the compiled model's activation memory plan, also written into its metadata")
    mm.add_argument("--memory-limit", default=None, metavar="SIZE",
                    help="reorder nodes to fit activations in SIZE (e.g. 8MB); exit 3 with the best order's "
                         "peak when no order found fits")
    z = c.add_argument_group("compression (see docs/compression.md; --calibration above gives their data)")
    z.add_argument("--prune", default=None, metavar="channels=RATIO",
                   help="remove RATIO of the channels of every prunable dependency group, e.g. channels=0.3")
    z.add_argument("--prune-criterion", default=None, choices=["l1", "l2", "bn-scale", "taylor"],
                   help="channel importance (default l1; taylor needs --calibration)")
    z.add_argument("--round-to", type=int, default=None, metavar="N",
                   help="keep a multiple of N channels per group (default 8; 1: any count)")
    z.add_argument("--prune-scope", default=None, choices=["per-layer", "global"],
                   help="the ratio in every group (default), or one threshold over all groups")
    z.add_argument("--reconstruct", action="store_true", default=None,
                   help="refit the layers after pruned channels (or low-rank factors) by least squares on "
                        "--calibration data")
    z.add_argument("--low-rank", default=None, metavar="energy=E|ratio=R",
                   help="truncated SVD of Gemm/MatMul weights, keeping energy E of the spectrum or R of the rank")
    z.add_argument("--cluster", type=int, default=None, metavar="K",
                   help="share weights: a K-entry k-means codebook per tensor (smaller file, same speed)")
    z.add_argument("--cluster-store", default=None, choices=["gather", "expanded"],
                   help="gather: store indices + codebook, expanded by a Gather at load (default); "
                        "expanded: store the clustered weights as plain tensors")
    z.add_argument("--sparsify", default=None, metavar="2:4|unstructured=R",
                   help="zero weights by magnitude: 2 of every 4 along the input axis, or a fraction R "
                        "(smaller once compressed; ONNX Runtime on CPU runs no faster)")
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
    shape_specs = args.input_shape or []
    trt_flags = [f for f in ("emit_onnx", "timing_cache", "workspace", "builder_opt_level") if getattr(args, f, None)]
    if trt_flags and target != "tensorrt":
        raise UsageError(f"--{trt_flags[0].replace('_', '-')} applies to --target tensorrt")
    if target == "tensorrt":  # NAME:MIN,OPT,MAX is an optimization profile, not a shape to bind
        from ..backends.tensorrt import split_profiles

        shape_specs, profiles = split_profiles(shape_specs)
        if profiles:
            target_options["profiles"] = profiles
    artifact = compile_model(
        input_path, target=target, opt_level=opt_level, passes=args.passes,
        input_shapes=parse_input_shapes(shape_specs), instruments=instruments,
        freeze_initializers=bool(args.freeze_initializers),
        verify_each=bool(args.verify_each), opt_bisect_limit=args.opt_bisect_limit,
        **{**_quantize_arguments(args), **_compress_arguments(args)}, **_memory_arguments(args), **target_options,
        ops=args.ops, opset=args.opset,
    )
    if args.opt_bisect_limit is not None:
        for rec in artifact.pass_records:
            err.print(f"BISECT: {'running' if not rec.skipped else 'NOT running'} pass ({rec.index}) {rec.pass_}",
                      markup=False)
    memory_report = _memory_report(args, artifact) if args.memory_report else None
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
    if artifact.reports:
        report["reports"] = artifact.reports
    if memory_report is not None:
        report["memory"] = memory_report.as_dict(with_live=False)
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
        out.print(_stats_table(stats.as_dict(), artifact.reports))
    auto = artifact.reports.get("quantize-auto")
    if auto:
        out.print(auto_table(auto), markup=False)
        if args.pareto_plot:
            pareto_plot(auto, Path(args.pareto_plot))
            out.print(f"wrote {args.pareto_plot}", markup=False)
    if memory_report is not None:
        from .inspect import memory_table

        out.print(memory_table(memory_report, "activation memory of the compiled model"))
    for name, quant in artifact.reports.items():
        speed = quant.get("speed")
        if speed:
            int8 = ", ".join(f"int8 {k} {v:.3f} ms" for k, v in speed["candidates_ms"].items())
            verdict = ("kept fp32 (int8 is not faster here; --no-speed-check quantizes anyway)"
                       if speed["chosen"] is None else f"chose int8 {speed['chosen']}")
            out.print(f"{name} speed check on this host: fp32 {speed['fp32_ms']:.3f} ms, {int8}: {verdict}",
                      markup=False)
        if quant.get("tensors"):
            out.print(quantization_table(quant, None if args.stats else 10))
        low_table = low_precision_table(name, quant, None if args.stats else 10)
        if low_table is not None:
            out.print(low_table)
        if quant.get("not_measured"):
            out.print(f"{name}: error not measured: {quant['not_measured']}", markup=False)
    return 0


def _quantize_arguments(args: argparse.Namespace) -> dict:
    """compile()'s quantization keywords from the flags; flags without --quantize are an error."""
    low = _low_precision_arguments(args)
    if low is not None:
        return low
    given = [f for f in ("calibration", "calibration_method", "calibration_samples", "calibration_cache",
                         "per_tensor", "exclude", "isa", "requantize", "no_speed_check", "equalize", "bias_correction", "smooth_quant",
             "metric", "accuracy_budget", "force", "pareto_plot")
             if getattr(args, f, None) not in (None, [], False)]
    if not args.quantize:
        if _compress_flags(args):  # compression passes read --calibration (and its sample count) too
            given = [f for f in given if f not in ("calibration", "calibration_samples")]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --quantize int8|int8-dynamic|auto")
        return {}
    if args.quantize in ("int8", "auto") and not args.calibration:
        raise UsageError(f"--quantize {args.quantize} needs --calibration CAL (an .npz of samples or a folder of .npz); "
                         "--quantize int8-dynamic needs none")
    auto_only = [f for f in ("metric", "accuracy_budget", "force", "pareto_plot") if getattr(args, f, None) is not None]
    if auto_only and args.quantize != "auto":
        raise UsageError(f"--{auto_only[0].replace('_', '-')} applies to --quantize auto only")
    if args.calibration_samples is not None and args.calibration_samples < 1:
        raise UsageError("--calibration-samples must be at least 1")
    options: dict = {}
    if args.quantize in ("int8", "auto"):
        options.update({"calibration": args.calibration, "method": args.calibration_method or "mse",
                        "samples": args.calibration_samples or 0, "cache": args.calibration_cache or "",
                        "per-channel": not args.per_tensor})
    elif any(getattr(args, f, None) for f in ("calibration_method", "calibration_cache", "per_tensor", "bias_correction")):
        raise UsageError("--calibration-method, --calibration-cache and --per-tensor apply to --quantize int8 and "
                         "auto, --bias-correction to --quantize int8 only")
    if args.quantize == "auto":
        options.update({"metric": args.metric or "sqnr", "force": bool(args.force)})
        if args.accuracy_budget is not None:
            if args.accuracy_budget < 0:
                raise UsageError("--accuracy-budget must be >= 0")
            options["budget"] = args.accuracy_budget
        if args.pareto_plot and not Path(args.pareto_plot).resolve().parent.is_dir():
            raise UsageError(f"cannot write {args.pareto_plot}: folder {Path(args.pareto_plot).parent} does not exist")
    if args.exclude:
        options["exclude"] = ";".join(args.exclude)
    if args.isa:
        options["isa"] = args.isa
    if args.requantize:
        options["requantize"] = True
    if args.no_speed_check:
        options["speed-check"] = False
    calibration = args.calibration
    if args.smooth_quant is not None and not calibration:
        raise UsageError("--smooth-quant needs --calibration CAL (it measures activation channels)")
    return {"quantize": args.quantize, "calibration": calibration, "quantize_options": options,
            "equalize": bool(args.equalize), "correct_bias": bool(args.bias_correction),
            "smooth_quant": args.smooth_quant}


LOW_PRECISION_FLAGS = {"keep_io_types": ("fp16", "bf16"), "block_size": ("int4",), "int4_method": ("int4",),
                       "int4_symmetric": ("int4",)}


def _low_precision_arguments(args: argparse.Namespace) -> dict | None:
    """compile()'s keywords for --quantize fp16|bf16|int4 (None for the other modes, after
    refusing the flags of these modes there)."""
    for flag, modes in LOW_PRECISION_FLAGS.items():
        if getattr(args, flag, None) not in (None, False) and args.quantize not in modes:
            raise UsageError(f"--{flag.replace('_', '-')} needs --quantize {'|'.join(modes)}")
    if args.quantize not in ("fp16", "bf16", "int4"):
        return None
    other = [f for f in ("calibration_method", "calibration_cache", "per_tensor", "bias_correction", "isa",
                         "no_speed_check", "equalize", "smooth_quant", "metric", "accuracy_budget", "force", "pareto_plot")
             if getattr(args, f, None) not in (None, False)]
    if other:
        raise UsageError(f"--{other[0].replace('_', '-')} does not apply to --quantize {args.quantize} "
                         "(it is a flag of int8, int8-dynamic or auto)")
    if args.calibration_samples is not None and args.calibration_samples < 1:
        raise UsageError("--calibration-samples must be at least 1")
    options: dict = {}
    if args.quantize == "int4":
        if args.int4_method == "gptq" and not args.calibration:
            raise UsageError("--int4-method gptq needs --calibration CAL (activations to compensate the rounding "
                             "error with); --int4-method rtn needs none")
        options.update({"block-size": args.block_size or 128, "method": args.int4_method or "rtn",
                        "symmetric": bool(args.int4_symmetric)})
        if args.requantize:
            options["requantize"] = True
    elif args.keep_io_types:
        options["keep-io-types"] = True
    if args.calibration_samples:
        options["samples" if args.quantize == "int4" else "report-samples"] = args.calibration_samples
    if args.exclude:
        options["exclude"] = ";".join(args.exclude)
    return {"quantize": args.quantize, "calibration": args.calibration, "quantize_options": options}


def low_precision_table(name: str, report: dict, limit: int | None) -> Table | None:
    """convert-float's error per output, or quantize-int4's layers (worst SQNR first); None for
    the other passes' reports."""
    if name not in ("convert-float", "quantize-int4"):
        return None
    if report.get("outputs"):
        table = Table(title=f"{name} ({report.get('to', '')}): error per output against fp32", title_justify="left")
        for col in ("output", "max abs err", "max rel err", "SQNR dB"):
            table.add_column(col, justify="left" if col == "output" else "right")
        for r in report["outputs"]:
            table.add_row(r["output"], f"{r['max_abs']:.3g}", f"{r['max_rel']:.3g}",
                          "inf" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}")
        return table
    rows = report.get("layers") or []
    if not rows:
        return None
    shown = rows if limit is None else rows[:limit]
    table = Table(title=f"{name}: int4 weights ({len(shown)} of {len(rows)} layers; --stats shows all)",
                  title_justify="left")
    for col in ("node", "K x N", "format", "weight SQNR dB", "output SQNR dB"):
        table.add_column(col, justify="left" if col in ("node", "format") else "right")
    for r in shown:
        out_db = r.get("output_sqnr_db")
        table.add_row(r["node"], f"{r['k']} x {r['n']}", r["format"], f"{r['weight_sqnr_db']:.1f}",
                      "" if out_db is None else f"{out_db:.1f}")
    return table


def auto_table(report: dict) -> Table:
    """quantize-auto's assignments tried, in order, with the chosen one marked."""
    chosen = report["chosen"]
    verdict = ("kept fp32: every assignment within the budget is slower here" if chosen is None else
               f"chose {report['layer_count'] - len(chosen['fp32_layers'])} of {report['layer_count']} layers int8")
    timed = "untimed" if report["fp32_ms"] is None else f"fp32 {report['fp32_ms']:.3f} ms"
    table = Table(title=f"quantize-auto, metric {report['metric']}, budget {report['budget']:g} ({timed}): {verdict}",
                  title_justify="left")
    for col in ("#", "step", "fp32 layers", report["metric"], "size MB", "ms", "in budget", "Pareto"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for i, t in enumerate(report["trials"]):
        mark = " *" if chosen is not None and t["fp32_layers"] == chosen["fp32_layers"] and t["step"] == chosen["step"] else ""
        table.add_row(f"{i}{mark}", t["step"], str(len(t["fp32_layers"])),
                      "inf" if t["score"] is None else f"{t['score']:.4g}", f"{t['size_bytes'] / 1e6:.2f}",
                      "-" if t["latency_ms"] is None else f"{t['latency_ms']:.3f}",
                      "yes" if t["meets_budget"] else "no", "yes" if t["pareto"] else "")
    return table


def pareto_plot(report: dict, path: Path) -> None:
    """Latency against the metric for the timed assignments (size as the marker's area), and size
    against the metric for every assignment tried."""
    scored = [t for t in report["trials"] if t["score"] is not None]  # an infinite SQNR has no place on an axis
    timed = [t for t in scored if t["latency_ms"] is not None]
    others = [t for t in scored if t["latency_ms"] is None]
    with figure(path, "--pareto-plot", ncols=2, figsize=(11, 4.5)) as (fig, (ax1, ax2)):
        biggest = max((t["size_bytes"] for t in timed), default=1)
        ax1.scatter([t["latency_ms"] for t in timed], [t["score"] for t in timed],
                    s=[40 + 200 * t["size_bytes"] / biggest for t in timed], label="timed")
        if report["fp32_ms"] is not None:
            ax1.axvline(report["fp32_ms"], color="gray", linestyle="--", label="fp32 latency")
        ax1.set(xlabel="latency (ms, this host)", ylabel=report["metric"], title="timed assignments (area: size)")
        ax1.legend()
        for group, label in ((others, "not timed"), (timed, "timed")):
            ax2.scatter([t["size_bytes"] / 1e6 for t in group], [t["score"] for t in group], label=label)
        ax2.set(xlabel="size (MB)", ylabel=report["metric"], title="every assignment tried")
        ax2.legend()
_COMPRESS_FLAGS = ("prune", "low_rank", "cluster", "sparsify")


def _compress_flags(args: argparse.Namespace) -> list[str]:
    return [f for f in _COMPRESS_FLAGS if getattr(args, f, None) is not None]


def _key_value(flag: str, text: str, keys: tuple[str, ...]) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or key not in keys or not value:
        raise UsageError(f"bad --{flag} {text!r}; expected " + " or ".join(f"{k}=VALUE" for k in keys))
    return key, value


def _compress_arguments(args: argparse.Namespace) -> dict:
    """compile()'s ``compress`` pass list (and ``calibration``) from the compression flags."""
    flags = _compress_flags(args)
    prune_only = [f for f in ("prune_criterion", "round_to", "prune_scope") if getattr(args, f, None) is not None]
    if prune_only and args.prune is None:
        raise UsageError(f"--{prune_only[0].replace('_', '-')} needs --prune channels=RATIO")
    if args.reconstruct and args.prune is None and args.low_rank is None:
        raise UsageError("--reconstruct needs --prune channels=RATIO or --low-rank")
    if args.cluster_store is not None and args.cluster is None:
        raise UsageError("--cluster-store needs --cluster K")
    if not flags:
        return {}
    samples = {"samples": args.calibration_samples} if args.calibration_samples else {}
    if args.calibration_samples is not None and args.calibration_samples < 1:
        raise UsageError("--calibration-samples must be at least 1")
    passes = []
    if args.prune is not None:
        _, ratio = _key_value("prune", args.prune, ("channels",))
        options = {"ratio": ratio, "criterion": args.prune_criterion, "round-to": args.round_to,
                   "scope": args.prune_scope, "reconstruct": "true" if args.reconstruct else None}
        if args.prune_criterion == "taylor" and not args.calibration:
            raise UsageError("--prune-criterion taylor needs --calibration CAL (it measures activations)")
        if args.reconstruct and not args.calibration:
            raise UsageError("--reconstruct needs --calibration CAL (it refits layers on activations)")
        passes.append(_pass_text("prune-channels", {**options, **samples}))
    if args.low_rank is not None:
        key, value = _key_value("low-rank", args.low_rank, ("energy", "ratio"))
        aware = {"activation-aware": "true", **samples} if args.calibration else {}
        if args.reconstruct:
            aware["reconstruct"] = "true"
        passes.append(_pass_text("low-rank", {key: value, **aware}))
    if args.cluster is not None:
        passes.append(_pass_text("cluster-weights", {"clusters": args.cluster, "store": args.cluster_store}))
    if args.sparsify is not None:
        if args.sparsify == "2:4":
            passes.append(_pass_text("sparsify", {"pattern": "2:4"}))
        else:
            _, ratio = _key_value("sparsify", args.sparsify, ("unstructured",))
            passes.append(_pass_text("sparsify", {"pattern": "unstructured", "ratio": ratio}))
    out: dict = {"compress": passes}
    if args.calibration:
        out["calibration"] = args.calibration
    return out


def _pass_text(name: str, options: dict) -> str:
    given = {k: v for k, v in options.items() if v is not None}
    return name + ("{" + ",".join(f"{k}={v}" for k, v in given.items()) + "}" if given else "")


def quantization_table(report: dict, limit: int | None) -> Table:
    """The quantizer's per-tensor report, worst SQNR first (``limit`` rows, all when None)."""
    rows = report["tensors"]
    shown = rows if limit is None else rows[:limit]
    recipe = report["recipe"]
    title = (f"int8 tensors, worst SQNR first ({len(shown)} of {len(rows)}; --stats shows all): "
             f"activations {recipe['activation']}, weights {recipe['weight']} "
             f"[-{recipe['weight_qmax']}, {recipe['weight_qmax']}] for {recipe['isa']}")
    table = Table(title=title, title_justify="left")
    for col in ("tensor", "op", "scale", "zero point", "SQNR dB"):
        table.add_column(col, justify="left" if col in ("tensor", "op") else "right")
    for r in shown:
        table.add_row(r["tensor"], r["op"], f"{r['scale']:.4g}", str(r["zero_point"]), f"{r['sqnr_db']:.1f}")
    return table


def _memory_arguments(args: argparse.Namespace) -> dict:
    """compile()'s memory_limit from --memory-limit (a size such as 8MB), and --memory-report's check."""
    from ..pass_registry import parse_size

    if args.memory_report and (args.target or "onnx") != "onnx":
        raise UsageError("--memory-report applies to the onnx target (its plan goes into the model's metadata)")
    if args.memory_limit is None:
        return {}
    try:
        limit = parse_size(args.memory_limit)
    except ValueError as e:
        raise UsageError(f"bad --memory-limit {args.memory_limit!r}: {e}") from None
    if limit <= 0:
        raise UsageError("--memory-limit must be positive")
    return {"memory_limit": limit}


def _memory_report(args: argparse.Namespace, artifact):
    """The plan of the compiled model in its node order, also written into its metadata_props."""
    from .. import memory
    from ..driver import parse_input_shapes
    from .inspect import memory_report

    rep = memory_report(artifact.model, parse_input_shapes(args.input_shape or []))
    props = artifact.model.metadata_props
    entry = next((m for m in props if m.key == memory.METADATA_KEY), None) or props.add()
    entry.key, entry.value = memory.METADATA_KEY, memory.metadata_value(rep)
    return rep


def _target_options(args: argparse.Namespace) -> dict:
    """Target options from the flags the user gave (a target rejects the ones it does not know)."""
    options = {key: getattr(args, key) for key in ("threads", "tune", "tune_time", "tuning_db", "arch", "mcpu", "mattr",
                                                   "mtriple")
               if getattr(args, key, None) is not None}
    for flag, key in (("emit_onnx", "emit_onnx"), ("timing_cache", "timing_cache"), ("workspace", "workspace_mib"),
                      ("builder_opt_level", "optimization_level")):  # the TensorRT group
        if getattr(args, flag, None) is not None:
            options[key] = getattr(args, flag)
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


def _stats_table(stats: dict, reports: dict | None = None) -> Table:
    """Counters per pass; a ``rejected`` row also says why each rule was first refused."""
    table = Table(title="pass statistics", title_justify="left")
    table.add_column("pass")
    table.add_column("counter")
    table.add_column("value", justify="right")
    table.add_column("first reason")
    for name, counters in stats.items():
        for key, value in counters.items():
            reasons = ((reports or {}).get(name) or {}).get("rejected", {}) if key == "rejected" else {}
            table.add_row(name, key, str(value), "; ".join(f"{rule} {why}" for rule, why in reasons.items()))
    return table
