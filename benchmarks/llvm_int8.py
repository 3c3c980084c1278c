"""The llvm target's int8 kernels against ONNX Runtime on the same quantized (QDQ) graph.

    .venv/bin/python benchmarks/llvm_int8.py [MODELS...] [--threads 2] [--rounds 5] [--block 10]
                                             [--calibration-samples 8] [--eval-samples 4] [--json]
                                             [--mattr=-avx512vnni,-avxvnni --isa avx2]

Per real-size golden model (default: resnet18 mobilenetv2 bert_small vit_tiny), batch 1, seq 128:

    ort fp32     ONNX Runtime on the fp32 model
    ort int8     ONNX Runtime on the QDQ model that ``--quantize int8`` writes for the llvm target
                 (the graph llvm int8 compiles; ORT runs it on its int8 kernels)
    ort int8*    ONNX Runtime on the int8 model of ``-O3 --quantize int8`` for the onnx target: the
                 same quantizer, plus ORT's contrib fusions (Attention, Gelu, ...): ORT's best
    llvm fp32    ``infoptc.compile(model, target="llvm", opt_level=3)``
    llvm int8    ``infoptc.compile(model, target="llvm", opt_level=3, quantize="int8", calibration=...)``:
                 the same QDQ graph (``artifact.model``), compiled to the int8 kernels of backends/tvm/int8.py

Calibration and evaluation data, and the quantizer's settings, are benchmarks/quantize.py's
(the int8 speed check off: every layer int8, the graph ORT and llvm both run). Latency is the
median of interleaved turns (benchmarks/backends.py's way: a pause, untimed wake-up runs, then
``--block`` timed runs per turn); "vs ORT fp32" is that median over ORT fp32's. Error against ORT
fp32 on the evaluation feeds: SQNR of the first output (dB) and max |difference|; the int8 rows
also give max |llvm int8 - ort int8| (integer accumulation is exact; requantization rounds).
The goal of issue 19: llvm int8 <= ort int8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np


import infoptc
import quantize as qbench  # benchmarks/quantize.py: data, sessions, SQNR
from infoptc.bench import run_interleaved

from benchmarks.backends import OrtSession, bound_shapes, cpu_line  # ORT as that table runs it; batch 1, seq


DEFAULT = ["resnet18", "mobilenetv2", "bert_small", "vit_tiny"]


class Compiled:
    def __init__(self, artifact):
        self.artifact = artifact

    def run(self, feeds):
        return self.artifact.run(feeds)


def bench_model(name: str, args) -> list[dict]:
    import golden_models

    kind = qbench.MODELS[name]
    model = golden_models.module(name).build()
    cal = qbench.feeds_for(model, kind, args.calibration_samples, "calibration")
    ev = qbench.feeds_for(model, kind, args.eval_samples, "evaluation")
    shapes = bound_shapes(model, qbench.SEQ)
    options = {"input_shapes": shapes, "threads": args.threads, "mattr": args.mattr}
    fp32 = infoptc.compile(model, target="llvm", opt_level=3, **options)
    int8 = infoptc.compile(model, target="llvm", opt_level=3, quantize="int8", calibration=cal,
                           quantize_options={"speed-check": False, "isa": args.isa}, **options)
    # ORT's own best int8 graph: the onnx target's -O3 (its contrib fusions: Attention, Gelu...)
    best = infoptc.compile(model, opt_level=3, quantize="int8", calibration=cal, input_shapes=shapes,
                           quantize_options={"speed-check": False, "isa": args.isa}).model
    runners = {"ort fp32": OrtSession(model, args.threads), "ort int8": OrtSession(int8.model, args.threads),
               "ort int8*": OrtSession(best, args.threads), "llvm fp32": Compiled(fp32), "llvm int8": Compiled(int8)}
    outputs = {label: [list(r.run(f).values()) for f in ev] for label, r in runners.items()}
    feed = ev[0]
    labels = list(runners)
    times = run_interleaved([lambda r=runners[lab]: r.run(feed) for lab in labels], iterations=args.rounds,
                            warmup=3, settle=0.05, block=args.block, wake=3)
    medians = {lab: statistics.median(t) for lab, t in zip(labels, times)}
    rows = []
    for label in labels:
        row = {"model": name, "runner": label, "ms": medians[label] * 1e3,
               "vs_ort_fp32": medians[label] / medians["ort fp32"],
               "sqnr_db": qbench.sqnr(outputs["ort fp32"], outputs[label]),
               "max_abs_err": max_abs(outputs["ort fp32"], outputs[label])}
        if label == "llvm int8":
            row["vs_ort_int8"] = max_abs(outputs["ort int8"], outputs[label])
            row["int8_kernels"] = int8_kernels(int8)
        rows.append(row)
    return rows


def max_abs(ref: list[list[np.ndarray]], out: list[list[np.ndarray]]) -> float:
    return max(float(np.max(np.abs(r.astype(np.float64) - o.astype(np.float64))))
               for rs, os_ in zip(ref, out) for r, o in zip(rs, os_) if r.size)


def int8_kernels(artifact) -> str:
    """Which dot-product instruction the library's code uses (its assembly)."""
    asm = artifact.executable.mod.imports[0].inspect_source("asm")
    found = [name for name in ("vpdpbusd", "vpmaddubsw") if name in asm]
    return "+".join(found) or "none"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT, metavar="MODEL")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="turns per runner")
    parser.add_argument("--block", type=int, default=10, help="timed runs per turn")
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--mattr", default=None,
                        help="LLVM features for both llvm builds, e.g. -avx512vnni,-avxvnni: the AVX2 path on a VNNI host "
                             "(ORT still uses the host's VNNI)")
    parser.add_argument("--isa", default="auto", help="the quantizer's recipe (avx2: 7-bit weights)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in qbench.MODELS or m in qbench.TRAINED]
    if unknown:
        parser.error(f"unknown model(s) {unknown}")
    rows = []
    if not args.json:
        print(cpu_line())
        print(f"threads {args.threads}, batch 1, seq {qbench.SEQ}, median of {args.rounds * args.block} runs"
              + (f"; llvm mattr {args.mattr}, quantizer isa {args.isa}" if args.mattr or args.isa != "auto" else ""))
        header = (f"{'model':<12} {'runner':<10} {'ms':>8} {'vs ORT fp32':>11} {'SQNR dB':>8} {'max |err|':>10} "
                  f"{'vs ORT int8':>11}  kernels")
        print(header)
        print("-" * len(header), flush=True)
    for name in args.models:
        model_rows = bench_model(name, args)
        rows.extend(model_rows)
        if not args.json:
            for r in model_rows:
                print(f"{r['model']:<12} {r['runner']:<10} {r['ms']:>8.3f} {r['vs_ort_fp32']:>10.2f}x "
                      f"{r['sqnr_db']:>8.1f} {r['max_abs_err']:>10.2e} "
                      f"{r['vs_ort_int8']:>11.2e}  {r['int8_kernels']}" if "vs_ort_int8" in r else
                      f"{r['model']:<12} {r['runner']:<10} {r['ms']:>8.3f} {r['vs_ort_fp32']:>10.2f}x "
                      f"{r['sqnr_db']:>8.1f} {r['max_abs_err']:>10.2e}", flush=True)
            ms = {r["runner"]: r["ms"] for r in model_rows}
            print(f"{name:<12} llvm int8 / ort int8 = {ms['llvm int8'] / ms['ort int8']:.2f}x (same graph), "
                  f"{ms['llvm int8'] / ms['ort int8*']:.2f}x (ORT's -O3 int8 graph)", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
