"""ONNX Runtime CPU: EmbedLayerNormalization against the embeddings it replaces.

    python benchmarks/embed_layer_norm.py                   # embeddings alone + the real exports
    python benchmarks/embed_layer_norm.py --quick --no-real # small: proves the script runs

Part 1, the embedding layer alone (golden_models/embeddings.py, BERT's TorchScript spelling:
word + all-zero token type + position lookups, Adds, LayerNorm; vocabulary 30522, 512
positions, seq 128); part 2, whole models: the TorchScript exports of
golden_models/real_exports.py (bert, minilm, distilbert, roberta; built and cached by it, needs
torch and transformers). Each three ways: `-O3` (device=cpu, the default: the lookups stay),
`-O3` with `fuse-embed-layer-norm{device=gpu}` (one EmbedLayerNormalization), and that model
with ONNX Runtime's own SkipLayerNormFusion turned off (with the fused op ONNX Runtime proves the
residual shapes and fuses every residual Add + LayerNormalization into SkipLayerNormalization at
load, whose CPU kernel is slower: this column separates the two effects). ONNX Runtime with
ORT_ENABLE_ALL, 2 threads (benchmarks/graph_passes.py's sessions), sessions timed in
interleaved turns, medians; ratios to `-O3`, below 1 is faster. Latencies on a shared machine
are noisy: read the ratios of one run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from graph_passes import _session, measure_latency  # noqa: E402  (the same ORT settings and turns)

from golden_models import embeddings  # noqa: E402

PASS = "fuse-embed-layer-norm"


def pair(model) -> dict:
    """-O3 as it is (device=cpu: the lookups stay) and with the pass's device=gpu (fused)."""
    import infoptc
    from infoptc.pipelines import pipeline_for_level

    gpu = pipeline_for_level(3).replace(f"{PASS},", f"{PASS}{{device=gpu}},")
    return {"O3": infoptc.optimize(model, opt_level=3), "fused": infoptc.optimize(model, passes=gpu)}


def timed(models: dict, feeds: dict, budget: float) -> dict:
    from collections import Counter

    if not Counter(n.op_type for n in models["fused"].graph.node)["EmbedLayerNormalization"]:
        raise RuntimeError("fuse-embed-layer-norm did not fire")
    sessions = {"O3": _session(models["O3"]), "fused": _session(models["fused"]),
                "fused, no ORT SkipLN": _session(models["fused"], ("SkipLayerNormFusion",))}
    return measure_latency(sessions, feeds, runs=2000, budget_s=budget)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="hidden 256, batch 1, a short budget")
    ap.add_argument("--no-real", action="store_true", help="skip the real exports (they need torch)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1, help="measure each case this many times")
    args = ap.parse_args(argv)
    budget = 1.0 if args.quick else 6.0
    rows = []
    for hidden in (256,) if args.quick else (256, 768):
        model = embeddings.build("bert", vocab=30522, hidden=hidden, positions=512)
        models = pair(model)
        for batch in (1,) if args.quick else (1, 8):
            feeds = embeddings.example_inputs(model, batch=batch, seq=args.seq)
            for _ in range(args.repeat):
                ms = timed(models, feeds, budget)
                rows.append((f"embeddings H={hidden}", batch, ms))
    if not args.no_real:
        from golden_models import real_exports

        for name in ("bert", "minilm", "distilbert", "roberta"):
            models = pair(str(real_exports.path(name, "torchscript", 17)))
            for batch in (1, 8):
                feeds = real_exports.example_inputs(name, batch=batch, seq=args.seq)
                for _ in range(args.repeat):
                    rows.append((f"{name} (TorchScript, opset 17)", batch, timed(models, feeds, budget)))
    print("| what | batch | -O3 ms | fused / -O3 | fused without ORT's SkipLN fusion / -O3 |")
    print("|---|---|---|---|---|")
    for what, batch, ms in rows:
        base = ms["O3"]
        print(f"| {what} | {batch} | {base:.3f} | {ms['fused'] / base:.2f} | {ms['fused, no ORT SkipLN'] / base:.2f} |")
    import onnxruntime

    print(f"\nonnxruntime {onnxruntime.__version__}, CPU, 2 threads, seq {args.seq}; medians of interleaved turns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
