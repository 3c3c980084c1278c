"""`infoptc profile`: where the time of one inference goes, per op type and per node.

ONNX models and onnx-target artifacts run under ONNX Runtime's profiler
(``SessionOptions.enable_profiling``), whose output is already a Chrome trace: a JSON list of
events, a ``model_run`` ("Session" category) per run and a ``<node>_kernel_time`` ("Node"
category, ``args.op_name``) per kernel. Warm-up runs are left out of the tables, not the trace.

Another target's artifact can take part by defining

    def profile(self, inputs: dict[str, np.ndarray], iterations: int, warmup: int) -> list[dict]

that runs ``warmup + iterations`` times and returns Chrome-trace events in the same shape:
``{"cat": "Node", "name": node, "ts": us, "dur": us, "args": {"op_name": op}}`` per kernel and
optionally ``{"cat": "Session", "name": "model_run", "ts": us, "dur": us}`` per run.

A latency breakdown of one full run (load, session creation, input preparation, inference,
output fetch) comes with it; ONNX Runtime's IO binding separates inference from output fetch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InvalidModelError, MissingDependencyError, UsageError, VerificationError

KERNEL_SUFFIX = "_kernel_time"


# ----------------------------------------------------------------------------- parsing a trace


@dataclass
class OpProfile:
    """Time per op type and per node, averaged per run, from a Chrome trace."""

    runs: int
    run_us: float  # mean wall time of a run, as the runtime saw it (0 when the trace has no runs)
    kernel_us: float  # mean time in kernels per run
    by_op: list[dict] = field(default_factory=list)
    by_node: list[dict] = field(default_factory=list)

    @property
    def total_us(self) -> float:
        return max(self.run_us, self.kernel_us)

    def as_dict(self, top: int | None = None) -> dict:
        return {"runs": self.runs, "run_us": self.run_us, "kernel_us": self.kernel_us,
                "overhead_us": max(self.run_us - self.kernel_us, 0.0),
                "by_op": self.by_op, "top_nodes": self.by_node[:top] if top else self.by_node}


def parse_trace(events: Sequence[dict], warmup_runs: int = 0, runs: int | None = None) -> OpProfile:
    """Group kernel events by op type and by node, over the runs after the first ``warmup_runs``.

    Kernels are assigned to the ``model_run`` whose time window holds them; a trace without
    run events counts every kernel and needs ``runs`` to average over.
    """
    nodes = [e for e in events if e.get("cat") == "Node" and "dur" in e]
    if any(str(e.get("name", "")).endswith(KERNEL_SUFFIX) for e in nodes):
        nodes = [e for e in nodes if str(e["name"]).endswith(KERNEL_SUFFIX)]
    run_events = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"
                         and "dur" in e), key=lambda e: e.get("ts", 0))
    if run_events:
        kept = run_events[warmup_runs:]
        if not kept:
            raise UsageError("the trace holds no runs after the warm-up")
        windows = [(e["ts"], e["ts"] + e["dur"]) for e in kept]
        nodes = [e for e in nodes if any(lo <= e.get("ts", -1) <= hi for lo, hi in windows)]
        n_runs = len(kept)
        run_us = sum(e["dur"] for e in kept) / n_runs
    else:
        if not runs:
            raise UsageError("the trace has no model_run events; the number of runs is needed")
        n_runs, run_us = runs, 0.0
    per_node: dict[str, dict] = {}
    for e in nodes:
        name = str(e["name"])
        name = name[: -len(KERNEL_SUFFIX)] if name.endswith(KERNEL_SUFFIX) else name
        args = e.get("args") or {}
        rec = per_node.setdefault(name, {"node": name, "op_type": args.get("op_name", "?"),
                                         "provider": args.get("provider", ""), "us": 0.0, "calls": 0})
        rec["us"] += float(e["dur"])
        rec["calls"] += 1
    kernel_us = sum(r["us"] for r in per_node.values()) / n_runs
    total = max(run_us, kernel_us) or 1.0
    by_node = []
    for r in per_node.values():
        us = r["us"] / n_runs
        by_node.append({**r, "us": us, "calls": r["calls"] / n_runs, "share": us / total})
    by_node.sort(key=lambda r: -r["us"])
    per_op: dict[str, dict] = {}
    for r in by_node:
        rec = per_op.setdefault(r["op_type"], {"op_type": r["op_type"], "nodes": 0, "calls": 0.0, "us": 0.0})
        rec["nodes"] += 1
        rec["calls"] += r["calls"]
        rec["us"] += r["us"]
    by_op = sorted(({**r, "share": r["us"] / total} for r in per_op.values()), key=lambda r: -r["us"])
    return OpProfile(n_runs, run_us, kernel_us, by_op, by_node)


# ----------------------------------------------------------------------------- running


@dataclass
class ProfileRun:
    profile: OpProfile
    events: list[dict]
    breakdown: dict[str, float]  # stage -> seconds
    raw_trace: bytes | None = None  # ONNX Runtime's file as written, for --trace


def profile_onnx(model, feeds: dict[str, np.ndarray], *, iterations: int = 20, warmup: int = 3,
                 threads: int | None = None, providers: list[str] | None = None) -> ProfileRun:
    """Profile an ONNX model under ONNX Runtime, with its default graph optimizations, as the
    onnx target runs it. The profiler's file goes to a temporary folder and is removed."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed (pip install onnxruntime)") from None
    from .verify import OrtRunner, check_feeds, tensor_specs

    check_feeds({s.name: s for s in tensor_specs(model, "input")}, feeds)
    with tempfile.TemporaryDirectory(prefix="infoptc-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        t0 = time.perf_counter()
        try:
            session = ort.InferenceSession(model.SerializeToString(), opts,
                                           providers=providers or OrtRunner.default_providers())
        except Exception as e:
            raise InvalidModelError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0]}") from None
        t1 = time.perf_counter()
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for out in session.get_outputs():
            binding.bind_output(out.name)
        t2 = time.perf_counter()
        infer, fetch = [], []
        try:
            for _ in range(1 + warmup + iterations):  # the first run is reported on its own
                a = time.perf_counter()
                session.run_with_iobinding(binding)
                b = time.perf_counter()
                binding.copy_outputs_to_cpu()
                infer.append(b - a)
                fetch.append(time.perf_counter() - b)
        except Exception as e:
            raise VerificationError(f"ONNX Runtime failed to run the model: {str(e).splitlines()[0]}") from None
        finally:
            trace_path = session.end_profiling()
        raw = Path(trace_path).read_bytes()
    events = json.loads(raw)
    breakdown = {"session_creation": t1 - t0, "input_binding": t2 - t1, "first_inference": infer[0],
                 "first_output_fetch": fetch[0], "inference_p50": statistics.median(infer[1 + warmup:]),
                 "output_fetch_p50": statistics.median(fetch[1 + warmup:])}
    return ProfileRun(parse_trace(events, warmup_runs=1 + warmup), events, breakdown, raw)


def profile_artifact(artifact, feeds: dict[str, np.ndarray], *, iterations: int = 20, warmup: int = 3,
                     threads: int | None = None) -> ProfileRun:
    """ONNX Runtime's profiler for artifacts that hold an ONNX model; the artifact's own
    ``profile()`` for other targets; otherwise a ``UsageError`` naming the target."""
    model = getattr(artifact, "model", None)
    if model is not None:
        return profile_onnx(model, feeds, iterations=iterations, warmup=warmup,
                            threads=threads or getattr(artifact, "threads", None),
                            providers=getattr(artifact, "providers", None))
    if not callable(getattr(artifact, "profile", None)):
        raise UsageError(f"the {artifact.target or type(artifact).__name__} target offers no profiler "
                         "(its artifact has no profile() method); profile the .onnx model instead")
    from .verify import check_feeds

    check_feeds({s.name: s for s in artifact.inputs}, feeds)
    t0 = time.perf_counter()
    artifact.run(feeds)
    first = time.perf_counter() - t0
    events = list(artifact.profile(feeds, iterations=iterations, warmup=warmup))
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        artifact.run(feeds)
        times.append(time.perf_counter() - t0)
    has_runs = any(e.get("name") == "model_run" for e in events)
    prof = parse_trace(events, warmup_runs=warmup if has_runs else 0, runs=None if has_runs else iterations)
    breakdown = {"first_inference": first, "inference_p50": statistics.median(times)}
    return ProfileRun(prof, events, breakdown)


# ----------------------------------------------------------------------------- CLI


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
    from .bench import _note, bind_dims, inputs_for, parse_dims, print_wide
    from .ir import write_atomic
    from .cli import _emit_json, err, load_npz, out
    from .targets import load

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
    with err.status("profiling", spinner="dots") if not args.quiet else _nothing():
        run = profile_artifact(artifact, feeds, iterations=args.iterations, warmup=args.warmup, threads=args.threads)
    breakdown = {"model_load": t1 - t0, "input_preparation": t2 - t1 + run.breakdown.get("input_binding", 0.0),
                 **{k: v for k, v in run.breakdown.items() if k != "input_binding"}}
    breakdown["cold_run_total"] = sum(breakdown.get(k, 0.0) for k in (
        "model_load", "session_creation", "input_preparation", "first_inference", "first_output_fetch"))
    if args.trace:
        write_atomic(Path(args.trace), run.raw_trace or json.dumps(run.events).encode())
        _note(args, f"wrote {args.trace}")
    data = {"subject": args.subject, "target": artifact.target, "iterations": args.iterations, "warmup": args.warmup,
            "input_shapes": {k: list(np.shape(v)) for k, v in feeds.items()},
            **run.profile.as_dict(top=args.top), "breakdown_s": breakdown, "trace": args.trace}
    if args.json:
        _emit_json(data)
        return 0
    for t in tables(data):
        print_wide(out, t)
    return 0


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


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
