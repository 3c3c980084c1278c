"""Where the time of one inference goes, per op type and per node: what `infoptc profile`
(cli/profile.py) shows, ``profile_artifact(artifact, feeds)``.

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

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

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
    """The artifact's own ``profile()`` where it has one (a TVM library: its kernels); ONNX
    Runtime's profiler for artifacts that hold an ONNX model; otherwise a ``UsageError`` naming
    the target."""
    model = getattr(artifact, "model", None)
    if model is not None and not callable(getattr(artifact, "profile", None)):
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
