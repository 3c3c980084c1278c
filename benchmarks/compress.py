"""Structured compression: size, FLOPs, ONNX Runtime latency and task metric, in one run.

    .venv/bin/python benchmarks/compress.py [MODELS...] [--ratios 0.1,0.3,0.5] [--energies 0.99,0.9]
        [--rounds 10] [--threads 2] [--batch 1] [--eval N] [--calibration N] [--plot pareto.png] [--json out.json]

Per model, every variant is compiled by infoptc at -O2 (the baseline too, so that only the
compression differs) and run by ONNX Runtime on the CPU (``--threads`` threads, batch 1):

- ``prune r``: ``--prune channels=r`` (l1, per layer, kept counts rounded to 8; to 1 on the
  digits CNN, whose only convolution has 8 channels), and ``prune r +rec`` with ``--reconstruct``
  (least-squares refit of the next layers on the calibration data). Both have the same graph
  shape, so only the first is timed.
- ``low-rank e``: ``--low-rank energy=e`` (Gemm/MatMul only; layers where the factors would not
  save work stay whole), and on the trained models ``low-rank e +rec`` with ``--reconstruct``.
- ``prune 0.3 +rec +int8``: pruning composed with ``--quantize int8`` (CNNs).

``prune`` on minilm removes whole attention heads and FFN channels (never the residual width).
Latency: batch 1 (``--batch B`` stacks B evaluation samples for the trained models); medians over ``--rounds`` rounds in which every variant takes a turn (0.05 s pause, 3
untimed runs, 10 timed: ``infoptc.bench.run_interleaved``), shown as a ratio to the baseline's,
beside the FLOPs ratio (``infoptc.analysis.estimate_flops``): the goal is a latency ratio within
15% of the FLOPs ratio. The metric is the model's task metric (golden_models/trained.py) on
held-out data for the trained models (digits_cnn: accuracy change in points vs the uncompressed
model, with the labels; minilm: embedding cosine vs the uncompressed model), and top-1 agreement
with the uncompressed model on photo crops for the real-size golden models (their weights are
not trained: there the metric only shows how far the outputs move; they are here for speed).
"SQNR dB" is the first output's signal-to-error ratio against the uncompressed model's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np
import onnx

import infoptc
from infoptc.analysis import estimate_flops, parameter_count
from infoptc.bench import run_interleaved
from quantize import feeds_for, metric, session, sqnr  # the quantization benchmark's data and metrics

MODELS = {"digits_cnn": "cnn", "minilm": "encoder", "resnet18": "cnn", "mobilenetv2": "cnn"}
TRAINED = ("digits_cnn", "minilm")
SETTLE_S, WAKE, BLOCK = 0.05, 3, 10


def load(name: str, n_cal: int, n_eval: int):
    """(model path, calibration feeds, evaluation feeds, FLOPs dims)."""
    if name in TRAINED:
        from golden_models import trained

        return trained.path(name), trained.calibration_feeds(name, n_cal), trained.evaluation_feeds(name, n_eval), \
            {"batch": 1, "seq": trained.MINILM_SEQ}
    import golden_models

    model = golden_models.module(name).build()
    path = Path(tempfile.mkdtemp()) / f"{name}.onnx"
    onnx.save(model, str(path))
    n_cal = min(n_cal, 16)  # int8 calibration only (no reconstruction here): 16 photo crops
    return path, feeds_for(model, "cnn", n_cal, "calibration"), feeds_for(model, "cnn", n_eval, "evaluation"), {}


def variants(name: str, ratios: list[float], energies: list[float]) -> dict[str, dict]:
    """Variant label -> infoptc.compile keywords. Reconstruction only on the trained models: the
    golden CNNs' weights are untrained, and there it would only cost minutes (a refit of
    resnet18's 3x3 convolutions solves 4608-wide least squares) to match meaningless outputs."""
    round_to = 1 if name == "digits_cnn" else 8
    rec = "+rec" if name in TRAINED else ""
    out: dict[str, dict] = {"baseline": {}}
    for r in ratios:
        prune = f"prune-channels{{ratio={r},round-to={round_to}}}"
        out[f"prune {r:g}"] = {"compress": [prune]}
        if rec:
            out[f"prune {r:g} +rec"] = {"compress": [prune.replace("}", ",reconstruct=true}")], "needs_data": True,
                                        "timed_as": f"prune {r:g}"}
    for e in energies:
        out[f"low-rank {e:g}"] = {"compress": [f"low-rank{{energy={e}}}"]}
        if rec:
            out[f"low-rank {e:g} +rec"] = {"compress": [f"low-rank{{energy={e},reconstruct=true}}"],
                                           "needs_data": True, "timed_as": f"low-rank {e:g}"}
    if MODELS[name] == "cnn":
        prune = f"prune-channels{{ratio=0.3,round-to={round_to}{',reconstruct=true' if rec else ''}}}"
        out[f"prune 0.3 {rec} +int8".replace("  ", " ")] = {
            "compress": [prune], "needs_data": True, "quantize": "int8", "quantize_options": {"speed-check": False}}
    return out


def bench_model(name: str, args, work: Path) -> list[dict]:
    path, cal, ev, dims = load(name, args.calibration, args.eval)
    rows, paths = [], {}
    for label, spec in variants(name, args.ratios, args.energies).items():
        kwargs = {k: v for k, v in spec.items() if k not in ("needs_data", "timed_as")}
        if spec.get("needs_data") or "quantize" in spec:
            kwargs["calibration"] = cal
        if "quantize" in spec:
            kwargs["quantize_options"] = {**kwargs["quantize_options"], "calibration": cal}
        art = infoptc.compile(str(path), opt_level=2, **kwargs)
        out = work / f"{name}.{label.replace(' ', '_').replace('+', '')}.onnx"
        art.save(out)
        paths[label] = out
        model = onnx.load(str(out))
        rows.append({"model": name, "variant": label, "params": parameter_count(model),
                     "flops": estimate_flops(model, dims), "bytes": out.stat().st_size, "timed_as": spec.get("timed_as")})
    sessions = {r["variant"]: session(paths[r["variant"]], args.threads) for r in rows}
    outputs = {label: [s.run(None, f) for f in ev] for label, s in sessions.items()}
    timed = [r["variant"] for r in rows if r["timed_as"] is None]
    feed = ev[0]
    if args.batch > 1 and name in TRAINED:  # their batch dimension is symbolic
        feed = {k: np.concatenate([f[k] for f in ev[:args.batch]]) for k in ev[0]}
    runners = [lambda s=sessions[label]: s.run(None, feed) for label in timed]
    for run in runners:
        run()
    samples = run_interleaved(runners, iterations=args.rounds, settle=SETTLE_S, wake=WAKE, block=BLOCK)
    ms = {label: 1e3 * statistics.median(s) for label, s in zip(timed, samples)}
    base = rows[0]
    for r in rows:
        r["ms"] = ms[r["timed_as"] or r["variant"]]
        r["latency_ratio"] = r["ms"] / ms["baseline"]
        r["flops_ratio"] = r["flops"] / base["flops"]
        r["params_ratio"] = r["params"] / base["params"]
        r["metric_name"], r["metric"] = metric(name, MODELS[name], outputs["baseline"], outputs[r["variant"]])
        r["sqnr_db"] = sqnr(outputs["baseline"], outputs[r["variant"]])
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'model':<12} {'variant':<22} {'params':>8} {'FLOPs':>8} {'latency':>8} {'ms':>8} {'SQNR dB':>8}  metric"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<12} {r['variant']:<22} {r['params_ratio']:>8.3f} {r['flops_ratio']:>8.3f} "
              f"{r['latency_ratio']:>8.3f} {r['ms']:>8.3f} {min(r['sqnr_db'], 999):>8.1f}  {r['metric']:.4f} ({r['metric_name']})"
              + ("  [timed as " + r["timed_as"] + "]" if r["timed_as"] else ""))


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, each with its measured figures and met / not met."""
    lines = []
    by = {(r["model"], r["variant"]): r for r in rows}
    for r in rows:
        if r["variant"].startswith("prune") and "int8" not in r["variant"] and r["timed_as"] is None:
            gap = r["latency_ratio"] / r["flops_ratio"] - 1
            lines.append(f"{r['model']} {r['variant']}: latency {r['latency_ratio']:.3f} vs FLOPs {r['flops_ratio']:.3f} "
                         f"({gap:+.0%}): {'met' if abs(gap) <= 0.15 else 'NOT met'} (within 15%)")
    for (model, variant), r in by.items():
        if variant.endswith("+rec") and "int8" not in variant:
            plain, base = by[(model, variant[:-5])], by[(model, "baseline")]
            lost = base["metric"] - plain["metric"]
            regained = r["metric"] - plain["metric"]
            ok = lost <= 0 or regained >= lost / 2
            lines.append(f"{model} {variant}: pruning alone lost {lost:.4f}, reconstruction regained {regained:.4f}: "
                         f"{'met' if ok else 'NOT met'} (at least half)")
    r = by.get(("digits_cnn", "prune 0.3 +rec"))
    if r:
        ok = r["metric"] >= -1.0 and r["latency_ratio"] <= 0.8
        lines.append(f"digits_cnn at 30% with reconstruction: accuracy {r['metric']:+.2f} points, latency "
                     f"{r['latency_ratio']:.3f}x: {'met' if ok else 'NOT met'} (drop <= 1 point, latency <= 0.8x)")
    for (model, variant), r in by.items():
        if "int8" in variant:
            lines.append(f"{model} {variant}: composes (metric {r['metric']:.4f}, latency {r['latency_ratio']:.3f}x)")
    return lines


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        trained = model in TRAINED  # the untrained golden CNNs: how far the outputs move (SQNR)
        for r in (r for r in rows if r["model"] == model):
            marker = "s" if "low-rank" in r["variant"] else "^" if "+rec" in r["variant"] else "o"
            y = r["metric"] if trained else min(r["sqnr_db"], 60.0)
            ax.scatter(r["latency_ratio"], y, marker=marker)
            ax.annotate(r["variant"], (r["latency_ratio"], y), fontsize=7)
        ax.set_title(model)
        ax.set_xlabel("latency / baseline (ORT CPU)")
        ax.set_ylabel(next(r["metric_name"] for r in rows if r["model"] == model) if trained
                      else "output SQNR dB vs uncompressed (capped at 60)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", metavar="MODEL", help=f"default: all of {', '.join(MODELS)}")
    p.add_argument("--ratios", default="0.1,0.3,0.5", type=lambda s: [float(x) for x in s.split(",") if x])
    p.add_argument("--energies", default="0.99,0.9", type=lambda s: [float(x) for x in s.split(",") if x])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="batch size of the timed runs (trained models only)")
    p.add_argument("--calibration", type=int, default=64, help="calibration samples (minilm has 30)")
    p.add_argument("--eval", type=int, default=None, help="evaluation samples (default: all; 32 photo crops for CNNs)")
    p.add_argument("--plot", default=None, help="write a Pareto plot (latency ratio vs metric) here")
    p.add_argument("--json", default=None)
    p.add_argument("--replot", default=None, metavar="JSON", help="only draw --plot from an earlier --json")
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), args.plot or "pareto.png")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models or list(MODELS):
            if args.eval is None and name not in TRAINED:
                args_eval, args.eval = None, 32
                rows += bench_model(name, args, Path(tmp))
                args.eval = args_eval
            else:
                rows += bench_model(name, args, Path(tmp))
            print_table([r for r in rows if r["model"] == name])
            print(flush=True)
    print_table(rows)
    print("\ngoals:")
    for line in goals(rows):
        print("  " + line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
