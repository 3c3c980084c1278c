"""`infoptc profile`: where the time of one inference goes, per op type and per node, and a
latency breakdown of a full run. The profiling is library code (infoptc.profile)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..bench import bind_dims, inputs_for, parse_dims
from ..errors import UsageError
from ..files import load_npz
from ..ir import write_atomic
from ..profile import profile_artifact
from ..targets import load
from .output import emit_json, note, out, status


def add_parser(subparsers, common) -> dict:
    p = subparsers.add_parser(
        "profile", help="time per op type and node (ONNX Runtime profiler), and a latency breakdown",
        description="Profile one model or artifact: time per op type and per node, averaged over "
                    "--iterations runs after --warmup, and the latency of each stage of a full run.")
    p.add_argument("subject", metavar="ARTIFACT_OR_MODEL")
    p.add_argument("--trace", metavar="OUT.json", help="write the Chrome trace (chrome://tracing, Perfetto)")
    p.add_argument("--iterations", type=int, default=20, metavar="N", help="profiled runs (default 20)")
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="runs left out of the tables (default 3)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="nodes in the top-nodes table (default 10)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="intra-op threads (default: the runtime's)")
    p.add_argument("--batch", type=int, default=None, metavar="N", help="bind the leading symbolic dim (default 1)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N", help="bind a symbolic dim, e.g. seq=128")
    p.add_argument("--inputs", metavar="DATA.npz", help="inputs by name (default: generated from --seed)")
    p.add_argument("--seed", type=int, default=0)
    common(p)
    return {"profile": cmd_profile}


def cmd_profile(args: argparse.Namespace) -> int:
    if args.iterations < 1 or args.warmup < 0 or args.top < 1:
        raise UsageError("--iterations and --top must be >= 1, --warmup >= 0")
    if args.trace and not Path(args.trace).resolve().parent.is_dir():
        raise UsageError(f"cannot write {args.trace}: folder {Path(args.trace).parent} does not exist")
    dims = parse_dims(args.dim)
    t0 = time.perf_counter()
    artifact = load(args.subject)
    t1 = time.perf_counter()
    if args.inputs:
        feeds = load_npz(args.inputs)
    else:
        bound, _ = bind_dims(list(artifact.inputs), args.batch, dims)
        feeds = inputs_for(artifact, bound, args.seed)
    t2 = time.perf_counter()
    with status(args, "profiling"):
        run = profile_artifact(artifact, feeds, iterations=args.iterations, warmup=args.warmup, threads=args.threads)
    breakdown = {"model_load": t1 - t0, "input_preparation": t2 - t1 + run.breakdown.get("input_binding", 0.0),
                 **{k: v for k, v in run.breakdown.items() if k != "input_binding"}}
    breakdown["cold_run_total"] = sum(breakdown.get(k, 0.0) for k in (
        "model_load", "session_creation", "input_preparation", "first_inference", "first_output_fetch"))
    if args.trace:
        write_atomic(Path(args.trace), run.raw_trace or json.dumps(run.events).encode())
        note(args, f"wrote {args.trace}")
    data = {"subject": args.subject, "target": artifact.target, "iterations": args.iterations, "warmup": args.warmup,
            "input_shapes": {k: list(np.shape(v)) for k, v in feeds.items()},
            **run.profile.as_dict(top=args.top), "breakdown_s": breakdown, "trace": args.trace}
    if args.json:
        emit_json(data)
        return 0
    for t in tables(data):
        out.print(t)
    return 0


STAGES = [
    ("model_load", "model load", "read, parse and validate the file (infoptc.load)"),
    ("session_creation", "session creation", "runtime session, incl. its graph optimizations"),
    ("input_preparation", "input preparation", "generate or read inputs, bind them"),
    ("first_inference", "first inference", "includes first-run allocations"),
    ("first_output_fetch", "first output fetch", "copy outputs out of the runtime"),
    ("cold_run_total", "cold run total", "the stages above: one full run from a file"),
    ("inference_p50", "inference (p50)", "a warm run, median"),
    ("output_fetch_p50", "output fetch (p50)", "a warm run, median"),
]


def tables(data: dict) -> list:
    from rich.table import Table

    shapes = "; ".join(f"{k} {'x'.join(map(str, v)) or 'scalar'}" for k, v in data["input_shapes"].items())
    total = max(data["run_us"], data["kernel_us"]) or 1.0
    ops = Table(title=f"{data['subject']}: time per op type, mean of {data['runs']} runs ({shapes})",
                title_justify="left")
    for col in ("op type", "nodes", "calls/run", "ms/run", "share"):
        ops.add_column(col, justify="left" if col == "op type" else "right")
    for r in data["by_op"]:
        ops.add_row(r["op_type"], str(r["nodes"]), f"{r['calls']:g}", f"{r['us'] / 1e3:.3f}",
                    f"{100 * r['share']:.1f}%")
    if data["overhead_us"] > 0:
        ops.add_row("(runtime overhead)", "", "", f"{data['overhead_us'] / 1e3:.3f}",
                    f"{100 * data['overhead_us'] / total:.1f}%", style="dim")
    ops.add_section()
    ops.add_row("total", str(sum(r["nodes"] for r in data["by_op"])), "", f"{total / 1e3:.3f}", "100.0%")
    nodes = Table(title=f"top {len(data['top_nodes'])} nodes", title_justify="left")
    for col in ("node", "op type", "ms/run", "share"):
        nodes.add_column(col, justify="right" if col in ("ms/run", "share") else "left")
    for r in data["top_nodes"]:
        nodes.add_row(r["node"], r["op_type"], f"{r['us'] / 1e3:.3f}", f"{100 * r['share']:.1f}%")
    stages = Table(title="latency breakdown of a full run", title_justify="left")
    for col in ("stage", "ms", "what"):
        stages.add_column(col, justify="right" if col == "ms" else "left")
    for key, name, what in STAGES:
        if key in data["breakdown_s"]:
            if key == "cold_run_total" or key == "inference_p50":
                stages.add_section()
            stages.add_row(name, f"{data['breakdown_s'][key] * 1e3:.3f}", what)
    return [ops, nodes, stages]
