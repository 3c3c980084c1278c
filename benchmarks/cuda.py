"""Latency of ``--target cuda -O3`` on the golden models, against ONNX Runtime's CUDA provider.

    .venv/bin/python benchmarks/cuda.py [MODELS...] [--seq 128] [--rounds 100] [--warmup 10] [--json]

Needs an NVIDIA GPU: without one it prints one line and exits with code 5 (as ``infoptc run``
does for a cuda artifact). For every model, batch 1 (symbolic sequence dims set by --seq), two
rows: ONNX Runtime's CUDAExecutionProvider on the original model (onnxruntime-gpu; where it is
not installed the row says so), and the model compiled with ``--target cuda -O3`` for this GPU's
architecture, with the default (untuned) schedules. Both are timed end to end from numpy to
numpy, host-device copies included, as a caller of either sees them; latency is the median of
interleaved runs (one call of each per round), "vs ORT" that median over ORT CUDA's. "max |err|"
is the largest absolute difference from ONNX Runtime on the CPU, on the same inputs.
"""

from __future__ import annotations

import argparse
import importlib.util
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
from infoptc.errors import InfoptcError, MissingDependencyError
from infoptc.verify import random_inputs

from golden_models import BUILDERS, MODEL_NAMES


def _load_cpu_benchmark():
    """benchmarks/backends.py, by path: its folder is no package, and ``import backends`` would
    find the repository's backends/ (infoptc.backends) first."""
    spec = importlib.util.spec_from_file_location("infoptc_bench_backends", Path(__file__).with_name("backends.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu_bench = _load_cpu_benchmark()


def gpu_or_exit() -> str:
    """This GPU's name, or exit 5 with one line where there is none (or no TVM to drive it)."""
    try:
        from infoptc.backends.tvm import import_tvm

        device = import_tvm().cuda(0)
        if not device.exist:
            raise MissingDependencyError("no NVIDIA GPU usable here (TVM sees no CUDA device): "
                                         "run this benchmark on a GPU machine")
        return str(device.device_name)
    except MissingDependencyError as e:
        print(f"benchmarks/cuda.py: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


class OrtCuda:
    """ORT_ENABLE_ALL on the CUDAExecutionProvider; ``note`` says why not where it cannot be."""

    def __init__(self, model: onnx.ModelProto):
        import onnxruntime as ort

        self.session, self.note = None, ""
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            self.note = "onnxruntime-gpu not installed (pip install onnxruntime-gpu)"
            return
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CUDAExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - e.g. cuDNN missing: the row says what ORT said
            self.note = f"ORT CUDA session failed: {str(e).splitlines()[0][:120]}"
            return
        # ORT falls back to the CPU quietly when the CUDA provider cannot load its libraries.
        if session.get_providers()[0] != "CUDAExecutionProvider":
            self.note = f"ORT fell back to {session.get_providers()[0]} (CUDA provider libraries missing?)"
            return
        self.session = session
        self.names = [o.name for o in session.get_outputs()]

    def run(self, feeds):
        return dict(zip(self.names, self.session.run(self.names, feeds)))


def max_abs_err(reference: dict, outputs: dict) -> float:
    return max(float(np.max(np.abs(reference[k].astype(np.float64) - outputs[k].astype(np.float64))))
               if reference[k].size else 0.0 for k in reference)


def bench_model(name: str, args) -> list[dict]:
    model = BUILDERS[name]()
    shapes = cpu_bench.bound_shapes(model, args.seq)
    feeds = random_inputs(cpu_bench.with_shapes(model, shapes), seed=0)
    reference = cpu_bench.OrtSession(model, threads=0).run(feeds)  # 0: ORT's default, all cores

    rows: list[dict] = []
    runners: list[tuple[str, object, float | None]] = []
    ort_cuda = OrtCuda(model)
    if ort_cuda.session is None:
        rows.append({"model": name, "runner": "onnxruntime cuda (original)", "error": ort_cuda.note})
    else:
        runners.append(("onnxruntime cuda (original)", ort_cuda, None))
    start = time.perf_counter()
    try:
        artifact = infoptc.compile(model, target="cuda", opt_level=3, input_shapes=shapes)
        runners.append(("infoptc cuda -O3", artifact, time.perf_counter() - start))
    except InfoptcError as e:
        rows.append({"model": name, "runner": "infoptc cuda -O3", "error": str(e)})

    outputs, times = {}, {label: [] for label, _, _ in runners}
    for label, runner, _ in runners:  # warm-up: CUDA context, module load, allocator, cuDNN autotuning
        for _ in range(args.warmup):
            outputs[label] = runner.run(feeds)
    for _ in range(args.rounds):
        for label, runner, _ in runners:
            t0 = time.perf_counter()
            runner.run(feeds)
            times[label].append(time.perf_counter() - t0)
    ort_ms = statistics.median(times["onnxruntime cuda (original)"]) * 1e3 if ort_cuda.session else None
    for label, _, compile_s in runners:
        ms = statistics.median(times[label]) * 1e3
        rows.append({"model": name, "runner": label, "ms": ms, "vs_ort": ms / ort_ms if ort_ms else None,
                     "compile_s": compile_s, "max_abs_err": max_abs_err(reference, outputs[label])})
    return sorted(rows, key=lambda r: r["runner"] != "onnxruntime cuda (original)")


def print_table(rows: list[dict], gpu: str, args) -> None:
    print(f"{gpu}, batch 1, seq {args.seq}, median of {args.rounds} interleaved runs, numpy in and out")
    header = f"{'model':<13} {'runner':<28} {'ms':>9} {'vs ORT':>7} {'compile s':>9} {'max |err|':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<13} {r['runner']:<28} {'-':>9} {'-':>7} {'-':>9} {'-':>10}  {r['error'][:90]}")
            continue
        ratio = "-" if r["vs_ort"] is None else f"{r['vs_ort']:.2f}x"
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        print(f"{r['model']:<13} {r['runner']:<28} {r['ms']:>9.3f} {ratio:>7} {compile_s:>9} {r['max_abs_err']:>10.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODEL_NAMES), metavar="MODEL")
    parser.add_argument("--seq", type=int, default=128, help="value of symbolic sequence dims (default 128)")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODEL_NAMES)}")
    gpu = gpu_or_exit()

    rows = [row for name in args.models for row in bench_model(name, args)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, gpu, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
