"""CPU backends on the real-size models, side by side with ONNX Runtime in one run.

    .venv/bin/python benchmarks/backends.py [MODELS...] [--threads 2] [--seq 128] [--rounds 6]
                                            [--tune N] [--tune-time SECONDS] [--tuning-db DIR]
                                            [--skip RUNNER ...] [--json out.json]

Default models: the real-size golden models (resnet18, mobilenetv2, efficientnet_b0, vit_tiny,
bert_small, gpt2_small; built from fixed seeds by golden_models/); the small golden ones (resnet,
mobilenet, bert, gpt, mlp, digits_cnn) by name. Batch 1, symbolic sequence dims = --seq.

One table, a section per model, one row per runner, latency as a ratio to ONNX Runtime fp32:

- ``ort fp32``: ONNX Runtime (ORT_ENABLE_ALL, --threads intra-op threads) on the original model.
- ``ort int8``: ONNX Runtime on the QDQ graph that ``llvm int8`` compiled (``infoptc -O3
  --quantize int8 --target llvm``, calibrated on the data below): the same quantized graph.
- ``openvino fp32`` / ``openvino default``: OpenVINO's CPU plugin (LATENCY hint, --threads
  threads) with ``INFERENCE_PRECISION_HINT=f32``, and with its default precision (bf16 where
  the CPU has AVX512_BF16 or AMX); only when the ``openvino`` package imports (``pip install
  openvino``), otherwise a note.
- ``llvm fp32``: ``infoptc -O3 --target llvm``, untuned; ``llvm fp32 tuned`` with --tune/--tune-time.
- ``llvm bf16``: ``--quantize bf16 --target llvm`` (exit 5 on a host without bf16: a note).
- ``llvm int8``: ``--quantize int8 --target llvm`` with the same calibration data as ``ort int8``.

Inputs are real-valued: 224x224 crops of scikit-learn's sample photos for the CNNs and ViT
(calibration from one photo, evaluation from the other), seeded token ids for the transformers
(benchmarks/quantize.py's data). "err vs fp32" is measured on --eval-samples evaluation inputs
against ORT fp32's outputs: SQNR in dB of the first output (higher is closer; inf = identical),
the task metric (top-1 agreement for classifiers, mean cosine for encoders, next-token top-1 for
decoders) and the largest absolute difference.

Latency is the median of interleaved turns: each runner in turn gets a pause (--settle), 5
untimed runs that wake its threads, then --block timed runs; every runtime keeps its default
threading. ONNX Runtime's and TVM's worker threads spin for a while after a run, and on a small
machine the spinners of one runtime steal the cores the next one needs, so runners never
interleave run by run. The CPU (model, flags, clock) heads the table: compare ratios from one
run only; the machines change between sessions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np
import onnx

import infoptc
from infoptc.bench import run_interleaved
from infoptc.errors import InfoptcError
from infoptc.verify import random_inputs, tensor_specs

from golden_models import BUILDERS, MODEL_NAMES, REAL_SIZE_BUILDERS, REAL_SIZE_NAMES
from quantize import MODELS as KINDS, feeds_for, metric

RUNNERS = ("ort fp32", "ort int8", "openvino fp32", "openvino default", "llvm fp32", "llvm fp32 tuned",
           "llvm bf16", "llvm int8")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


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


class OpenVinoSession:
    """OpenVINO's CPU plugin, LATENCY hint, ``threads`` threads; ``precision`` "f32" or None (its
    default: bf16 where the CPU has AVX512_BF16 or AMX)."""

    def __init__(self, model: onnx.ModelProto, threads: int, precision: str | None = None):
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.request = self.compiled.create_infer_request()
        self.names = [o.name for o in model.graph.output]  # OpenVINO's own may be an inner tensor's name

    def run(self, feeds):
        result = self.request.infer(feeds)
        return {name: np.asarray(result[out]) for name, out in zip(self.names, self.compiled.outputs)}


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


def model_data(name: str, model: onnx.ModelProto, args) -> tuple[str | None, list[dict], list[dict]]:
    """``(kind, calibration feeds, evaluation feeds)``: real-valued data where the model has a kind
    in benchmarks/quantize.py, seeded random inputs otherwise."""
    kind = KINDS.get(name)
    if kind is not None and args.seq == 128:  # quantize.py's token inputs are 128 long
        return kind, feeds_for(model, kind, args.calibration_samples, "calibration"), \
            feeds_for(model, kind, args.eval_samples, "evaluation")
    bound = with_shapes(model, bound_shapes(model, args.seq))
    return None, [random_inputs(bound, seed=100 + i) for i in range(args.calibration_samples)], \
        [random_inputs(bound, seed=i) for i in range(args.eval_samples)]


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    noise = float(np.sum((ref - out) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(max(float(np.sum(ref * ref)), 1e-30) / noise))


def build_runners(name: str, model: onnx.ModelProto, cal: list[dict], args):
    """``[(label, runner, compile seconds, note)]``; a runner that cannot be built is a note."""
    shapes = bound_shapes(model, args.seq)
    llvm = {"target": "llvm", "opt_level": 3, "input_shapes": shapes, "threads": args.threads}
    int8 = {}

    def llvm_int8():
        if "artifact" not in int8:
            start = time.perf_counter()
            int8["artifact"] = infoptc.compile(model, quantize="int8", calibration=cal, **llvm)
            int8["seconds"] = time.perf_counter() - start
        return int8["artifact"]

    def ort_int8():  # the very QDQ graph the llvm target compiled (its speed check is ORT's, off for llvm)
        try:
            return OrtSession(llvm_int8().model, args.threads)
        except (InfoptcError, ImportError):
            return OrtSession(infoptc.compile(model, opt_level=3, quantize="int8", calibration=cal,
                                              quantize_options={"speed-check": False}).model, args.threads)

    makers = {
        "ort fp32": lambda: OrtSession(model, args.threads),
        "ort int8": ort_int8,
        "openvino fp32": lambda: OpenVinoSession(model, args.threads, "f32"),
        "openvino default": lambda: OpenVinoSession(model, args.threads),
        "llvm fp32": lambda: infoptc.compile(model, **llvm),
        "llvm bf16": lambda: infoptc.compile(model, quantize="bf16", quantize_options={"keep-io-types": True}, **llvm),
        "llvm int8": llvm_int8,
    }
    if args.tune or args.tune_time:
        budget = {k: v for k, v in (("tune", args.tune), ("tune_time", args.tune_time)) if v}
        makers["llvm fp32 tuned"] = lambda: infoptc.compile(
            model, **llvm, **budget, tuning_db=str(Path(args.tuning_db) / name))
    runners = []
    for label in RUNNERS:
        if label not in makers or label in args.skip:
            continue
        start = time.perf_counter()
        try:
            runner = makers[label]()
        except ImportError as e:
            runners.append((label, None, None, f"not installed ({e.name}): pip install {e.name}"))
            continue
        except InfoptcError as e:
            runners.append((label, None, None, f"exit {e.exit_code}: {str(e)[:150]}"))
            continue
        seconds = int8["seconds"] if label == "llvm int8" else time.perf_counter() - start
        note = ""
        if isinstance(runner, OpenVinoSession):
            note = f"precision {runner.precision}"
        tuning = runner.describe().get("tuning") if label.endswith("tuned") else None
        if tuning:
            check = tuning.get("model_check")
            note = (f"{tuning.get('tasks_using_tuned', 0)} of {tuning.get('tasks', '?')} kernels tuned, "
                    f"{tuning.get('trials_run', '?')} trials"
                    + (f"; whole model {check['tuned_ms']:.3f} vs rules {check['rules_ms']:.3f} ms: "
                       f"{check['use']} kept" if check else ""))
        runners.append((label, runner, None if label.startswith(("ort", "openvino")) else seconds, note))
    return runners


def bench_model(name: str, args) -> list[dict]:
    model = {**BUILDERS, **REAL_SIZE_BUILDERS}[name]()
    kind, cal, ev = model_data(name, model, args)
    built = build_runners(name, model, cal, args)
    live = [(label, runner) for label, runner, _, _ in built if runner is not None]
    outputs = {label: [list(runner.run(feed).values()) for feed in ev] for label, runner in live}
    feed = ev[0]
    samples = run_interleaved([lambda r=runner: r.run(feed) for _, runner in live], iterations=args.rounds,
                              warmup=1, settle=args.settle, block=args.block, wake=5)
    medians = {label: statistics.median(times) * 1e3 for (label, _), times in zip(live, samples)}
    base = medians.get("ort fp32")
    ref = outputs.get("ort fp32")
    rows = []
    for label, runner, compile_s, note in built:
        row = {"model": name, "runner": label, "note": note, "compile_s": compile_s}
        if runner is not None:
            row.update(ms=medians[label], vs_ort=medians[label] / base if base else None)
            if ref is not None:
                mine = outputs[label]
                row["sqnr_db"] = min(sqnr_db(r[0], o[0]) for r, o in zip(ref, mine))
                row["max_abs_err"] = max(float(np.max(np.abs(r[0].astype(np.float64) - o[0].astype(np.float64))))
                                         for r, o in zip(ref, mine))
                if kind is not None:
                    row["metric"], row["value"] = metric(name, kind, ref, mine)
        rows.append(row)
    return rows


def cpu_line() -> str:
    """The CPU's model, clock and the flags that pick kernels."""
    from infoptc.bench import cpu_info
    from infoptc.passes.quantize.recipe import cpu_flags

    cpu, flags = cpu_info(), cpu_flags()
    llvm_cpu = ""
    try:
        from tvm.target import codegen

        llvm_cpu = f", LLVM cpu {codegen.llvm_get_system_cpu()}"
    except ImportError:
        pass
    shown = " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + "/".join(CPU_FLAGS)
    return f"CPU: {cpu.model}, {f'{cpu.mhz:.0f} MHz' if cpu.mhz else '? MHz'}{llvm_cpu}; flags: {shown}"


def metric_cell(r: dict) -> str:
    if "value" not in r:
        return "-"
    return f"{r['value']:.1f}% top-1" if "top-1" in r["metric"] else f"{r['value']:.4f} {r['metric']}"


def print_table(rows: list[dict], args) -> None:
    from quantize import sectioned_table

    print(cpu_line())
    print(f"threads {args.threads}, batch 1, seq {args.seq}, median of {args.rounds} turns x {args.block} runs")
    sectioned_table(
        "CPU backends: latency as a ratio to ONNX Runtime fp32 (lower is better), error against ORT fp32",
        ("model", "variant", "ms (median)", "vs ORT fp32", "compile s", "SQNR dB", "metric", "max |err|", "note"),
        [{**r, "variant": r["runner"]} for r in rows],
        lambda r: ["-", "-", "-", "-", "-", "-", r["note"]] if "ms" not in r else [
            f"{r['ms']:.3f}", f"{r['vs_ort']:.2f}x" if r.get("vs_ort") else "-",
            "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
            f"{r['sqnr_db']:.1f}" if "sqnr_db" in r else "-", metric_cell(r),
            f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else "-", r["note"]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(REAL_SIZE_NAMES), metavar="MODEL",
                        help=f"default: {' '.join(REAL_SIZE_NAMES)}; also: {' '.join(MODEL_NAMES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128, help="value of symbolic sequence dims (default 128)")
    parser.add_argument("--rounds", type=int, default=6, help="turns per runner (default 6)")
    parser.add_argument("--block", type=int, default=20, help="timed runs per turn (after 5 untimed ones)")
    parser.add_argument("--settle", type=float, default=0.05,
                        help="seconds of pause before each runner's turn, so the previous runner's threads go idle")
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--tune", type=int, default=0, metavar="N", help="also llvm fp32 tuned with N trials")
    parser.add_argument("--tune-time", type=float, default=0, metavar="SECONDS",
                        help="also llvm fp32 tuned for SECONDS per model")
    parser.add_argument("--tuning-db", default="tuning_db", help="folder for the tuning databases (one per model)")
    parser.add_argument("--skip", nargs="*", default=[], choices=RUNNERS, metavar="RUNNER",
                        help=f"runners to leave out: {', '.join(RUNNERS)}")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODEL_NAMES + REAL_SIZE_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(REAL_SIZE_NAMES + MODEL_NAMES)}")
    rows = []
    for name in args.models:
        rows.extend(bench_model(name, args))
        print(f"{name} done", file=sys.stderr, flush=True)
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
