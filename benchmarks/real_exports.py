"""Transformer fusions on real exports: `infoptc -O3` beside ONNX Runtime's transformer optimizer.

    python benchmarks/real_exports.py --quick                      # counts, errors, batch-1 latency
    python benchmarks/real_exports.py bert gpt2 --exporters torchscript --opsets 17
    python benchmarks/real_exports.py --no-latency --ops standard   # counts under the standard policy

One row per model x exporter x opset (golden_models/real_exports.py builds and caches them; it
needs torch and transformers): node counts of the original, of `infoptc -O3 --ops ORT_POLICY`
and of `onnxruntime.transformers.optimizer.optimize_model` (model_type bert / gpt2 / vit, its
default opt_level); how many attention, LayerNorm, SkipLayerNorm, GELU and RMSNorm units each
has fused (`--device gpu`: infoptc with the Skip*Normalization forms ORT's CUDA provider wants); the largest absolute difference of each output from the original's (ONNX Runtime with
graph optimizations off, one thread, valid token ids and a padded attention mask); and the ORT
latency of each as a ratio to the original's (ORT_ENABLE_ALL, 2 threads, batch 1 and 8, seq
128; sessions run in interleaved turns, medians), and infoptc's latency as a ratio to ORT's
optimizer's output in the same turns. Ratios below 1 are faster. `--quick` measures
batch 1 only with a short budget. Latencies on a shared machine are noisy: read the ratios of
one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from graph_passes import _session, measure_latency  # noqa: E402  (the same ORT settings and turns)

from golden_models import real_exports  # noqa: E402

# What counts as one fused unit of each kind (ops of any domain with these names).
KINDS = {
    "attention": {"Attention", "MultiHeadAttention", "GroupQueryAttention"},
    "ln": {"LayerNormalization"},
    "skip_ln": {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"},
    "gelu": {"Gelu", "FastGelu", "BiasGelu", "QuickGelu"},
    "rms": {"RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"},
}


def fused_counts(model: onnx.ModelProto) -> dict[str, int]:
    ops = Counter(n.op_type for n in model.graph.node)
    return {k: sum(ops[o] for o in names) for k, names in KINDS.items()}


# -O3 with the Skip*Normalization forms that pay off on ONNX Runtime's CUDA provider, not its CPU one
GPU_PASSES = "default<O3>,fuse-skip-layer-norm{device=gpu},fuse-rms-norm{device=gpu}"


def as_ort_runs_it(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph ONNX Runtime's CPU provider runs: its own load-time fusions applied
    (ORT_ENABLE_EXTENDED, the last level that still writes ONNX ops out)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "ort.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def run_infoptc(path: Path, ops: str, device: str = "cpu") -> onnx.ModelProto:
    import infoptc

    if device == "gpu":
        return infoptc.optimize(str(path), passes=GPU_PASSES, ops=ops)
    return infoptc.optimize(str(path), opt_level=3, ops=ops)


def run_ort_optimizer(path: Path, name: str) -> onnx.ModelProto:
    """ORT's optimizer, told the head count and hidden size (its detection misses some exports)."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = real_exports.geometry(name)
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return optimize_model(str(path), model_type=real_exports.SPECS[name].ort_type, num_heads=heads,
                                  hidden_size=hidden).model
    finally:
        logging.disable(logging.NOTSET)


def reference_outputs(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def max_abs_error(model: onnx.ModelProto, feeds: dict, expected: list[np.ndarray]) -> float:
    got = reference_outputs(model, feeds)
    return max(float(np.max(np.abs(g.astype(np.float64) - e))) for g, e in zip(got, expected))


def measure(name: str, exporter: str, opset: int, ops: str, batches: list[int], seq: int,
            budget_s: float, device: str = "cpu", ort_units: bool = False) -> dict:
    path = real_exports.path(name, exporter, opset)
    original = onnx.load(str(path))
    row = {"model": name, "exporter": exporter, "opset": opset}
    outputs = {"original": original}
    for label, run in (("infoptc", lambda: run_infoptc(path, ops, device)),
                       ("ort", lambda: run_ort_optimizer(path, name))):
        start = time.perf_counter()
        try:
            outputs[label] = run()
            row[f"{label}_s"] = time.perf_counter() - start
        except Exception as e:  # a tool failing on a model is a row note, not the end of the run
            row[f"{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    for label, model in outputs.items():
        row[f"{label}_nodes"] = len(model.graph.node)
        if label != "original":
            row[f"{label}_fused"] = fused_counts(model)
        if ort_units:
            with contextlib.suppress(Exception):
                row[f"{label}_runs_fused"] = fused_counts(as_ort_runs_it(model))
    feeds = real_exports.example_inputs(name, batch=2, seq=16)
    expected = [e.astype(np.float64) for e in reference_outputs(original, feeds)]
    for label in ("infoptc", "ort"):
        if label in outputs:
            try:
                row[f"{label}_err"] = max_abs_error(outputs[label], feeds, expected)
            except Exception as e:
                row[f"{label}_error"] = f"does not run: {str(e).splitlines()[0][:160]}"
    for batch in batches:
        feeds = real_exports.example_inputs(name, batch=batch, seq=seq)
        sessions = {}
        for label, model in outputs.items():
            if row.get(f"{label}_error"):
                continue
            with contextlib.suppress(Exception):
                sessions[label] = _session(model)
        ms = measure_latency(sessions, feeds, runs=1000, budget_s=budget_s)
        row[f"ms_b{batch}"] = ms
    return row


def _ratio(row, label, batch, base="original") -> str:
    ms = row.get(f"ms_b{batch}", {})
    return f"{ms[label] / ms[base]:.2f}" if label in ms and base in ms else "-"


def _fused(row, label) -> str:
    f = row.get(f"{label}_fused")
    return "-" if f is None else "/".join(str(f[k]) for k in KINDS)


def table(rows: list[dict], batches: list[int], ort_units: bool = False) -> str:
    head = ["model", "exporter", "opset", "nodes orig", "nodes infoptc", "nodes ORT",
            "fused infoptc attn/LN/SkipLN/GELU/RMS", "fused ORT", "max err infoptc", "max err ORT"]
    if ort_units:
        head += ["as ORT runs: orig", "as ORT runs: infoptc", "as ORT runs: ORT"]
    for b in batches:
        head += [f"latency b{b} infoptc", f"latency b{b} ORT", f"b{b} infoptc / ORT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["exporter"], str(r["opset"]), str(r.get("original_nodes", "-")),
                 str(r.get("infoptc_nodes", "-")), str(r.get("ort_nodes", "-")), _fused(r, "infoptc"),
                 _fused(r, "ort"), _err(r, "infoptc"), _err(r, "ort")]
        if ort_units:
            cells += [_fused(r, f"{label}_runs") for label in ("original", "infoptc", "ort")]
        for b in batches:
            cells += [_ratio(r, "infoptc", b), _ratio(r, "ort", b), _ratio(r, "infoptc", b, "ort")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _err(row, label) -> str:
    if f"{label}_err" in row:
        return f"{row[f'{label}_err']:.1e}"
    return "fails" if row.get(f"{label}_error") else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(real_exports.NAMES))
    ap.add_argument("--exporters", default=",".join(real_exports.EXPORTERS))
    ap.add_argument("--opsets", default=f"17,{real_exports.NEWEST_OPSET}")
    ap.add_argument("--ops", default="ort", choices=["standard", "ort"], help="infoptc's op policy (default ort)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                    help="infoptc's Skip*Normalization choice (fuse-skip-layer-norm / fuse-rms-norm device=): "
                         "cpu (default, -O3) keeps Add + normalization, gpu fuses them as ORT's optimizer does")
    ap.add_argument("--ort-units", action="store_true",
                    help="also count the units in the graph ONNX Runtime's CPU provider runs after its own "
                         "load-time fusions, for the original and both outputs")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="batch 1 only, a short latency budget")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    batches = [] if args.no_latency else [1] if args.quick else [1, 8]
    budget = 2.0 if args.quick else 8.0
    rows = []
    variants = real_exports.variants(args.names, args.exporters.split(","), [int(o) for o in args.opsets.split(",")])
    for name, exporter, opset in variants:
        try:
            rows.append(measure(name, exporter, opset, args.ops, batches, args.seq, budget, args.device,
                                args.ort_units))
        except Exception as e:  # the exporter could not write this one
            print(f"{name} {exporter} opset {opset}: skipped: {type(e).__name__}: {str(e).splitlines()[0][:160]}",
                  file=sys.stderr)
            continue
        print(table(rows[-1:], batches, args.ort_units).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows, batches, args.ort_units))
    notes = [f"{r['model']} {r['exporter']} {r['opset']}: {r[k]}" for r in rows for k in ("infoptc_error", "ort_error")
             if r.get(k)]
    for n in notes:
        print(f"note: {n}")
    vs = real_exports.versions()
    import onnxruntime

    print(f"\ntorch {vs['torch_version']}, transformers {vs['transformers_version']}, onnxruntime "
          f"{onnxruntime.__version__}; infoptc --ops {args.ops}, device {args.device}; latency: ORT CPU, 2 threads, "
          f"seq {args.seq}, ratio to the original and infoptc's to ORT's optimizer's (median of interleaved turns)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


# ----------------------------------------------------------------------------- EmbedLayerNormalization
# --device gpu: also the embeddings as EmbedLayerNormalization (fuse-embed-layer-norm keeps the
# lookups for ONNX Runtime's CPU provider, see docs/passes/fuse-embed-layer-norm.md), before
# fuse-skip-layer-norm, which would otherwise take an embedding sum of two same-shape lookups
GPU_PASSES = GPU_PASSES.replace("fuse-skip-layer-norm{device=gpu}",
                                "fuse-embed-layer-norm{device=gpu},fuse-skip-layer-norm{device=gpu}")


# ----------------------------------------------------------------------------- --opset N
# infoptc with the model's ai.onnx opset raised first (compile(opset=N), `infoptc compile
# --opset N`): with --ops standard, 23 lets the fusions emit the standard Attention and
# RMSNormalization. The original (the reference and the latency baseline) and ORT's optimizer
# keep the exported opset.
#     python benchmarks/real_exports.py bert gpt2 llama t5_encoder --exporters torchscript --opsets 17 \
#         --ops standard --opset 23
_main_without_opset = main


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--opset", type=int, default=None,
                     help="raise each model's opset to this before infoptc optimizes it (default: keep it)")
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.opset is None:
        return _main_without_opset(rest)
    global run_infoptc
    keep = run_infoptc

    def run_infoptc(path: Path, ops: str, device: str = "cpu") -> onnx.ModelProto:
        import infoptc

        if device == "gpu":
            return infoptc.optimize(str(path), passes=GPU_PASSES, ops=ops, opset=known.opset)
        return infoptc.optimize(str(path), opt_level=3, ops=ops, opset=known.opset)

    try:
        code = _main_without_opset(rest)
    finally:
        run_infoptc = keep
    print(f"infoptc's input: each model's opset raised to {known.opset} first (--opset {known.opset})")
    return code


if __name__ == "__main__":
    sys.exit(main())
