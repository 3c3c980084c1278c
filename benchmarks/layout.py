"""TVM llvm: convolutions in NHWC against NCHW, on the golden CNNs, side by side.

    .venv/bin/python benchmarks/layout.py [MODELS...] [--threads 2] [--rounds 20] [--json]

For every model (batch 1) the llvm target at -O3, untuned, twice: target option cpu_layout=true
(relax ConvertLayout puts conv2d in NHWC/HWIO, the default) and cpu_layout=false (NCHW/OIHW).
Latency is the median of interleaved runs (compiler/bench.py run_interleaved: turns with a
pause and untimed wake-up runs); "NHWC / NCHW" is the ratio of the medians, below 1 when NHWC
is faster. "max |diff|" is the largest difference between the two builds' outputs.
Default models: resnet18 mobilenetv2 efficientnet_b0 (the small golden "resnet" and "mobilenet"
serve for a quick check).

A second table measures convert-layout on an NHWC-exported CNN (golden_models/nhwc_cnn.py: a
Transpose pair around every Conv): Transposes before and after, and latency before and after on
ONNX Runtime (ORT_ENABLE_ALL) and on the llvm target, interleaved the same way.

ONNX Runtime has no NHWC choice to measure here: its CPU provider has no fp32 NhwcConv
(com.microsoft.NhwcConv is NOT_IMPLEMENTED in ORT 1.32) and runs fp32 convolutions in its own
blocked NCHWc layout.
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
from infoptc.bench import run_interleaved
from infoptc.verify import random_inputs

from golden_models import BUILDERS, REAL_SIZE_BUILDERS, nhwc_cnn

DEFAULT_MODELS = ("resnet18", "mobilenetv2", "efficientnet_b0")


def measure(name: str, args) -> dict:
    model = {**BUILDERS, **REAL_SIZE_BUILDERS}[name]()
    feeds = random_inputs(model)
    builds, compile_s = {}, {}
    for layout, cpu_layout in (("NHWC", True), ("NCHW", False)):
        start = time.perf_counter()
        builds[layout] = infoptc.compile(model, target="llvm", opt_level=3, threads=args.threads,
                                         cpu_layout=cpu_layout)
        compile_s[layout] = time.perf_counter() - start
    outputs = {k: a.run(feeds) for k, a in builds.items()}
    for _ in range(3):
        for a in builds.values():
            a.run(feeds)
    samples = run_interleaved([lambda a=a: a.run(feeds) for a in builds.values()], iterations=args.rounds,
                              settle=0.05, block=args.block, wake=5)
    ms = {k: statistics.median(s) * 1e3 for k, s in zip(builds, samples)}
    diff = max(float(np.max(np.abs(outputs["NHWC"][k] - outputs["NCHW"][k]))) for k in outputs["NHWC"])
    return {"model": name, "nhwc_ms": ms["NHWC"], "nchw_ms": ms["NCHW"], "ratio": ms["NHWC"] / ms["NCHW"],
            "compile_s": compile_s, "max_abs_diff": diff}


def _median_ms(runners, feeds, args) -> list[float]:
    for run in runners:
        for _ in range(3):
            run(feeds)
    samples = run_interleaved([lambda r=r: r(feeds) for r in runners], iterations=args.rounds, settle=0.05,
                              block=args.block, wake=5)
    return [statistics.median(s) * 1e3 for s in samples]


def measure_convert_layout(args) -> list[dict]:
    from infoptc.verify import OrtRunner

    model = nhwc_cnn.build()
    converted = infoptc.optimize(model, passes="convert-layout")
    count = [sum(n.op_type == "Transpose" for n in m.graph.node) for m in (model, converted)]
    feeds = random_inputs(model)
    rows = []
    ort = [OrtRunner(m, threads=args.threads).run for m in (model, converted)]
    llvm = [infoptc.compile(m, target="llvm", opt_level=3, threads=args.threads).run for m in (model, converted)]
    for runtime, runners in (("onnxruntime", ort), ("llvm -O3", llvm)):
        before, after = _median_ms(runners, feeds, args)
        rows.append({"runtime": runtime, "transposes": count, "before_ms": before, "after_ms": after,
                     "ratio": after / before})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--no-nhwc-cnn", action="store_true", help="skip the convert-layout table")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        rows.append(measure(name, args))
        print(f"  {name}: built in {rows[-1]['compile_s']['NHWC']:.0f} s / {rows[-1]['compile_s']['NCHW']:.0f} s",
              file=sys.stderr)
    converted = [] if args.no_nhwc_cnn else measure_convert_layout(args)
    if args.json:
        print(json.dumps({"llvm_layout": rows, "convert_layout": converted}, indent=2))
        return 0
    print("| model | NHWC ms | NCHW ms | NHWC / NCHW | max abs diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['nhwc_ms']:.2f} | {r['nchw_ms']:.2f} | {r['ratio']:.3f} | {r['max_abs_diff']:.1e} |")
    if converted:
        print("\nconvert-layout on golden_models/nhwc_cnn.py (1x56x56x3, 32 channels, 4 residual blocks)\n")
        print("| runtime | Transposes before -> after | before ms | after ms | after / before |")
        print("|---|---|---|---|---|")
        for r in converted:
            print(f"| {r['runtime']} | {r['transposes'][0]} -> {r['transposes'][1]} | {r['before_ms']:.3f} | "
                  f"{r['after_ms']:.3f} | {r['ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
