"""Activation memory of the golden models: our plan beside ONNX Runtime's measured peak.

    .venv/bin/python benchmarks/memory.py [MODELS...] [--seq 128] [--no-ort] [--json]

For every model (batch 1; symbolic sequence dims set to --seq): the peak with no reuse (every
intermediate its own buffer), the planned arena (greedy by size, best fit, 64-byte aligned,
in place where an elementwise op may overwrite an input that dies), the lower bound (most bytes
live at one step) in the model's own order, the lower bound and planned arena after
reorder-for-memory's order, and the weights. Goals (issue 22): planned <= 1.05x lower bound on
every model; reordering lowers the lower bound by >= 20% on the branchy model and never raises it.

"ORT peak" is ONNX Runtime's (ORT_ENABLE_ALL, one thread, CPU) measured growth of resident memory
during the first run, in a fresh process per model: the kernel high-water mark is reset
(/proc/self/clear_refs) after the session is made and the inputs exist, so it counts ORT's
activation arena plus its kernels' scratch (im2col, packed weights made at first run) and the
outputs, not the weights. glibc is told to serve and return large blocks by mmap, so that the
growth is not hidden by heap pages freed earlier. It is given for the model's order and for the reordered model.
"TVM storage" is what TVM's llvm build allocates for the model's activations: the module after
our relax passes (backends/tvm/build.py optimize, NHWC convs) and relax's default pipeline, whose
StaticPlanBlockMemory pools tensors of equal size; the sum of its alloc_storage sizes (weights
excluded), for the model's order and for the reordered model. --no-tvm skips it. ORT and TVM
fuse BatchNormalization and activations into convolutions: "-O2 planned" is our plan for the
model after `infoptc -O2` (batch norms folded, Pad fused), the fairer figure to set beside theirs.
Default models: resnet18 mobilenetv2 efficientnet_b0 vit_tiny bert_small, and golden_models.branchy
(Inception-like blocks at ResNet-stage size, in breadth-first order).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import infoptc
import onnx
from infoptc import memory

from golden_models import branchy, module

DEFAULT_MODELS = ("resnet18", "mobilenetv2", "efficientnet_b0", "vit_tiny", "bert_small", "branchy")

_PROBE = r"""
import sys
import onnx, onnxruntime as ort
from infoptc.verify import random_inputs

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

path, seq = sys.argv[1], int(sys.argv[2])
feeds = random_inputs(onnx.load(path, load_external_data=False), dims={"batch": 1, "seq": seq, "sequence": seq})
so = ort.SessionOptions()
so.intra_op_num_threads = 1
session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
session.run(None, feeds)
print(status("VmHWM:") - base)
"""


def build(name: str) -> onnx.ModelProto:
    return branchy.build() if name == "branchy" else module(name).build()


def bindings(model: onnx.ModelProto, seq: int) -> dict[str, tuple[int, ...]]:
    """Batch 1 and sequence ``seq`` for every input with symbolic dims."""
    out = {}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (1 if i == 0 else seq)
                                 for i, d in enumerate(dims))
    return out


def ort_peak(model: onnx.ModelProto, seq: int) -> int | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(model, path)
        # Large blocks straight from mmap and back to the system when freed: otherwise the first run
        # reuses heap pages that session creation freed and the growth misses most of the arena
        # (resnet18: 0.46 MB without, 5.3 MB with).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(seq)], capture_output=True, text=True,
                              env=env)
    if proc.returncode:
        print(f"  ORT probe failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return int(proc.stdout.split()[-1])


def tvm_storage(model: onnx.ModelProto, bind: dict) -> int | None:
    """Bytes of activation storage TVM's llvm build plans for ``model`` (see the docstring)."""
    import re

    import tvm
    from infoptc.backends.tvm import build as tvm_build
    from infoptc.targets import get_target
    from tvm import relax

    backend = get_target("llvm")(threads=1)
    target = tvm.target.Target(backend.tvm_target()[0])
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    for vi in bound.graph.input:
        for d, v in zip(vi.type.tensor_type.shape.dim, bind.get(vi.name, ())):
            d.Clear()
            d.dim_value = v
    _, mod, _ = backend._import(bound, False)
    mod, _ = tvm_build.optimize(mod, target, cpu_layout=True, schedules="rules")
    with target:
        mod = relax.get_pipeline("default")(mod)
    return sum(int(n) for n in re.findall(r"alloc_storage\(R\.shape\(\[(\d+)\]\)", mod["main"].script()))


def measure(name: str, seq: int, ort: bool, tvm: bool = False) -> dict:
    model = build(name)
    start = time.perf_counter()
    prog = memory.program_of(model, bindings(model, seq))
    given = memory.report(prog)
    order = memory.best_order(prog)
    best = memory.report(prog, order)
    seconds = time.perf_counter() - start
    optimized = infoptc.optimize(model, opt_level=2, input_shapes=bindings(model, seq))
    o2 = memory.report(memory.program_of(optimized, bindings(model, seq)))
    row = {"model": name, "nodes": len(prog.ops), "o2_planned": o2.planned, "o2_lower_bound": o2.lower_bound, "no_reuse": given.no_reuse, "planned": given.planned,
           "lower_bound": given.lower_bound, "reordered_lower_bound": best.lower_bound,
           "reordered_planned": best.planned, "weights": given.weights, "analysis_s": round(seconds, 2),
           "symbols": given.symbols}
    reordered = onnx.ModelProto()
    reordered.CopyFrom(model)
    del reordered.graph.node[:]
    reordered.graph.node.extend(model.graph.node[i] for i in order)
    if tvm:
        row["tvm_storage"] = tvm_storage(model, bindings(model, seq))
        row["tvm_storage_reordered"] = (tvm_storage(reordered, bindings(model, seq)) if order != prog.identity()
                                        else row["tvm_storage"])
    if ort:
        row["ort_peak"] = ort_peak(model, seq)
        row["ort_peak_reordered"] = ort_peak(reordered, seq) if order != prog.identity() else row["ort_peak"]
    return row


def mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| model | nodes | no reuse MB | planned MB | lower bound MB | planned / LB | reordered LB MB (change) "
            "| reordered planned MB | -O2 planned MB | weights MB | ORT peak MB | ORT peak reordered MB | TVM storage MB "
            "| TVM storage reordered MB |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        change = (r["reordered_lower_bound"] - r["lower_bound"]) / r["lower_bound"] if r["lower_bound"] else 0.0
        lines.append(f"| {r['model']} | {r['nodes']} | {mb(r['no_reuse'])} | {mb(r['planned'])} | "
                     f"{mb(r['lower_bound'])} | {r['planned'] / max(r['lower_bound'], 1):.3f} | "
                     f"{mb(r['reordered_lower_bound'])} ({100 * change:+.1f}%) | {mb(r['reordered_planned'])} | "
                     f"{mb(r['o2_planned'])} | "
                     f"{mb(r['weights'])} | {mb(r.get('ort_peak'))} | {mb(r.get('ort_peak_reordered'))} | "
                     f"{mb(r.get('tvm_storage'))} | {mb(r.get('tvm_storage_reordered'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    ap.add_argument("--seq", type=int, default=128, help="value of symbolic sequence dims (batch is 1)")
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's measured peaks")
    ap.add_argument("--no-tvm", action="store_true", help="skip TVM's planned storage")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        rows.append(measure(name, args.seq, not args.no_ort, not args.no_tvm))
        print(f"  {name}: done in {rows[-1]['analysis_s']} s of analysis", file=sys.stderr)
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    failed = [r["model"] for r in rows if r["planned"] > 1.05 * r["lower_bound"]
              or r["o2_planned"] > 1.05 * r["o2_lower_bound"]
              or r["reordered_lower_bound"] > r["lower_bound"]]
    if failed:
        print(f"goal missed on: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
