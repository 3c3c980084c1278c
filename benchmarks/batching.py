"""Batch sweeps: latency and throughput per batch size, and the Triton batching they choose.

    .venv/bin/python benchmarks/batching.py [MODELS...] [--batches 1,2,4,8,16] [--iterations 20]
                                            [--threads 2] [--seq 128] [--budget-ms 100] [--json]

Per model (default: the real-size resnet18 and bert_small golden models): the -O2 optimized model,
its batch made symbolic by make-batch-dynamic where it is fixed (resnet18), run by ONNX Runtime
(CPU, ``--threads``) at every batch size, sizes interleaved round by round (``infoptc.bench.
batch_sweep``: one run of each size per round, so load drifts hit all sizes alike). Columns:
batch, p50 and p99 latency (ms), throughput (samples/s at the p50), speedup per sample over batch
1 (batch-1 p50 / (p50 / batch)). Below each table, the dynamic batching `infoptc export triton
--latency-budget-ms` would write from this sweep (``choose_batching``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import infoptc  # noqa: E402
from infoptc.bench import batch_sweep, choose_batching, parse_batches  # noqa: E402
from infoptc.passes.shape.make_batch_dynamic import make_batch_dynamic  # noqa: E402
from infoptc.targets import get_target  # noqa: E402

DEFAULT = ["resnet18", "bert_small"]


def sweep(name: str, batches: list[int], iterations: int, threads: int, seq: int) -> list:
    from golden_models import module

    model = infoptc.optimize(module(name).build())
    dynamic, why, _ = make_batch_dynamic(model)
    if dynamic is not None:
        model = dynamic
    elif why != "the batch dimension is symbolic already":
        raise SystemExit(f"{name}: {why}")
    artifact = get_target("onnx")(threads=threads).lower(model)
    return batch_sweep(artifact, batches, iterations=iterations, warmup=2, dims={"seq": seq})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT, metavar="MODEL")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--iterations", type=int, default=20, help="timed rounds (one run of every size each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128, help="value of symbolic sequence dims (default 128)")
    parser.add_argument("--budget-ms", type=float, default=100.0, help="the latency budget for the batching choice")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    batches = parse_batches(args.batches)
    results = {}
    for name in args.models:
        rows = sweep(name, batches, args.iterations, args.threads, args.seq)
        results[name] = {"rows": [r.as_dict() for r in rows], "batching": choose_batching(rows, args.budget_ms)}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"ONNX Runtime CPU, {args.threads} threads, {args.iterations} rounds, sizes interleaved; seq {args.seq}")
    for name, result in results.items():
        print(f"\n{name}\n| batch | p50 ms | p99 ms | throughput /s | speedup per sample vs batch 1 |")
        print("|---:|---:|---:|---:|---:|")
        for r in result["rows"]:
            print(f"| {r['batch']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['throughput_per_s']:.1f} | "
                  f"{r['speedup_per_sample']:.2f}x |")
        b = result["batching"]
        print(f"budget {args.budget_ms:g} ms: preferred {b['preferred'] or 'none'}, queue delay "
              f"{b['max_queue_delay_us']} us ({b['reason']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
