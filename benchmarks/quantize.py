"""int8 quantization against ONNX Runtime's own quantizer, side by side in one run.

    .venv/bin/python benchmarks/quantize.py [MODELS...] [--rounds 30] [--threads 2] [--json out.json]

Per model, each variant is an ONNX model run by ONNX Runtime (CPU, ``--threads`` threads, batch 1,
default optimization level); latencies are medians over rounds in which every variant takes a
turn (a 0.05 s pause, 3 untimed runs, 10 timed ones: ORT's idle threads spin after a run, and run
by run they steal the next session's cores), "time" is that median over ORT fp32's:

- ``ort fp32``: the model as given.
- ``ort s8`` / ``ort u8`` (CNNs): ``quant_pre_process`` then ``quantize_static``, QDQ, per-channel
  int8 weights, activations int8 (its default) or uint8 (the form its x86 kernels fuse).
- ``ort dynamic`` (transformers): ``quantize_dynamic`` (int8 weights, uint8 activations at run time).
- ``infoptc int8``: ``infoptc -O3 --quantize int8`` with the same calibration data.
- ``infoptc dynamic`` (transformers): ``infoptc -O3 --quantize int8-dynamic``.

Calibration and evaluation data are disjoint: CNNs take 224x224 crops of scikit-learn's sample
photos (calibration from one photo, evaluation from the other), transformers seeded token ids.
The metric is against the fp32 model on the evaluation data: top-1 agreement for classifiers,
mean cosine similarity of the output for encoders, next-token top-1 agreement for decoders.
Size is the file size over the fp32 file's.
"""

from __future__ import annotations

import argparse
import json
import os
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
import onnxruntime as ort

import infoptc
from infoptc.bench import run_interleaved

# name -> (golden model module, kind); kind picks the data, the metric and the ORT recipes
MODELS = {
    "resnet18": "cnn", "mobilenetv2": "cnn", "efficientnet_b0": "cnn", "vit_tiny": "vit",
    "bert_small": "encoder", "gpt2_small": "decoder",
    "resnet": "cnn", "mobilenet": "cnn", "bert": "encoder", "gpt": "decoder",
    # trained models (golden_models/trained.py: fetched from PyPI packages, real data, task metrics)
    "digits_cnn": "cnn", "ppocr_det": "cnn", "ppocr_rec": "cnn", "minilm": "encoder",
}
TRAINED = ("digits_cnn", "ppocr_det", "ppocr_rec", "minilm")
DEFAULT = ["resnet18", "mobilenetv2", "efficientnet_b0", "vit_tiny", "bert_small", "gpt2_small",
           "digits_cnn", "ppocr_det", "ppocr_rec", "minilm"]
SEQ = 128
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


# ----------------------------------------------------------------------------- data


def photo_crops(image: np.ndarray, n: int, seed: int, size: int = 224) -> list[np.ndarray]:
    """``n`` random crops (random scale, flip) of an HxWx3 uint8 photo, resized to size², NCHW."""
    rng = np.random.default_rng(seed)
    h, w, _ = image.shape
    out = []
    for _ in range(n):
        side = int(rng.integers(size // 2, min(h, w)))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        crop = image[y : y + side, x : x + side].astype(np.float32) / 255.0
        idx = (np.arange(size) * side / size).astype(int)  # nearest-neighbour resize
        crop = crop[idx][:, idx]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(((crop.transpose(2, 0, 1) - MEAN) / STD)[None].astype(np.float32))
    return out


def feeds_for(model: onnx.ModelProto, kind: str, n: int, split: str) -> list[dict[str, np.ndarray]]:
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if kind in ("cnn", "vit"):
        from sklearn.datasets import load_sample_images

        images = load_sample_images().images  # china.jpg, flower.jpg
        photo = images[0] if split == "calibration" else images[1]
        dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
        return [{inputs[0].name: x} for x in photo_crops(photo, n, seed=0 if split == "calibration" else 1, size=dims[-1])]
    rng = np.random.default_rng(0 if split == "calibration" else 1)
    feeds = []
    for _ in range(n):
        feed = {}
        for vi in inputs:
            if "mask" in vi.name:
                feed[vi.name] = np.ones((1, SEQ), np.int64)
            else:
                feed[vi.name] = rng.integers(1, 1000, size=(1, SEQ), dtype=np.int64)
        feeds.append(feed)
    return feeds


# ----------------------------------------------------------------------------- variants


class Reader:
    """ONNX Runtime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def ort_static(src: Path, dst: Path, feeds, activation: str) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre))
    except Exception:  # its symbolic shape inference does not take every model; quantize as given
        pre = src
    quantize_static(str(pre), str(dst), Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8)


def ort_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def infoptc_quant(src: Path, dst: Path, feeds, mode: str) -> None:
    art = infoptc.compile(str(src), opt_level=3, quantize=mode, calibration=feeds if mode == "int8" else None)
    art.save(dst)


def session(path: Path, threads: int):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- metrics


def metric(name: str, kind: str, ref: list[list[np.ndarray]], out: list[list[np.ndarray]]) -> tuple[str, float]:
    """The task metric of the quantized outputs against fp32's (per evaluation feed, all outputs)."""
    if name in TRAINED:
        from golden_models import trained

        return trained.TRAINED[name].metric_name, float(trained.task_metric(name, out, ref))
    ref, out = [r[0] for r in ref], [o[0] for o in out]
    if kind in ("cnn", "vit"):
        agree = [int(np.argmax(r) == np.argmax(o)) for r, o in zip(ref, out)]
        return "top-1 agreement", 100.0 * float(np.mean(agree))
    if kind == "decoder":
        agree = [float(np.mean(np.argmax(r, -1) == np.argmax(o, -1))) for r, o in zip(ref, out)]
        return "next-token top-1", 100.0 * float(np.mean(agree))
    cos = [float(np.sum(r * o) / (np.linalg.norm(r) * np.linalg.norm(o) + 1e-12)) for r, o in zip(ref, out)]
    return "cosine", float(np.mean(cos))


def sqnr(ref: list[list[np.ndarray]], out: list[list[np.ndarray]]) -> float:
    r = np.concatenate([x[0].ravel() for x in ref]).astype(np.float64)
    o = np.concatenate([x[0].ravel() for x in out]).astype(np.float64)
    return float(10 * np.log10(np.sum(r * r) / max(np.sum((r - o) ** 2), 1e-30)))


# ----------------------------------------------------------------------------- main


def bench_model(name: str, kind: str, args, work: Path) -> list[dict]:
    import golden_models

    if name in TRAINED:
        from golden_models import trained

        src = trained.path(name)
        cal = trained.calibration_feeds(name, args.calibration_samples)
        ev = trained.evaluation_feeds(name, None if name == "digits_cnn" else args.eval_samples)
    else:
        src = work / f"{name}.onnx"
        model = golden_models.module(name).build()
        onnx.save(model, src)
        cal = feeds_for(model, kind, args.calibration_samples, "calibration")
        ev = feeds_for(model, kind, args.eval_samples, "evaluation")
    variants: dict[str, Path] = {"ort fp32": src}
    makers = {}
    if kind in ("cnn", "vit"):
        makers["ort s8"] = lambda d: ort_static(src, d, cal, "s8")
        makers["ort u8"] = lambda d: ort_static(src, d, cal, "u8")
    if kind != "cnn":
        makers["ort dynamic"] = lambda d: ort_dynamic(src, d)
    makers["infoptc int8"] = lambda d: infoptc_quant(src, d, cal, "int8")
    if kind != "cnn":
        makers["infoptc dynamic"] = lambda d: infoptc_quant(src, d, cal, "int8-dynamic")
    build_s = {}
    for label, make in makers.items():
        dst = work / f"{name}.{label.replace(' ', '_')}.onnx"
        t0 = time.perf_counter()
        try:
            make(dst)
            variants[label] = dst
            build_s[label] = time.perf_counter() - t0
        except Exception as e:  # a recipe that fails on a model is a row that says so
            print(f"{name}: {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
    sessions = {label: session(path, args.threads) for label, path in variants.items()}
    outputs = {label: [s.run(None, f) for f in ev] for label, s in sessions.items()}
    feed = ev[0]
    labels = list(sessions)
    runners = [lambda s=sessions[l]: s.run(None, feed) for l in labels]
    # in turns: ORT's idle workers spin after a run and, run by run, steal the next session's cores
    times = run_interleaved(runners, iterations=args.rounds, warmup=3, settle=0.05, block=10, wake=3)
    medians = {l: statistics.median(t) for l, t in zip(labels, times)}
    rows = []
    base_size = src.stat().st_size
    for label in labels:
        metric_name, value = metric(name, kind, outputs["ort fp32"], outputs[label])
        rows.append({"model": name, "variant": label, "ms": medians[label] * 1e3,
                     "time_vs_fp32": medians[label] / medians["ort fp32"],
                     "size_vs_fp32": variants[label].stat().st_size / base_size,
                     "metric": metric_name, "value": value, "sqnr_db": sqnr(outputs["ort fp32"], outputs[label]),
                     "build_s": build_s.get(label)})
    return rows


def metric_text(r: dict) -> str:
    """A row's task metric, as the tables print it."""
    value = f"{r['value']:.1f}%" if "top-1" in r["metric"] else f"{r['value']:.4f}"
    return f"{r['metric']} {value}"


def sectioned_table(title: str, columns: tuple[str, ...], rows: list[dict], cells) -> None:
    """Print ``rows`` (``cells(row) -> list[str]``) under ``columns``, a section per model."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    last = None
    for r in rows:
        if last is not None and r["model"] != last:
            table.add_section()
        last = r["model"]
        table.add_row(r["model"], r["variant"], *cells(r))
    Console(width=200).print(table)


def print_table(rows: list[dict]) -> None:
    sectioned_table("int8 on ONNX Runtime: time and size as ratios to ORT fp32 (lower is better)",
                    ("model", "variant", "ms (median)", "time vs fp32", "size vs fp32", "metric vs fp32", "SQNR dB"),
                    rows, lambda r: [f"{r['ms']:.3f}", f"{r['time_vs_fp32']:.3f}x", f"{r['size_vs_fp32']:.3f}x",
                                     metric_text(r), f"{r['sqnr_db']:.1f}"])


def summary(rows: list[dict]) -> None:
    """Geomeans: infoptc int8 (best of its variants per model) against fp32 and ORT's fastest recipe."""
    models = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
    vs_fp32, vs_ort = [], []
    for m in models:
        mine = [r for r in rows if r["model"] == m and r["variant"].startswith("infoptc")]
        theirs = [r for r in rows if r["model"] == m and r["variant"].startswith("ort") and r["variant"] != "ort fp32"]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["ms"])
        vs_fp32.append(best["time_vs_fp32"])
        if theirs:
            vs_ort.append(best["ms"] / min(r["ms"] for r in theirs))
        print(f"{m}: infoptc best {best['variant']} {best['time_vs_fp32']:.3f}x fp32"
              + (f", {vs_ort[-1]:.3f}x ORT's fastest int8" if theirs else ""))
    geo = lambda xs: float(np.exp(np.mean(np.log(xs)))) if xs else float("nan")
    print(f"geomean: {geo(vs_fp32):.3f}x ORT fp32, {geo(vs_ort):.3f}x ORT's fastest int8 recipe")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"default: {' '.join(DEFAULT)}; also: "
                        + " ".join(m for m in MODELS if m not in DEFAULT))
    parser.add_argument("--rounds", type=int, default=8, help="rounds of turns (10 timed runs each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    rows = []
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # ORT's quant_pre_process leaves sym_shape_infer_temp.onnx in the working folder
        try:
            for name in args.models or DEFAULT:
                rows += bench_model(name, MODELS[name], args, Path(tmp))
        finally:
            os.chdir(here)
    print_table(rows)
    summary(rows)
    if args.json:
        Path(here, args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
