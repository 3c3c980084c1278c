"""Graph-pass benchmark: `infoptc -O3 --target onnx` side by side with onnxsim and onnxslim.

    python benchmarks/graph_passes.py                       # everything: several minutes on 2 cores
    python benchmarks/graph_passes.py --models bert,gpt --runs 10 --no-scaling
    python benchmarks/graph_passes.py --no-models --sizes 1000,10000 --json out.json

Part 1, one row per model (the golden models, plus ONNX's "light" model-zoo models when the
installed onnx package ships them): node count and size, ONNX Runtime CPU latency
(ORT_ENABLE_ALL, 2 intra-op threads, median of N runs interleaved across the variants) of the
original, onnxsim's output, onnxslim's output and infoptc's (`-O3 --target onnx
--freeze-initializers`: the peers treat initializers listed as graph inputs as constants), with
ratios to the original; and whether each output matches the original (ONNX Runtime without graph optimizations, one
thread, the reassociating tolerance of infoptc.verify).

Part 2: compile time on synthetic 10,000- and 100,000-node graphs (a chain of exporter-style
blocks: MatMul/Add/Relu, a no-op Mul and Identity, a Shape->Gather->Unsqueeze->Concat->Reshape
view, a duplicated Sigmoid, a constant subexpression) for infoptc -O2, onnxsim and onnxslim,
with the 100k/10k ratio (10 means linear scaling). Each compile runs in its own process under
a timeout, so a tool that scales badly shows as "> N s" instead of stalling the run.

A peer that is not installed, or fails on a model, shows "-" and a note. Latencies on a shared
machine are noisy: compare the ratios within one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

THREADS = 2
DIMS = {"batch": 1, "seq": 32}  # values for symbolic input dimensions
SETTLE_S, TURN_S = 0.05, 0.1  # each session's turn: a pause, then about this long of runs


# ----------------------------------------------------------------------------- the tools


def run_infoptc(model: onnx.ModelProto, level: str = "O3") -> onnx.ModelProto:
    """``infoptc -O3 --target onnx --freeze-initializers``: the peers treat initializers that a
    model also lists as graph inputs (the light models do) as constants without being asked;
    infoptc keeps them overridable unless told, so the comparison tells it."""
    import infoptc

    return infoptc.optimize(model, opt_level=level, target="onnx", freeze_initializers=True)


def run_onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, _ = onnxsim.simplify(model, check_n=0)
    return simplified


def run_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


TOOLS: dict[str, tuple[str | None, Callable[[onnx.ModelProto], onnx.ModelProto]]] = {
    "onnxsim": ("onnxsim", run_onnxsim),
    "onnxslim": ("onnxslim", run_onnxslim),
    "infoptc": (None, run_infoptc),
}


def available(tool: str) -> bool:
    module = TOOLS[tool][0]
    return module is None or importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------- models


def golden_models(names: list[str] | None) -> dict[str, Callable[[], onnx.ModelProto]]:
    from golden_models import BUILDERS

    models = {}
    for name, build in BUILDERS.items():
        if name == "digits_cnn" and importlib.util.find_spec("sklearn") is None:
            continue
        models[name] = build
    return {k: v for k, v in models.items() if names is None or k in names}


def light_models(names: list[str] | None) -> dict[str, Callable[[], onnx.ModelProto]]:
    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    models = {}
    for path in sorted(folder.glob("light_*.onnx")):
        name = path.stem.removeprefix("light_")
        if names is None or name in names:
            models[name] = lambda p=path: onnx.load(str(p))
    return models


def synthetic(n_nodes: int, width: int = 16, seed: int = 0) -> onnx.ModelProto:
    """A chain of ~22-node exporter-style blocks, static shapes, small weights."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))

    x, block = "x", 0
    while len(nodes) < n_nodes:
        p = f"/block{block}"
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) * 0.1).astype(np.float32), f"{p}.w"))
        inits.append(numpy_helper.from_array(np.zeros(width, np.float32), f"{p}.b"))
        nodes += [
            helper.make_node("MatMul", [x, f"{p}.w"], [f"{p}/mm"]),
            helper.make_node("Add", [f"{p}/mm", f"{p}.b"], [f"{p}/add"]),
            const(f"{p}/one", np.float32(1.0)),
            helper.make_node("Mul", [f"{p}/add", f"{p}/one"], [f"{p}/mul1"]),
            helper.make_node("Relu", [f"{p}/mul1"], [f"{p}/relu"]),
            helper.make_node("Identity", [f"{p}/relu"], [f"{p}/id"]),
            helper.make_node("Shape", [f"{p}/id"], [f"{p}/shape"]),
            const(f"{p}/i0", np.int64(0)),
            helper.make_node("Gather", [f"{p}/shape", f"{p}/i0"], [f"{p}/d0"], axis=0),
            const(f"{p}/ax", np.array([0], np.int64)),
            helper.make_node("Unsqueeze", [f"{p}/d0", f"{p}/ax"], [f"{p}/d0u"]),
            const(f"{p}/m1", np.array([-1], np.int64)),
            helper.make_node("Concat", [f"{p}/d0u", f"{p}/m1"], [f"{p}/view"], axis=0),
            helper.make_node("Reshape", [f"{p}/id", f"{p}/view"], [f"{p}/resh"]),
            helper.make_node("Sigmoid", [f"{p}/resh"], [f"{p}/s1"]),
            helper.make_node("Sigmoid", [f"{p}/resh"], [f"{p}/s2"]),
            const(f"{p}/q", np.float32(0.25)),
            helper.make_node("Add", [f"{p}/q", f"{p}/q"], [f"{p}/half"]),
            helper.make_node("Mul", [f"{p}/s1", f"{p}/half"], [f"{p}/g1"]),
            helper.make_node("Mul", [f"{p}/s2", f"{p}/half"], [f"{p}/g2"]),
            helper.make_node("Add", [f"{p}/g1", f"{p}/g2"], [f"{p}/gg"]),
            helper.make_node("Add", [f"{p}/gg", f"{p}/resh"], [f"{p}/out"]),
        ]
        x, block = f"{p}/out", block + 1
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def node_count(model: onnx.ModelProto) -> int:
    from infoptc.analysis import node_count as count

    return count(model)


# ----------------------------------------------------------------------------- part 1


@dataclass
class Variant:
    label: str
    model: onnx.ModelProto | None = None
    compile_s: float | None = None
    latency_ms: float | None = None
    equivalent: bool | None = None
    max_abs_err: float | None = None
    note: str = ""


@dataclass
class ModelRow:
    name: str
    variants: dict[str, Variant] = field(default_factory=dict)


def _session(model: onnx.ModelProto, disabled_optimizers: tuple[str, ...] = ()):
    """An ORT_ENABLE_ALL CPU session with THREADS threads (``disabled_optimizers``: ORT's
    graph transformers to leave out, by name)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


def measure_latency(sessions: dict, feeds: dict, runs: int, budget_s: float) -> dict[str, float]:
    """Median ms per session, in turns (infoptc.bench.run_interleaved): each starts after a
    pause and a few untimed runs, so the previous session's spinning workers do not steal the
    cores of the next one and the timed runs find their own threads awake. A turn lasts about
    TURN_S (30 runs of a small model, 3 of VGG-19), and ``runs`` caps the timed runs."""
    from infoptc.bench import run_interleaved

    runners = [lambda s=sess: s.run(None, feeds) for sess in sessions.values()]
    start = time.perf_counter()
    for run in runners:  # warm-up (ORT allocates and tunes on the first runs)
        run()
        run()
    per_run = (time.perf_counter() - start) / (2 * len(runners))
    block = max(3, min(30, int(TURN_S / max(per_run, 1e-6))))
    wake = max(1, block // 6)
    per_round = len(runners) * (SETTLE_S + (wake + block) * per_run)
    rounds = max(3, min(max(1, runs // block), int(budget_s / per_round)))
    samples = run_interleaved(runners, iterations=rounds, settle=SETTLE_S, wake=wake, block=block)
    return {k: 1000 * statistics.median(v) for k, v in zip(sessions, samples)}


def benchmark_model(name: str, build: Callable[[], onnx.ModelProto], tools: list[str], runs: int,
                    budget_s: float, progress: Callable[[str], None], repeat: int = 1) -> ModelRow:
    from infoptc.pass_manager import Contract
    from infoptc.verify import OrtRunner, compare_outputs, random_inputs

    original = build()
    row = ModelRow(name, {"original": Variant("original", original)})
    for tool in tools:
        variant = row.variants[tool] = Variant(tool)
        if not available(tool):
            variant.note = "not installed"
            continue
        progress(f"{name}: {tool}")
        private = onnx.ModelProto()
        private.CopyFrom(original)  # onnxslim edits the model it is given
        start = time.perf_counter()
        try:
            variant.model = TOOLS[tool][1](private)
            variant.compile_s = time.perf_counter() - start
        except Exception as e:  # a peer's failure is a result, not a crash of the benchmark
            variant.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    feeds = random_inputs(original, seed=0, dims=DIMS)
    ready = {k: v for k, v in row.variants.items() if v.model is not None}

    progress(f"{name}: equivalence")
    reference = OrtRunner(original, threads=1, optimize=False).run(feeds)
    for key, variant in ready.items():
        if key == "original":
            continue
        try:
            diffs = compare_outputs(reference, OrtRunner(variant.model, threads=1, optimize=False).run(feeds),
                                    Contract.REASSOCIATING)
            variant.equivalent = all(d.ok for d in diffs)
            variant.max_abs_err = max((d.max_abs for d in diffs), default=0.0)
        except Exception as e:
            variant.equivalent = False
            variant.note = variant.note or f"does not run: {str(e).splitlines()[0][:120]}"

    progress(f"{name}: latency")
    sessions = {}
    for key, variant in ready.items():
        try:
            sessions[key] = _session(variant.model)
        except Exception as e:
            variant.note = variant.note or f"ORT cannot load it: {str(e).splitlines()[0][:120]}"
    # --repeat N: N measurements, each variant's median of them (one noisy stretch moves one)
    repeats = [measure_latency(sessions, feeds, runs, budget_s) for _ in range(repeat)]
    for key in sessions:
        row.variants[key].latency_ms = statistics.median(r[key] for r in repeats)
    return row


# ----------------------------------------------------------------------------- part 2


def _compile_in_subprocess(tool: str, path: Path, timeout_s: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, str(path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {"timeout": timeout_s}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:160]}
    return json.loads(lines[-1])


def worker(tool: str, path: str) -> None:
    """Child process: load, compile once, print {"seconds", "nodes"} as JSON on stdout."""
    model = onnx.load(path)
    run = (lambda m: run_infoptc(m, "O2")) if tool == "infoptc" else TOOLS[tool][1]
    start = time.perf_counter()
    out = run(model)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "nodes": node_count(out)}), flush=True)


def benchmark_scaling(sizes: list[int], tools: list[str], timeout_s: float,
                      progress: Callable[[str], None]) -> dict[str, dict[int, dict]]:
    results: dict[str, dict[int, dict]] = {tool: {} for tool in tools}
    with tempfile.TemporaryDirectory(prefix="infoptc-bench-") as tmp:
        for n in sizes:
            path = Path(tmp) / f"synthetic_{n}.onnx"
            model = synthetic(n)
            onnx.save(model, str(path))
            for tool in tools:
                if not available(tool):
                    results[tool][n] = {"error": "not installed"}
                    continue
                progress(f"synthetic {n} nodes: {tool}")
                results[tool][n] = {"input_nodes": node_count(model), **_compile_in_subprocess(tool, path, timeout_s)}
    return results


# ----------------------------------------------------------------------------- output


def _ratio(value: float | None, base: float | None) -> str:
    return f" ×{value / base:.2f}" if value is not None and base else ""


def _size(model: onnx.ModelProto) -> str:
    n = model.ByteSize()
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def models_table(rows: list[ModelRow], tools: list[str]):
    from rich.table import Table

    table = Table(title=f"ONNX Runtime CPU, ORT_ENABLE_ALL, {THREADS} threads; cells: nodes ×ratio / size / "
                        "median ms ×ratio", title_justify="left", show_lines=True)
    table.add_column("model")
    table.add_column("original", justify="right")
    for tool in tools:
        table.add_column(tool if tool != "infoptc" else "infoptc -O3", justify="right")
    table.add_column("equivalent\n" + " / ".join(tools))
    table.add_column("compile s\n" + " / ".join(tools), justify="right")
    for row in rows:
        base = row.variants["original"]
        base_nodes = node_count(base.model)
        cells = [row.name, f"{base_nodes}\n{_size(base.model)}\n{_ms(base.latency_ms)}"]
        for tool in tools:
            v = row.variants[tool]
            if v.model is None:
                cells.append("-")
                continue
            nodes = node_count(v.model)
            cells.append(f"{nodes}{_ratio(nodes, base_nodes)}\n{_size(v.model)}\n"
                         f"{_ms(v.latency_ms)}{_ratio(v.latency_ms, base.latency_ms)}")
        cells.append(" / ".join(_equiv(row.variants[t]) for t in tools))
        cells.append(" / ".join("-" if row.variants[t].compile_s is None else f"{row.variants[t].compile_s:.2f}"
                                for t in tools))
        table.add_row(*cells)
    return table


def _ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.2f} ms" if ms >= 1 else f"{ms * 1000:.0f} µs"


def _equiv(v: Variant) -> str:
    if v.equivalent is None:
        return "-"
    return ("ok" if v.equivalent else "NO") + (f" {v.max_abs_err:.0e}" if v.max_abs_err else "")


def scaling_table(results: dict[str, dict[int, dict]], sizes: list[int]):
    from rich.table import Table

    table = Table(title="compile time on synthetic graphs (infoptc -O2; one process per compile)",
                  title_justify="left")
    table.add_column("tool")
    for n in sizes:
        table.add_column(f"{n:,} nodes", justify="right")
    if len(sizes) >= 2:
        table.add_column(f"ratio {sizes[-1] // 1000}k/{sizes[0] // 1000}k", justify="right")
    for tool, by_size in results.items():
        cells = [tool]
        for n in sizes:
            r = by_size.get(n, {})
            if "seconds" in r:
                cells.append(f"{r['seconds']:.2f} s -> {r['nodes']:,} nodes")
            elif "timeout" in r:
                cells.append(f"> {r['timeout']:.0f} s")
            else:
                cells.append(r.get("error", "-"))
        if len(sizes) >= 2:
            lo, hi = by_size.get(sizes[0], {}), by_size.get(sizes[-1], {})
            if "seconds" in lo and "seconds" in hi:
                cells.append(f"{hi['seconds'] / lo['seconds']:.1f}")
            elif "seconds" in lo and "timeout" in hi:
                cells.append(f"> {hi['timeout'] / lo['seconds']:.0f}")
            else:
                cells.append("-")
        table.add_row(*cells)
    return table


def notes(rows: list[ModelRow]) -> list[str]:
    return [f"{row.name} / {key}: {v.note}" for row in rows for key, v in row.variants.items() if v.note]


def as_json(rows: list[ModelRow], scaling: dict | None) -> dict:
    return {
        "threads": THREADS,
        "models": {
            row.name: {
                key: {"nodes": node_count(v.model) if v.model is not None else None,
                      "bytes": v.model.ByteSize() if v.model is not None else None,
                      "latency_ms": v.latency_ms, "compile_s": v.compile_s, "equivalent": v.equivalent,
                      "max_abs_err": v.max_abs_err, "note": v.note}
                for key, v in row.variants.items()
            } for row in rows
        },
        "scaling": scaling,
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated model names (default: all golden and light models)")
    parser.add_argument("--no-light", action="store_true", help="skip ONNX's light model-zoo models")
    parser.add_argument("--no-models", action="store_true", help="skip part 1")
    parser.add_argument("--no-scaling", action="store_true", help="skip part 2")
    parser.add_argument("--runs", type=int, default=200, help="most timed runs per model and variant (default 200)")
    parser.add_argument("--repeat", type=int, default=1, help="latency measurements per model; the median is shown")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of latency rounds per model (default 10)")
    parser.add_argument("--sizes", default="10000,100000", help="synthetic graph sizes (default 10000,100000)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per compile in part 2 (default 600)")
    parser.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)  # a file or pipe gets the whole table
    err = Console(stderr=True)
    tools = list(TOOLS)
    missing = [t for t in tools if not available(t)]
    if missing:
        err.print(f"[yellow]not installed, skipped: {', '.join(missing)} (pip install {' '.join(missing)})[/]")
    names = args.models.split(",") if args.models else None
    rows: list[ModelRow] = []
    if not args.no_models:
        models = {**golden_models(names), **({} if args.no_light else light_models(names))}
        with err.status("") as status:
            for name, build in models.items():
                rows.append(benchmark_model(name, build, tools, args.runs, args.budget, lambda s: status.update(s),
                                            repeat=args.repeat))
        console.print(models_table(rows, tools))
        for line in notes(rows):
            console.print(f"  note: {line}", markup=False)
    scaling = None
    if not args.no_scaling:
        sizes = [int(s) for s in args.sizes.split(",")]
        with err.status("") as status:
            scaling = benchmark_scaling(sizes, tools, args.timeout, lambda s: status.update(s))
        console.print(scaling_table(scaling, sizes))
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(rows, scaling), indent=2))
    console.print(f"machine: {os.cpu_count()} cores visible; latencies are medians, noisy on a shared machine",
                  markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
