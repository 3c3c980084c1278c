"""fp16 and int4 against the converters users would otherwise reach for, side by side in one run.

    .venv/bin/python benchmarks/low_precision.py [--fp16 MODELS...] [--int4 MODELS...] [--rounds 10]
                                                 [--llvm MODELS...] [--threads 2] [--gptq] [--json out.json]

fp16 (default models resnet18, bert_small), each variant run by ONNX Runtime (CPU):
- ``ort fp32``: the model as given.
- ``infoptc fp16``: ``infoptc -O3 --quantize fp16 --keep-io-types``.
- ``occ fp16``: onnxconverter-common's ``float16.convert_float_to_float16(model, keep_io_types=True)``.
Columns: Casts in the graph, max abs error and max error relative to the output's largest
magnitude (worst output, over the evaluation feeds), SQNR, latency and size over fp32's.

int4 (default model gpt2_small), ORT CPU:
- ``ort fp32``; ``infoptc int4``: ``-O3 --quantize int4`` (rtn, asymmetric, block 128, accuracy level 4);
  ``infoptc int4 gptq`` with ``--gptq`` (16 calibration sequences);
- ``ort int4``: ``MatMulNBitsQuantizer(model, block_size=128, is_symmetric=False)`` on the fp32 model
  (accuracy level unset: fp32 products); ``ort int4 acc4``: the same with ``accuracy_level=4``
  (int8 products, infoptc's default).
Columns: cosine of the logits against fp32's (mean over evaluation sequences), next-token top-1
agreement, latency over fp32's at the evaluation length (128 tokens) and at one token per call
(decoding), size over fp32's.

``--llvm MODELS``: fp32, fp16 and bf16 (the latter on CPUs with bf16 arithmetic) compiled for
the llvm target (TVM, untuned), errors against the llvm fp32 build.

Latencies are medians over rounds in which every variant takes a turn (``compiler/bench.py``
``run_interleaved``, as benchmarks/quantize.py). Data as benchmarks/quantize.py (``feeds_for``):
calibration and evaluation disjoint. The functions here (``occ_fp16``, ``ort_int4``,
``count_casts``, ``error_columns``, ``cosine``) are for other benchmarks to import.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import onnx

import infoptc
from infoptc.bench import run_interleaved
from infoptc.verify import sqnr_db

from benchmarks.quantize import MODELS, feeds_for, session


def occ_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxconverter-common's fp16 conversion, inputs and outputs kept fp32."""
    from onnxconverter_common import float16

    return float16.convert_float_to_float16(model, keep_io_types=True)


def ort_int4(model: onnx.ModelProto, block_size: int = 128, symmetric: bool = False,
             accuracy_level: int | None = None) -> onnx.ModelProto:
    """ONNX Runtime's own MatMulNBits quantizer (round to nearest) on a copy of ``model``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the quantizer edits the model it is given
    quantizer = MatMulNBitsQuantizer(copy, block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level)
    quantizer.process()
    return quantizer.model.model


def count_casts(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "Cast" for n in model.graph.node)


def error_columns(ref: list[list[np.ndarray]], out: list[list[np.ndarray]]) -> dict:
    """Worst output's max abs error, max error over the output's largest magnitude, lowest SQNR."""
    cols = {"max_abs": 0.0, "max_rel": 0.0, "sqnr_db": float("inf")}
    for k in range(len(ref[0])):
        r = np.concatenate([x[k].ravel() for x in ref]).astype(np.float64)
        o = np.concatenate([x[k].ravel() for x in out]).astype(np.float64)
        err = float(np.max(np.abs(r - o)))
        cols["max_abs"] = max(cols["max_abs"], err)
        cols["max_rel"] = max(cols["max_rel"], err / max(float(np.max(np.abs(r))), 1e-30))
        cols["sqnr_db"] = min(cols["sqnr_db"], sqnr_db(r, o))
    return cols


def cosine(ref: list[list[np.ndarray]], out: list[list[np.ndarray]]) -> float:
    """Mean cosine similarity of the first output, per evaluation feed."""
    vals = [float(np.sum(r[0].astype(np.float64) * o[0]) / (np.linalg.norm(r[0]) * np.linalg.norm(o[0]) + 1e-30))
            for r, o in zip(ref, out)]
    return float(np.mean(vals))


def next_token_agreement(ref, out) -> float:
    return float(np.mean([np.mean(np.argmax(r[0], -1) == np.argmax(o[0], -1)) for r, o in zip(ref, out)]))


def measure(variants: dict[str, onnx.ModelProto], feeds, work: Path, args) -> dict[str, dict]:
    """Save each variant, run every one on ``feeds`` and time them in turns on the first feed."""
    paths, sessions, outputs = {}, {}, {}
    for label, model in variants.items():
        paths[label] = work / (label.replace(" ", "_") + ".onnx")
        infoptc.ir.save_model(model, paths[label])
        try:
            sessions[label] = session(paths[label], args.threads)
        except Exception as e:  # noqa: BLE001 - a converter's output ORT cannot load is a result too
            print(f"  {label}: ONNX Runtime cannot load it: {str(e).splitlines()[0][:160]}", file=sys.stderr)
            continue
        outputs[label] = [sessions[label].run(None, f) for f in feeds]
    labels = list(sessions)
    runners = [lambda s=sessions[k]: s.run(None, feeds[0]) for k in labels]
    times = run_interleaved(runners, iterations=args.rounds, warmup=2, settle=0.05, block=5, wake=2)
    medians = {k: statistics.median(t) for k, t in zip(labels, times)}
    base = paths["ort fp32"].stat().st_size + sum(p.stat().st_size for p in work.glob("ort_fp32.onnx.data"))
    return {k: {"ms": medians[k] * 1e3, "time_vs_fp32": medians[k] / medians["ort fp32"],
                "size_vs_fp32": _size(paths[k]) / base, "outputs": outputs[k], "model": variants[k]} for k in labels}


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def bench_fp16(name: str, args, work: Path) -> list[dict]:
    import golden_models

    model = golden_models.module(name).build()
    kind = MODELS[name]
    feeds = feeds_for(model, kind, args.samples, "evaluation")
    t0 = time.perf_counter()
    ours = infoptc.compile(model, opt_level=3, quantize="fp16", quantize_options={"keep-io-types": True}).model
    build = {"infoptc fp16": time.perf_counter() - t0}
    t0 = time.perf_counter()
    theirs = occ_fp16(model)
    build["occ fp16"] = time.perf_counter() - t0
    res = measure({"ort fp32": model, "infoptc fp16": ours, "occ fp16": theirs}, feeds, work, args)
    rows = []
    for label, r in res.items():
        rows.append({"model": name, "variant": label, "casts": count_casts(r["model"]), "ms": r["ms"],
                     "time_vs_fp32": r["time_vs_fp32"], "size_vs_fp32": r["size_vs_fp32"],
                     **error_columns(res["ort fp32"]["outputs"], r["outputs"]), "build_s": build.get(label)})
    return rows


def bench_int4(name: str, args, work: Path) -> list[dict]:
    import golden_models

    model = golden_models.module(name).build()
    kind = MODELS[name]
    feeds = feeds_for(model, kind, args.samples, "evaluation")
    variants, build = {"ort fp32": model}, {}
    t0 = time.perf_counter()
    variants["infoptc int4"] = infoptc.compile(model, opt_level=3, quantize="int4").model
    build["infoptc int4"] = time.perf_counter() - t0
    if args.gptq:
        calib = feeds_for(model, kind, 16, "calibration")
        t0 = time.perf_counter()
        variants["infoptc int4 gptq"] = infoptc.compile(model, opt_level=3, quantize="int4", calibration=calib,
                                                        quantize_options={"method": "gptq",
                                                                          "block-size": args.block_size}).model
        build["infoptc int4 gptq"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    variants["ort int4"] = ort_int4(model)
    build["ort int4"] = time.perf_counter() - t0
    variants["ort int4 acc4"] = ort_int4(model, accuracy_level=4)  # infoptc's default accuracy level
    res = measure(variants, feeds, work, args)
    ref = res["ort fp32"]["outputs"]
    # one token per call (decoding), the case weight-only int4 is made for
    one = {k: v[:, :1] for k, v in feeds[0].items()}
    sessions = {k: session(work / (k.replace(" ", "_") + ".onnx"), args.threads) for k in res}
    times = run_interleaved([lambda s=sessions[k]: s.run(None, one) for k in res], iterations=args.rounds, warmup=2,
                            settle=0.05, block=5, wake=2)
    one_tok = dict(zip(res, (statistics.median(t) for t in times)))
    return [{"model": name, "variant": label, "ms": r["ms"], "time_vs_fp32": r["time_vs_fp32"],
             "time_1tok_vs_fp32": one_tok[label] / one_tok["ort fp32"],
             "size_vs_fp32": r["size_vs_fp32"], "cosine": cosine(ref, r["outputs"]),
             "next_token_top1": next_token_agreement(ref, r["outputs"]) if kind == "decoder" else None,
             "build_s": build.get(label)} for label, r in res.items()]


def bench_llvm(name: str, args) -> list[dict]:
    """fp32, fp16 and bf16 (keep-io-types) through the llvm target (TVM, untuned), side by side."""
    import golden_models

    from infoptc.passes.quantize.convert_float import host_has_bf16

    model = golden_models.module(name).build()
    feeds = feeds_for(model, MODELS[name], args.samples, "evaluation")
    arts, build = {}, {}
    for mode in ("fp32", "fp16", "bf16"):
        if mode == "bf16" and not host_has_bf16():
            print(f"  {name}: bf16 skipped, this CPU has no bf16 arithmetic", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        arts[mode] = infoptc.compile(model, opt_level=3, target="llvm", threads=args.threads,
                                     quantize=None if mode == "fp32" else mode,
                                     quantize_options=None if mode == "fp32" else {"keep-io-types": True})
        build[mode] = time.perf_counter() - t0
    outputs = {k: [list(a.run(f).values()) for f in feeds] for k, a in arts.items()}
    labels = list(arts)
    times = run_interleaved([lambda a=arts[k]: a.run(feeds[0]) for k in labels], iterations=args.rounds, warmup=2,
                            settle=0.05, block=5, wake=2)
    med = {k: statistics.median(t) for k, t in zip(labels, times)}
    return [{"model": name, "variant": f"llvm {k}", "ms": med[k] * 1e3, "time_vs_fp32": med[k] / med["fp32"],
             **error_columns(outputs["fp32"], outputs[k]), "build_s": build[k]} for k in labels]


def print_rows(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    print(" | ".join(["model", "variant"] + columns))
    for r in rows:
        cells = [r["model"], r["variant"]]
        for c in columns:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        print(" | ".join(cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp16", nargs="*", default=["resnet18", "bert_small"], metavar="MODEL")
    parser.add_argument("--int4", nargs="*", default=["gpt2_small"], metavar="MODEL")
    parser.add_argument("--llvm", nargs="*", default=[], metavar="MODEL",
                        help="also fp32/fp16/bf16 through the llvm target (TVM), e.g. resnet18")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4, help="evaluation feeds per model")
    parser.add_argument("--gptq", action="store_true", help="also int4 with GPTQ (16 calibration sequences)")
    parser.add_argument("--block-size", type=int, default=128, help="the GPTQ variant's block size (default 128)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    out: dict[str, list] = {"fp16": [], "int4": [], "llvm": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.fp16:
            work = Path(tmp) / f"fp16_{name}"
            work.mkdir()
            out["fp16"] += bench_fp16(name, args, work)
        for name in args.int4:
            work = Path(tmp) / f"int4_{name}"
            work.mkdir()
            out["int4"] += bench_int4(name, args, work)
    for name in args.llvm:
        out["llvm"] += bench_llvm(name, args)
    if out["llvm"]:
        print_rows("llvm target (TVM, untuned; errors against llvm fp32)", out["llvm"],
                   ["max_abs", "max_rel", "sqnr_db", "time_vs_fp32", "ms", "build_s"])
    if out["fp16"]:
        print_rows("fp16 (ORT CPU; errors against ORT fp32, worst output)", out["fp16"],
                   ["casts", "max_abs", "max_rel", "sqnr_db", "time_vs_fp32", "size_vs_fp32", "ms", "build_s"])
    if out["int4"]:
        print_rows("int4 weight-only (ORT CPU; against ORT fp32)", out["int4"],
                   ["cosine", "next_token_top1", "time_vs_fp32", "time_1tok_vs_fp32", "size_vs_fp32", "ms", "build_s"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
