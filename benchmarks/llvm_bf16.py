"""The llvm target's bf16 kernels (AVX512_BF16) on the real-size models, against ORT fp32.

    .venv/bin/python benchmarks/llvm_bf16.py [MODELS...] [--threads 2] [--seq 128] [--rounds 4]
                                            [--block 10] [--profile] [--json]

Per model (default: resnet18 mobilenetv2 efficientnet_b0 bert_small vit_tiny, batch 1, symbolic sequence dims
set by --seq), in interleaved turns (benchmarks/backends.py's protocol: a pause, a few untimed
runs, then --block timed ones, runners in rotation): ONNX Runtime fp32 on the original model,
``infoptc.compile(model, target="llvm", opt_level=3)`` (llvm fp32), the same with
``quantize="bf16"`` (llvm bf16), and OpenVINO at its default precision (bf16 where the CPU has
it) when the ``openvino`` package imports (else a note). Latency is the median; "vs ORT" its
ratio to ORT fp32's. Error columns compare each runner's outputs with ORT fp32's on the same
inputs: the largest absolute difference, and that over the output's largest magnitude.

``--profile`` also prints llvm bf16's kernels by total time (the VM's instrument hook, one
call each after the timing), to see which kernels hold the time.

Needs a CPU with AVX512_BF16 (else llvm bf16 is reported as skipped: exit 5 of the compile).
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
from benchmarks.backends import OpenVinoSession, OrtSession, bound_shapes, cpu_line, with_shapes
from infoptc.bench import run_interleaved
from infoptc.errors import InfoptcError
from infoptc.verify import random_inputs

from golden_models import BUILDERS, REAL_SIZE_BUILDERS

DEFAULT_MODELS = ["resnet18", "mobilenetv2", "efficientnet_b0", "bert_small", "vit_tiny"]


def openvino_note() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino not installed (pip install openvino): OpenVINO row skipped"
    return None


def profile(artifact, feeds: dict, runs: int = 5) -> list[tuple[str, float, int]]:
    """(kernel, ms per model run, calls per run) of a TVM artifact over ``runs`` runs, slowest first."""
    import tvm

    vm, _ = artifact._machine()
    artifact.run(feeds)  # warm
    totals: dict[str, list] = {}
    starts: dict[str, float] = {}

    def instrument(func, name, before, ret_value, *args):
        if before:
            starts[name] = time.perf_counter()
        else:
            entry = totals.setdefault(name, [0.0, 0])
            entry[0] += (time.perf_counter() - starts.pop(name, time.perf_counter())) * 1e3
            entry[1] += 1
        return tvm.relax.VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            artifact.run(feeds)
    finally:
        vm.set_instrument(lambda *a: tvm.relax.VMInstrumentReturnKind.NO_OP)
    return sorted(((n, t / runs, c // runs) for n, (t, c) in totals.items()), key=lambda row: -row[1])


def errors(reference: dict, outputs: dict) -> tuple[float, float]:
    """Largest |difference| over all float outputs, and that over the output's largest |value|."""
    worst_abs = worst_rel = 0.0
    for name, ref in reference.items():
        if ref.dtype.kind != "f" or not ref.size:
            continue
        diff = float(np.max(np.abs(ref.astype(np.float64) - np.asarray(outputs[name], np.float64))))
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(float(np.max(np.abs(ref))), 1e-30))
    return worst_abs, worst_rel


def bench_model(name: str, args) -> tuple[list[dict], list]:
    model = {**BUILDERS, **REAL_SIZE_BUILDERS}[name]()
    shapes = bound_shapes(model, args.seq)
    feeds = random_inputs(with_shapes(model, shapes), seed=0)
    ort = OrtSession(model, args.threads)
    reference = ort.run(feeds)
    runners: list[tuple[str, object, float | None]] = [("ORT fp32", ort, None)]
    rows: list[dict] = []
    for label, quantize in (("llvm fp32", None), ("llvm bf16", "bf16")):
        start = time.perf_counter()
        try:
            artifact = infoptc.compile(model, target="llvm", opt_level=3, input_shapes=shapes, threads=args.threads,
                                       quantize=quantize)
        except InfoptcError as e:
            rows.append({"model": name, "runner": label, "error": str(e)})
            continue
        runners.append((label, artifact, time.perf_counter() - start))
    note = openvino_note()
    if note is None:
        start = time.perf_counter()
        try:
            ov_runner = OpenVinoSession(with_shapes(model, shapes), args.threads)
            runners.append((f"OpenVINO ({ov_runner.precision})", ov_runner, time.perf_counter() - start))
        except Exception as e:  # noqa: BLE001 - a model OpenVINO cannot read
            rows.append({"model": name, "runner": "OpenVINO", "error": f"{type(e).__name__}: {str(e)[:200]}"})
    else:
        rows.append({"model": name, "runner": "OpenVINO", "error": note})

    outputs = {}
    for label, runner, _ in runners:
        for _ in range(args.warmup):
            outputs[label] = runner.run(feeds)
    samples = run_interleaved([lambda r=runner: r.run(feeds) for _, runner, _ in runners],
                              iterations=args.rounds, settle=args.settle, block=args.block, wake=3)
    ort_ms = statistics.median(samples[0]) * 1e3
    for (label, _, compile_s), times in zip(runners, samples):
        ms = statistics.median(times) * 1e3
        err_abs, err_rel = errors(reference, outputs[label])
        rows.append({"model": name, "runner": label, "ms": ms, "vs_ort": ms / ort_ms, "compile_s": compile_s,
                     "max_abs_err": err_abs, "max_rel_err": err_rel})
    order = [label for label, _, _ in runners]
    rows.sort(key=lambda r: order.index(r["runner"]) if r["runner"] in order else len(order))
    kernels = []
    bf16 = next((runner for label, runner, _ in runners if label == "llvm bf16"), None)
    if args.profile and bf16 is not None:
        kernels = profile(bf16, feeds)
    return rows, kernels


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:<12} {r['runner']:<22} {'-':>9} {'-':>7} {'-':>9} {'-':>10} {'-':>9}  {r['error'][:100]}"
    compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
    return (f"{r['model']:<12} {r['runner']:<22} {r['ms']:>9.3f} {r['vs_ort']:>6.2f}x {compile_s:>9} "
            f"{r['max_abs_err']:>10.2e} {r['max_rel_err']:>9.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT_MODELS, metavar="MODEL")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4, help="turns per runner (default 4)")
    parser.add_argument("--block", type=int, default=10, help="timed runs per turn (default 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--settle", type=float, default=0.05)
    parser.add_argument("--profile", action="store_true", help="also list llvm bf16's slowest kernels")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in {**BUILDERS, **REAL_SIZE_BUILDERS}]
    if unknown:
        parser.error(f"unknown model(s) {unknown}")
    rows = []
    if not args.json:
        print(cpu_line())
        print(f"threads {args.threads}, batch 1, seq {args.seq}, median of {args.rounds * args.block} runs")
        header = (f"{'model':<12} {'runner':<22} {'ms':>9} {'vs ORT':>7} {'compile s':>9} {'max |err|':>10} "
                  f"{'rel err':>9}")
        print(header)
        print("-" * len(header), flush=True)
    for name in args.models:
        model_rows, kernels = bench_model(name, args)
        rows.extend(model_rows)
        if not args.json:
            for r in model_rows:
                print(format_row(r), flush=True)
            for kernel, ms, calls in kernels[:12]:
                print(f"    {kernel:<60} {ms:8.3f} ms  x{calls}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
