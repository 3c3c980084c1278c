"""Low and mixed precision side by side: fp32, each single precision infoptc writes, and
``--quantize auto`` at two budgets, on real-size and trained models, in one run.

    .venv/bin/python benchmarks/precision.py [MODELS...] [--budgets +3,+6] [--rounds 20] [--threads 2]

Per model, every variant is an ONNX model run by ONNX Runtime (CPU, ``--threads`` threads, batch 1),
timed in interleaved turns (a 0.05 s pause, 3 untimed runs, 10 timed ones) with fp32; "time" and
"size" are ratios to the fp32 model's. Variants:

- ``fp32``: the model as given.
- one row per single precision: ``int8``, ``fp16`` and, for transformers, ``int4`` (weight-only),
  written by ``infoptc -O3 --quantize MODE`` (int8 with the speed check off: the precision itself,
  even where it is slower here). bf16 is left out: ONNX Runtime's CPU provider has no bf16
  kernels for it (see benchmarks/low_precision.py --llvm for bf16 on the llvm target).
- ``auto@B``: ``--quantize auto --metric sqnr --accuracy-budget B`` (B in dB), speed check on;
  ``--budgets +3,+6`` (the default) puts B 3 and 6 dB above the int8 model's own SQNR, so that
  every model needs the search to give some layers back.

The budget is held on the calibration data (``cal SQNR``: the worst output's SQNR against fp32
there); the task metric and ``eval SQNR`` are on disjoint evaluation data (benchmarks/quantize.py's
data: crops of one sample photo for calibration, the other for evaluation; seeded token ids; the
trained models' own data). The last table checks the goals: auto meets each budget, and is not
slower than the fastest single precision (fp32 included) that meets the same budget.
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
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np
import onnx

import infoptc
import quantize as qbench  # benchmarks/quantize.py: data, sessions, task metrics
from infoptc.bench import run_interleaved
from infoptc.passes.quantize import metrics
from infoptc.pipelines import QUANTIZERS

DEFAULT = ["resnet18", "efficientnet_b0", "vit_tiny", "minilm", "digits_cnn", "gpt2_small"]
SINGLE = ("int8", "fp16", "bf16", "int4")  # in this order, where pipelines.QUANTIZERS has them


def sqnr_db(ref: list[list[np.ndarray]], out: list[list[np.ndarray]]) -> float:
    """The worst float output's SQNR over all samples (the sqnr metric quantize-auto holds to)."""
    as_dicts = lambda runs: [dict(enumerate(outputs)) for outputs in runs]
    return metrics.sqnr(as_dicts(out), as_dicts(ref))


def data(name: str, args, work: Path):
    import golden_models

    kind = qbench.MODELS[name]
    if name in qbench.TRAINED:
        from golden_models import trained

        return trained.path(name), kind, trained.calibration_feeds(name, args.calibration_samples), \
            trained.evaluation_feeds(name, args.eval_samples)
    src = work / f"{name}.onnx"
    model = golden_models.module(name).build()
    onnx.save(model, src)
    return (src, kind, qbench.feeds_for(model, kind, args.calibration_samples, "calibration"),
            qbench.feeds_for(model, kind, args.eval_samples, "evaluation"))


def bench_model(name: str, args, work: Path) -> list[dict]:
    src, kind, cal, ev = data(name, args, work)
    variants: dict[str, Path] = {"fp32": src}
    notes: dict[str, dict] = {}
    # bf16 has no ONNX Runtime CPU kernels (convert-float's report says so; it is for the llvm
    # target), and int4 is weight-only for MatMul/Gemm-heavy models
    modes = [m for m in SINGLE if m in QUANTIZERS and m != "bf16" and (m != "int4" or kind != "cnn")]
    fixed = {"int8": {"speed-check": False}, "fp16": {"keep-io-types": True}}  # fp32 feeds, as the others take
    jobs = [(m, m, fixed.get(m, {})) for m in modes] + [("budgets", "budgets", {})]
    for label, mode, options in jobs:
        if mode == "budgets":  # then one auto job per budget, relative ones above the int8 model's SQNR
            base = sqnr_db(*[[qbench.session(p, args.threads).run(None, f) for f in cal] for p in (src, variants["int8"])]) \
                if "int8" in variants else 0.0
            budgets = [base + float(b) if b.startswith("+") else float(b) for b in args.budgets]
            jobs += [(f"auto@{b:.1f}", "auto", {"metric": "sqnr", "budget": b}) for b in budgets]
            continue
        dst = work / f"{name}.{label.replace('@', '_')}.onnx"
        t0 = time.perf_counter()
        try:
            art = infoptc.compile(str(src), opt_level=3, quantize=mode, calibration=cal, quantize_options=options)
        except Exception as e:  # a precision that fails on a model is a row that says so
            print(f"{name}: {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            continue
        art.save(dst)
        variants[label] = dst
        auto = art.reports.get("quantize-auto") or {}
        chosen = auto.get("chosen")
        notes[label] = {"build_s": time.perf_counter() - t0,
                        "fp32_layers": None if not auto else (auto["layer_count"] if chosen is None else len(chosen["fp32_layers"])),
                        "layers": auto.get("layer_count"), "budget": options.get("budget")}
    sessions = {label: qbench.session(path, args.threads) for label, path in variants.items()}
    cal_out = {label: [s.run(None, f) for f in cal] for label, s in sessions.items()}
    ev_out = {label: [s.run(None, f) for f in ev] for label, s in sessions.items()}
    labels = list(sessions)
    feed = ev[0]
    runners = [lambda s=sessions[lab]: s.run(None, feed) for lab in labels]
    times = run_interleaved(runners, iterations=args.rounds, warmup=3, settle=0.05, block=10, wake=3)
    medians = {lab: statistics.median(t) for lab, t in zip(labels, times)}
    rows = []
    for label in labels:
        metric_name, value = qbench.metric(name, kind, ev_out["fp32"], ev_out[label])
        rows.append({"model": name, "variant": label, "ms": medians[label] * 1e3,
                     "time_vs_fp32": medians[label] / medians["fp32"],
                     "size_vs_fp32": variants[label].stat().st_size / src.stat().st_size,
                     "cal_sqnr_db": sqnr_db(cal_out["fp32"], cal_out[label]),
                     "eval_sqnr_db": sqnr_db(ev_out["fp32"], ev_out[label]),
                     "metric": metric_name, "value": value, **notes.get(label, {})})
    return rows


def _db(x: float) -> str:
    return "exact" if np.isinf(x) else f"{x:.1f}"


def print_tables(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    qbench.sectioned_table(
        "precision on ONNX Runtime CPU: time and size as ratios to fp32 (lower is better)",
        ("model", "variant", "ms (median)", "time vs fp32", "size vs fp32", "cal SQNR dB", "eval SQNR dB",
         "task metric vs fp32", "fp32 layers"), rows,
        lambda r: [f"{r['ms']:.3f}", f"{r['time_vs_fp32']:.3f}x", f"{r['size_vs_fp32']:.3f}x", _db(r["cal_sqnr_db"]),
                   _db(r["eval_sqnr_db"]), qbench.metric_text(r),
                   "" if r.get("fp32_layers") is None else f"{r['fp32_layers']}/{r['layers']}"])
    goals = Table(title="goals: auto meets its budget (cal SQNR) and is no slower than the fastest single "
                        "precision meeting the same budget")
    for col in ("model", "budget dB", "auto cal SQNR", "meets", "auto ms", "best single", "its ms", "auto / best"):
        goals.add_column(col, justify="left" if col in ("model", "best single") else "right")
    for auto in [r for r in rows if r["variant"].startswith("auto")]:
        b = auto["budget"]
        singles = [r for r in rows if r["model"] == auto["model"] and not r["variant"].startswith("auto")
                   and r["cal_sqnr_db"] >= b]
        best = min(singles, key=lambda r: r["ms"])  # fp32 always qualifies
        goals.add_row(auto["model"], f"{b:.1f}", _db(auto["cal_sqnr_db"]), "yes" if auto["cal_sqnr_db"] >= b else "NO",
                      f"{auto['ms']:.3f}", best["variant"], f"{best['ms']:.3f}", f"{auto['ms'] / best['ms']:.3f}x")
    Console(width=200).print(goals)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT, metavar="MODEL",
                        help=f"default: {' '.join(DEFAULT)}; any of {' '.join(qbench.MODELS)}")
    parser.add_argument("--budgets", default="+3,+6",
                        help="auto's SQNR budgets in dB, comma-separated; +D: D dB above the int8 model's SQNR "
                             "on the calibration data (default +3,+6: every model needs some layers back)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)
    args.budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    unknown = [m for m in args.models if m not in qbench.MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}")
    from infoptc.passes.quantize.recipe import cpu_flags

    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})
    print(f"CPU flags: {' '.join(flags)}; ORT threads {args.threads}; single precisions: "
          f"{', '.join(m for m in SINGLE if m in QUANTIZERS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            t0 = time.perf_counter()
            rows += bench_model(name, args, Path(tmp))
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print_tables(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
