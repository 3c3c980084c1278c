"""Latency of the backends on the golden models, against ONNX Runtime.

    .venv/bin/python benchmarks/backends.py [MODELS...] [--threads 2] [--seq 128] [--rounds 50]
                                            [--tune N --tuning-db DIR] [--json]

For every model, batch 1 (symbolic sequence dims set by --seq), one table row per runner:
ONNX Runtime (ORT_ENABLE_ALL) on the original model; ``--target onnx -O3``; ``--target llvm -O3``
untuned; and with ``--tune N``, ``--target llvm -O3`` tuned with N MetaSchedule trials. Latency
is the median of interleaved runs (one call of each runner per round, so load changes on a
shared machine hit all runners alike); "vs ORT" is that median over ORT's. "max |err|" is the
largest absolute difference from ORT's outputs on the same inputs.

Every runtime keeps its default threading (ONNX Runtime's and TVM's workers spin for a while
after a run). Interleaved on a small machine, one runtime's spinners would steal the cores the
next one needs (ORT's bert went from 3.3 to 5.3 ms right after TVM runs), so every timed run
starts after a short pause (--settle) that lets the previous runner's threads go idle.
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

from golden_models import BUILDERS, MODEL_NAMES


class OrtSession:
    """ORT_ENABLE_ALL, ``threads`` intra-op threads."""

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
    model = BUILDERS[name]()
    shapes = bound_shapes(model, args.seq)
    feeds = random_inputs(with_shapes(model, shapes), seed=0)
    ort = OrtSession(model, args.threads)
    reference = ort.run(feeds)

    runners: list[tuple[str, object, float | None]] = [("onnxruntime (original)", ort, None)]
    rows: list[dict] = []
    configs = [("infoptc onnx -O3", "onnx", {}), ("infoptc llvm -O3", "llvm", {})]
    if args.tune:
        configs.append((f"infoptc llvm -O3 tuned ({args.tune})", "llvm",
                        {"tune": args.tune, "tuning_db": str(Path(args.tuning_db) / name)}))
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

    outputs = {}
    for label, runner, _ in runners:  # warm-up (first-call allocation, thread pools, JIT)
        for _ in range(args.warmup):
            outputs[label] = runner.run(feeds)
    samples = run_interleaved([lambda r=runner: r.run(feeds) for _, runner, _ in runners],
                              iterations=args.rounds, settle=args.settle)
    results = {label: times for (label, _, _), times in zip(runners, samples)}
    ort_ms = statistics.median(results[runners[0][0]]) * 1e3
    for label, _, compile_s in runners:
        ms = statistics.median(results[label]) * 1e3
        err = max(float(np.max(np.abs(reference[k].astype(np.float64) - outputs[label][k].astype(np.float64))))
                  if reference[k].size else 0.0 for k in reference)
        rows.append({"model": name, "runner": label, "ms": ms, "vs_ort": ms / ort_ms,
                     "compile_s": compile_s, "max_abs_err": err})
    order = [label for label, _, _ in runners]
    rows.sort(key=lambda r: order.index(r["runner"]) if r["runner"] in order else len(order))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODEL_NAMES), metavar="MODEL")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128, help="value of symbolic sequence dims (default 128)")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--settle", type=float, default=0.01,
                        help="seconds of pause before each timed run, so the previous runner's threads go idle")
    parser.add_argument("--tune", type=int, default=0, metavar="N", help="also benchmark llvm tuned with N trials")
    parser.add_argument("--tuning-db", default="tuning_db", help="folder for the tuning databases (one per model)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODEL_NAMES)}")

    rows = []
    for name in args.models:
        rows.extend(bench_model(name, args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"threads {args.threads}, batch 1, seq {args.seq}, median of {args.rounds} interleaved runs")
    header = f"{'model':<13} {'runner':<30} {'ms':>9} {'vs ORT':>7} {'compile s':>9} {'max |err|':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<13} {r['runner']:<30} {'-':>9} {'-':>7} {'-':>9} {'-':>10}  {r['error'][:90]}")
            continue
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        print(f"{r['model']:<13} {r['runner']:<30} {r['ms']:>9.3f} {r['vs_ort']:>6.2f}x {compile_s:>9} "
              f"{r['max_abs_err']:>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
