"""Latency of the backends on the golden models, against ONNX Runtime.

    .venv/bin/python benchmarks/backends.py [MODELS...] [--threads 2] [--seq 128] [--rounds 50]
                                            [--tune N] [--tune-time SECONDS] [--tuning-db DIR] [--json]

For every model, batch 1 (symbolic sequence dims set by --seq), one table row per runner:
ONNX Runtime (ORT_ENABLE_ALL) on the original model; ``--target onnx -O3``; ``--target llvm -O3``
untuned; and with ``--tune N`` / ``--tune-time SECONDS`` (the issue's table: 600),
``--target llvm -O3`` tuned with that MetaSchedule budget (kernels keep the rule schedule
unless the tuned one measures faster; a database already holding the records is reused). Latency
is the median of interleaved runs (one call of each runner per round, so load changes on a
shared machine hit all runners alike); "vs ORT" is that median over ORT's. "max |err|" is the
largest absolute difference from ORT's outputs on the same inputs.

ONNX Runtime's and TVM's worker threads spin for a while after a run; interleaved run by run
on a small machine, the spinners of one runtime steal the cores the next one needs (ORT's bert
went from 3.3 to 5.3 ms right after TVM runs; TVM's resnet from 1.2 to 30 ms right after
ORT's). So the runners take turns: a pause (--settle), a few untimed runs that wake the
runner's threads, then --block timed runs; every runtime keeps its default threading (ORT with
spinning off measured 1.3-2x slower on resnet here, so turning it off would flatter TVM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import infoptc
import numpy as np
import onnx
from infoptc.bench import run_interleaved
from infoptc.errors import InfoptcError
from infoptc.verify import random_inputs, tensor_specs

from golden_models import BUILDERS, MODEL_NAMES, REAL_SIZE_BUILDERS, REAL_SIZE_NAMES


class OrtSession:
    """ORT_ENABLE_ALL, ``threads`` intra-op threads, otherwise ORT's defaults."""

    def __init__(self, model: onnx.ModelProto, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds):
        return dict(zip(self.names, self.session.run(self.names, feeds)))


def bound_shapes(model: onnx.ModelProto, seq: int) -> dict[str, tuple[int, ...]]:
    """Batch 1, every other symbolic dim = seq."""
    shapes = {}
    for spec in tensor_specs(model, "input"):
        if spec.shape is None or all(isinstance(d, int) and d > 0 for d in spec.shape):
            continue
        shapes[spec.name] = tuple(
            d if isinstance(d, int) and d > 0 else 1 if i == 0 else seq for i, d in enumerate(spec.shape))
    return shapes


def with_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for vi in copy.graph.input:
        if vi.name in shapes:
            for dim, value in zip(vi.type.tensor_type.shape.dim, shapes[vi.name]):
                dim.Clear()
                dim.dim_value = value
    return copy


def bench_model(name: str, args) -> list[dict]:
    model = {**BUILDERS, **REAL_SIZE_BUILDERS}[name]()
    shapes = bound_shapes(model, args.seq)
    feeds = random_inputs(with_shapes(model, shapes), seed=0)
    ort = OrtSession(model, args.threads)
    reference = ort.run(feeds)

    runners: list[tuple[str, object, float | None]] = [("onnxruntime (original)", ort, None)]
    rows: list[dict] = []
    notes: dict[str, str] = {}
    configs = [("infoptc onnx -O3", "onnx", {}), ("infoptc llvm -O3", "llvm", {})]
    if args.tune or args.tune_time:
        budget = {k: v for k, v in (("tune", args.tune), ("tune_time", args.tune_time)) if v}
        label = " ".join(f"{v:g} s" if k == "tune_time" else f"{v} trials" for k, v in budget.items())
        configs.append((f"infoptc llvm -O3 tuned ({label})", "llvm",
                        {**budget, "tuning_db": str(Path(args.tuning_db) / name)}))
    for label, target, options in configs:
        start = time.perf_counter()
        try:
            artifact = infoptc.compile(model, target=target, opt_level=3, input_shapes=shapes,
                                       threads=args.threads, **options)
        except InfoptcError as e:
            rows.append({"model": name, "runner": label, "error": str(e)})
            continue
        seconds = time.perf_counter() - start
        runners.append((label, OrtSession(artifact.model, args.threads) if target == "onnx" else artifact, seconds))
        tuning = artifact.describe().get("tuning") if "tune" in label else None
        if tuning:
            check = tuning.get("model_check")
            notes[label] = (f"{tuning.get('tasks_using_tuned', 0)} of {tuning.get('tasks', '?')} kernels tuned, "
                            f"{tuning.get('trials_run', '?')} trials"
                            + (f"; whole model {check['tuned_ms']:.3f} vs rules {check['rules_ms']:.3f} ms: "
                               f"{check['use']} kept" if check else ""))

    outputs = {}
    for label, runner, _ in runners:  # warm-up (first-call allocation, thread pools, JIT)
        for _ in range(args.warmup):
            outputs[label] = runner.run(feeds)
    samples = run_interleaved([lambda r=runner: r.run(feeds) for _, runner, _ in runners],
                              iterations=args.rounds, settle=args.settle, block=args.block, wake=5)
    results = {label: times for (label, _, _), times in zip(runners, samples)}
    ort_ms = statistics.median(results[runners[0][0]]) * 1e3
    for label, _, compile_s in runners:
        ms = statistics.median(results[label]) * 1e3
        err = max(float(np.max(np.abs(reference[k].astype(np.float64) - outputs[label][k].astype(np.float64))))
                  if reference[k].size else 0.0 for k in reference)
        rows.append({"model": name, "runner": label, "ms": ms, "vs_ort": ms / ort_ms,
                     "compile_s": compile_s, "max_abs_err": err, "note": notes.get(label, "")})
    order = [label for label, _, _ in runners]
    rows.sort(key=lambda r: order.index(r["runner"]) if r["runner"] in order else len(order))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODEL_NAMES), metavar="MODEL")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128, help="value of symbolic sequence dims (default 128)")
    parser.add_argument("--rounds", type=int, default=6, help="turns per runner (default 6: 180 timed runs)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--settle", type=float, default=0.05,
                        help="seconds of pause before each runner's turn, so the previous runner's threads go idle")
    parser.add_argument("--block", type=int, default=30, help="timed runs per turn (after 5 untimed ones)")
    parser.add_argument("--tune", type=int, default=0, metavar="N", help="also benchmark llvm tuned with N trials")
    parser.add_argument("--tune-time", type=float, default=0, metavar="SECONDS",
                        help="also benchmark llvm tuned for SECONDS per model")
    parser.add_argument("--tuning-db", default="tuning_db", help="folder for the tuning databases (one per model)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODEL_NAMES + REAL_SIZE_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODEL_NAMES + REAL_SIZE_NAMES)}")

    rows = []
    if not args.json:  # rows print as each model finishes: a tuned run takes minutes per model
        print(f"threads {args.threads}, batch 1, seq {args.seq}, median of {args.rounds * args.block} runs "
              f"({args.rounds} turns per runner)")
        header = f"{'model':<13} {'runner':<34} {'ms':>9} {'vs ORT':>7} {'compile s':>9} {'max |err|':>10}"
        print(header)
        print("-" * len(header), flush=True)
    for name in args.models:
        model_rows = bench_model(name, args)
        rows.extend(model_rows)
        if not args.json:
            for r in model_rows:
                print(format_row(r), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:<13} {r['runner']:<34} {'-':>9} {'-':>7} {'-':>9} {'-':>10}  {r['error'][:90]}"
    compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
    return (f"{r['model']:<13} {r['runner']:<34} {r['ms']:>9.3f} {r['vs_ort']:>6.2f}x {compile_s:>9} "
            f"{r['max_abs_err']:>10.2e}  {r['note']}")

if __name__ == "__main__":
    sys.exit(main())
