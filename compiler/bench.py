"""Latency statistics of models and artifacts, several of them interleaved: what `infoptc bench`
(cli/bench.py, which owns the table, the progress bar and the files) measures with.

    subjects = open_subjects(["model.onnx"], levels=["0", "2"])   # compiled twice
    results, batch = benchmark(subjects, iterations=100)           # run A B A B ...
    results[0].stats.p50, results[0].stats.cv

Subjects, inputs, the interleaved loop, statistics, the CPU's peak and the latency plot: quiet
and reusable.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import UsageError, first_line
from .plotting import figure
from .progress import stage
from .targets import Artifact, TensorSpec

log = logging.getLogger("infoptc")

PERCENTILES = (50, 90, 95, 99)


# ----------------------------------------------------------------------------- subjects


@dataclass
class Subject:
    """One thing to measure: an artifact, the ONNX model behind it (when there is one), a label."""

    label: str
    artifact: Artifact
    path: str
    target: str
    opt_level: str | None = None  # None: run as given, not compiled here
    load_seconds: float = 0.0  # loading, or compiling, the subject

    @property
    def model(self):
        """The ONNX model the artifact runs, or None for targets with their own format."""
        return getattr(self.artifact, "model", None)


def open_subject(path: str | os.PathLike, target: str | None = None, opt_level: str | None = None,
                 threads: int | None = None) -> Subject:
    """A model compiled with ``target``/``opt_level`` when either is given; otherwise the model or
    artifact as it is (``infoptc.load``: .onnx files run with ONNX Runtime)."""
    from .driver import compile as compile_model
    from .targets import load

    start = time.perf_counter()
    if target is not None or opt_level is not None:
        options = {"threads": threads} if threads else {}
        artifact = compile_model(path, target=target or "onnx", opt_level=opt_level or "2", **options)
    else:
        artifact = load(path)
        if threads:
            if hasattr(artifact, "threads"):
                artifact.threads = threads
            else:
                log.warning("%s: the %s target takes no thread count; --threads ignored", path, artifact.target)
    seconds = time.perf_counter() - start
    label = Path(path).name
    if opt_level is not None:
        label += f" -O{opt_level}"
    if target is not None:
        label += f" [{target}]"
    return Subject(label, artifact, str(path), artifact.target or (target or "onnx"), opt_level, seconds)


def open_subjects(paths: Sequence[str], targets: Sequence[str] = (), levels: Sequence[str] = (),
                  threads: int | None = None) -> list[Subject]:
    """Every ONNX model compiled for every target x level given (as-is when none is given);
    artifacts of other targets always as they are."""
    combos = [(t, o) for t in (targets or [None]) for o in (levels or [None])]
    subjects = [open_subject(p, t, o, threads)
                for p in paths for t, o in (combos if _is_onnx(p) else [(None, None)])]
    seen: dict[str, int] = {}
    for s in subjects:  # a model given twice still needs two names
        seen[s.label] = seen.get(s.label, 0) + 1
        if seen[s.label] > 1:
            s.label += f" #{seen[s.label]}"
    return subjects


def _is_onnx(path: str | os.PathLike) -> bool:
    """An ONNX model file (what the onnx target loads), as opposed to another target's artifact;
    a missing path counts as a model so that loading it reports the missing file."""
    from .targets import get_target

    p = Path(path)
    return not p.is_file() or get_target("onnx").can_load(p)


# ----------------------------------------------------------------------------- inputs


def parse_dims(specs: Sequence[str]) -> dict[str, int]:
    """``["seq=128", "batch=4"]`` -> ``{"seq": 128, "batch": 4}``."""
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = int(value)
            if out[name] <= 0:
                raise ValueError
        except ValueError:
            raise UsageError(f"bad --dim {spec!r}; expected NAME=N with N > 0, e.g. seq=128") from None
    return out


def bind_dims(specs: Sequence[TensorSpec], batch: int | None, dims: dict[str, int]) -> tuple[dict[str, int], int]:
    """Values for every symbolic dim of the inputs, and the batch size.

    The batch is the leading dim of the inputs: a symbolic one is bound to ``batch`` (default 1);
    a fixed one is the batch, and ``batch`` must agree with it. Other symbolic dims come from
    ``dims`` or default to ``verify.DEFAULT_DIM``.
    """
    from .verify import DEFAULT_DIM

    bound = dict(dims)
    fixed_batch = None
    for spec in specs:
        if not spec.shape:
            continue
        lead = spec.shape[0]
        if isinstance(lead, str):
            if lead in dims and batch is not None and dims[lead] != batch:
                raise UsageError(f"--batch {batch} and --dim {lead}={dims[lead]} disagree")
            bound.setdefault(lead, batch or 1)
        elif isinstance(lead, int) and lead > 0:
            if batch is not None and lead != batch:
                raise UsageError(f"input {spec.name!r} has a fixed leading dimension {lead}; "
                                 f"--batch {batch} cannot apply")
            fixed_batch = lead
    unset = sorted({d for s in specs for d in (s.shape or ()) if isinstance(d, str) and d not in bound})
    for name in unset:
        log.warning("symbolic dimension %r set to %d; bind it with --dim %s=N", name, DEFAULT_DIM, name)
        bound[name] = DEFAULT_DIM
    leads = [s.shape[0] for s in specs if s.shape]
    batch_value = next((bound[d] if isinstance(d, str) else d for d in leads if d is not None), None)
    return bound, int(batch or fixed_batch or batch_value or 1)


def inputs_for(artifact: Artifact, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Generated inputs: ``verify.random_inputs`` for ONNX models (vocabulary-aware indices,
    positive values before Log/Sqrt); zeros for integer inputs and normal floats otherwise.
    Symbolic dims missing from ``dims`` take ``verify.DEFAULT_DIM``."""
    from .verify import DEFAULT_DIM, random_inputs

    model = getattr(artifact, "model", None)
    if model is not None:
        return random_inputs(model, seed=seed, dims=dims)
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in artifact.inputs:
        if spec.shape is None:
            raise UsageError(f"input {spec.name!r} has no known shape; give inputs with --inputs DATA.npz")
        shape = tuple(dims.get(d, DEFAULT_DIM) if isinstance(d, str) or d is None else d for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        feeds[spec.name] = (rng.standard_normal(shape) if dtype.kind == "f" else np.zeros(shape)).astype(dtype)
    return feeds


# ----------------------------------------------------------------------------- measuring


# Pause before each turn when subjects run on different runtimes (see run_interleaved).
MIXED_RUNTIMES_SETTLE = 0.05


def run_interleaved(runners: Sequence[Callable[[], Any]], *, iterations: int | None = None,
                    duration: float | None = None, warmup: int = 0,
                    on_round: Callable[[int, float], None] | None = None, settle: float = 0.0,
                    block: int = 1, wake: int = 1,
                    clock: Callable[[], int] = time.perf_counter_ns) -> list[list[float]]:
    """Run ``runners`` in rounds (A B A B ...), so drift in clock speed or load hits all alike.

    ``warmup`` untimed rounds first; then ``iterations`` timed rounds, or rounds until
    ``duration`` seconds have passed (at least one). Returns each runner's latencies in seconds.
    ``on_round(rounds_done, seconds_elapsed)`` is called after every timed round.

    ``settle`` > 0 separates the runners: each turn starts with that many seconds of sleep and
    ``wake`` untimed runs, then ``block`` timed runs. Runtimes keep their worker threads spinning
    for a while after a run (ONNX Runtime and TVM both do by default), and on a small machine
    those spinners steal the cores the next runner needs: on 2 cores ORT's bert went bimodal
    (3.2 or 5.3 ms per session) right after TVM runs. The untimed runs wake the runner's own
    threads after the sleep, so the timed runs measure it warm, as a loop of calls would. With
    settle 0.05 s, wake 5, block 30, ORT (spinning on) and TVM on resnet measured within 3% of
    each measured alone (1.05 / 1.17 ms vs 1.02 / 1.14 ms).
    """
    if (iterations is None) == (duration is None):
        raise UsageError("give either iterations or duration")
    if iterations is not None and iterations < 1:
        raise UsageError("iterations must be at least 1")
    if duration is not None and duration <= 0:
        raise UsageError("duration must be positive")
    for _ in range(warmup):
        for run in runners:
            run()
    separate = settle > 0 and len(runners) > 1
    samples: list[list[float]] = [[] for _ in runners]
    begin = clock()
    rounds = 0
    while True:
        for i, run in enumerate(runners):
            if separate:
                time.sleep(settle)
                for _ in range(wake):
                    run()
            for _ in range(block if separate else 1):
                t0 = clock()
                run()
                samples[i].append((clock() - t0) * 1e-9)
        rounds += 1
        elapsed = (clock() - begin) * 1e-9
        if on_round:
            on_round(rounds, elapsed)
        if (iterations is not None and rounds >= iterations) or (duration is not None and elapsed >= duration):
            return samples


@dataclass
class LatencyStats:
    """Latency figures in seconds; ``throughput`` in inferences (batch items) per second."""

    runs: int
    min: float
    mean: float
    max: float
    std: float
    percentiles: dict[int, float]
    batch: int = 1

    @classmethod
    def of(cls, samples: Sequence[float], batch: int = 1) -> "LatencyStats":
        a = np.asarray(samples, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no samples")
        return cls(runs=int(a.size), min=float(a.min()), mean=float(a.mean()), max=float(a.max()),
                   std=float(a.std(ddof=1)) if a.size > 1 else 0.0,
                   percentiles={p: float(np.percentile(a, p)) for p in PERCENTILES}, batch=batch)

    @property
    def p50(self) -> float:
        return self.percentiles[50]

    @property
    def cv(self) -> float:
        """Coefficient of variation: standard deviation / mean."""
        return self.std / self.mean if self.mean > 0 else 0.0

    @property
    def throughput(self) -> float:
        return self.batch / self.mean if self.mean > 0 else float("inf")

    def as_dict(self) -> dict:
        ms = {"min": self.min, "mean": self.mean, **{f"p{p}": v for p, v in self.percentiles.items()},
              "max": self.max, "std": self.std}
        return {"runs": self.runs, "latency_ms": {k: v * 1e3 for k, v in ms.items()}, "cv": self.cv,
                "throughput_per_s": self.throughput, "batch": self.batch}


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``getrusage``; KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


# ----------------------------------------------------------------------------- the machine's peak


@dataclass(frozen=True)
class CpuInfo:
    """What the fp32 peak estimate is built from; ``vector_bits`` 0 means unknown."""

    model: str
    logical_cores: int
    physical_cores: int
    mhz: float | None
    mhz_source: str
    vector_bits: int
    fma: bool
    isa: str

    @property
    def flops_per_cycle_per_core(self) -> int:
        """2 vector FP units x fp32 lanes x (2 with FMA: a multiply-add is two FLOPs)."""
        return 2 * (self.vector_bits // 32) * (2 if self.fma else 1)

    def peak_gflops(self, cores: int | None = None) -> float | None:
        """Estimated fp32 peak of ``cores`` physical cores (default: all of them) at ``mhz``."""
        if not self.mhz or not self.vector_bits:
            return None
        n = min(cores or self.physical_cores, self.physical_cores)
        return n * self.mhz * 1e-3 * self.flops_per_cycle_per_core

    def as_dict(self) -> dict:
        return {"model": self.model, "logical_cores": self.logical_cores, "physical_cores": self.physical_cores,
                "mhz": self.mhz, "mhz_source": self.mhz_source, "isa": self.isa, "vector_bits": self.vector_bits,
                "fma": self.fma, "fp32_flops_per_cycle_per_core": self.flops_per_cycle_per_core,
                "peak_gflops_estimate": self.peak_gflops()}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def cpu_info(cpuinfo: str | None = None, max_khz: str | None = None, usable: set[int] | None = None) -> CpuInfo:
    """Parse ``/proc/cpuinfo`` (and the cpufreq maximum that ``lscpu`` shows as "CPU max MHz").

    Arguments default to this machine's files and the CPUs this process may run on (``usable``,
    from the affinity mask); tests pass text instead, and then all CPUs of the text count.
    """
    if cpuinfo is None:
        cpuinfo = _read("/proc/cpuinfo") or ""
        if usable is None:
            try:
                usable = os.sched_getaffinity(0)
            except (AttributeError, OSError):
                usable = None
    if max_khz is None:
        max_khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    blocks = [b for b in re.split(r"\n\s*\n", cpuinfo) if "processor" in b]
    procs = []
    for block in blocks:
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        procs.append(fields)
    if usable is not None:
        procs = [p for p in procs if not p.get("processor", "").isdigit() or int(p["processor"]) in usable] or procs
    logical = len(procs) or (len(usable) if usable else os.cpu_count() or 1)
    if procs and all("core id" in p for p in procs):
        physical = len({(p.get("physical id", "0"), p["core id"]) for p in procs})
    else:
        physical = logical
    first = procs[0] if procs else {}
    flags = set((first.get("flags") or first.get("features") or "").split())
    if "avx512f" in flags:
        bits, isa = 512, "AVX-512"
    elif "avx2" in flags or "avx" in flags:
        bits, isa = 256, "AVX2" if "avx2" in flags else "AVX"
    elif flags & {"sse", "sse2", "asimd", "neon"}:
        bits, isa = 128, "NEON" if flags & {"asimd", "neon"} else "SSE"
    else:
        bits, isa = 0, "unknown"
    fma = bool(flags & {"fma", "asimd"})  # AArch64's Advanced SIMD always has FMA
    mhz, source = None, "unknown"
    if max_khz and max_khz.strip().isdigit():
        mhz, source = int(max_khz.strip()) / 1000, "cpufreq max (lscpu max MHz)"
    else:
        clocks = [float(p["cpu mhz"]) for p in procs if _is_float(p.get("cpu mhz"))]
        if clocks:
            mhz, source = max(clocks), "/proc/cpuinfo cpu MHz"
    return CpuInfo(first.get("model name", "") or first.get("cpu model", "") or "unknown", logical, physical,
                   mhz, source, bits, fma, isa + ("+FMA" if fma and isa not in ("unknown", "NEON") else ""))


def _is_float(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- one call


@dataclass
class BenchResult:
    subject: Subject
    stats: LatencyStats
    samples: list[float]
    first_run_seconds: float
    flops: int | None = None
    peak_rss_after_setup: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    flops_unknown: str | None = None  # why ``flops`` is None

    @property
    def gflops_per_s(self) -> float | None:
        return self.flops / self.stats.p50 * 1e-9 if self.flops and self.stats.p50 > 0 else None


def benchmark(subjects: Sequence[Subject], *, iterations: int | None = None, duration: float | None = None,
              warmup: int = 10, batch: int | None = None, dims: dict[str, int] | None = None,
              inputs: dict[str, np.ndarray] | None = None, seed: int = 0,
              on_round: Callable[[int, float], None] | None = None, settle: float = 0.0,
              block: int = 1) -> tuple[list[BenchResult], int]:
    """Measure ``subjects`` interleaved (in turns of ``block`` runs after a ``settle`` pause when
    settle > 0, see run_interleaved); returns the results and the batch size used."""
    from . import analysis
    from .verify import check_feeds

    feeds_per, flops_per, rss_per, first_per, batches = [], [], [], [], set()
    for s in subjects:
        specs = list(s.artifact.inputs)
        if inputs is not None:
            check_feeds({sp.name: sp for sp in specs}, inputs)
            feeds = inputs
            lead = next((v.shape[0] for v in inputs.values() if np.ndim(v) > 0), 1)
            n = batch or int(lead)
            bound = {}
            for sp in specs:
                for d, v in zip(sp.shape or (), inputs[sp.name].shape):
                    if isinstance(d, str):
                        bound[d] = int(v)
        else:
            bound, n = bind_dims(specs, batch, dims or {})
            feeds = inputs_for(s.artifact, bound, seed)
        batches.add(n)
        shape_model = s.artifact.analysis_model()
        if shape_model is None:
            flops, why = None, f"the {s.target} artifact does not record its model"
        else:
            try:
                flops, why = analysis.flops_or_reason(shape_model, bound)
            except Exception as e:  # noqa: BLE001 - a nicety: an odd model must not stop the benchmark
                flops, why = None, f"estimating failed: {type(e).__name__}: {first_line(e)}"
        with stage(f"first run of {s.label}"):
            t0 = time.perf_counter()
            s.artifact.run(feeds)  # first run: sessions, JIT, allocations; reported, never timed with the rest
            first_per.append(time.perf_counter() - t0)
        feeds_per.append(feeds)
        flops_per.append((flops, why))
        rss_per.append(peak_rss_bytes())
    if len(batches) > 1:
        raise UsageError(f"the subjects run different batch sizes ({sorted(batches)}); give --batch")
    runners = [(lambda a=s.artifact, f=f: a.run(f)) for s, f in zip(subjects, feeds_per)]
    samples = run_interleaved(runners, iterations=iterations, duration=duration, warmup=warmup, on_round=on_round,
                              settle=settle, block=block, wake=5)
    n = batches.pop()
    results = [BenchResult(s, LatencyStats.of(smp, n), smp, first, flops, rss,
                           {k: list(np.shape(v)) for k, v in f.items()}, why)
               for s, smp, first, (flops, why), rss, f in zip(subjects, samples, first_per, flops_per, rss_per,
                                                              feeds_per)]
    return results, n


def report(results: Sequence[BenchResult], cpu: CpuInfo, *, threads: int | None, settings: dict) -> dict:
    """Everything ``--json`` writes."""
    cores = min(threads, cpu.physical_cores) if threads else cpu.physical_cores
    peak = cpu.peak_gflops(cores)
    base = results[0].stats.p50 if results else 0.0
    rows = []
    for r in results:
        gf = r.gflops_per_s
        rows.append({
            "label": r.subject.label, "path": r.subject.path, "target": r.subject.target,
            "opt_level": r.subject.opt_level, "load_seconds": r.subject.load_seconds,
            "input_shapes": r.input_shapes, "first_run_ms": r.first_run_seconds * 1e3,
            **r.stats.as_dict(),
            "ratio_to_first": r.stats.p50 / base if base > 0 else None,
            "flops_estimate": r.flops, "flops_unknown": r.flops_unknown, "gflops_per_s": gf,
            "percent_of_peak_estimate": 100 * gf / peak if gf and peak else None,
            "peak_rss_after_setup_bytes": r.peak_rss_after_setup,
            "samples_ms": [x * 1e3 for x in r.samples],
        })
    return {
        "machine": {**cpu.as_dict(), "cores_used_for_peak": cores, "peak_gflops_used": peak},
        "settings": {**settings, "threads": threads, "threads_effective": threads or f"runtime default ({cores} cores)",
                     "interleaved": len(results) > 1},
        "peak_rss_bytes": peak_rss_bytes(),
        "results": rows,
    }


# ----------------------------------------------------------------------------- plot


def _mpl_version() -> tuple[int, int]:
    import matplotlib

    return tuple(int(x) for x in re.findall(r"\d+", matplotlib.__version__)[:2])  # type: ignore[return-value]


def plot_latencies(results: Sequence[BenchResult], path: str | os.PathLike) -> Path:
    """A violin per subject with its p50/p99 marked, written atomically (format from the suffix)."""
    data = [np.asarray(r.samples) * 1e3 for r in results]
    with figure(path, figsize=(7, 1.2 + 0.8 * len(results))) as (fig, ax):
        positions = list(range(1, len(results) + 1))
        horizontal = {"orientation": "horizontal"} if _mpl_version() >= (3, 10) else {"vert": False}
        if all(len(d) > 1 for d in data):
            ax.violinplot(data, positions=positions, showextrema=True, **horizontal)
        else:
            ax.boxplot(data, positions=positions, **horizontal)
        for pos, r in zip(positions, results):
            ax.plot([r.stats.p50 * 1e3], [pos], "o", color="black", label="p50" if pos == 1 else None)
            ax.plot([r.stats.percentiles[99] * 1e3], [pos], "|", color="red", markersize=14,
                    label="p99" if pos == 1 else None)
        ax.set_yticks(positions)
        ax.set_yticklabels([r.subject.label for r in results])
        ax.set_xlabel("latency (ms)")
        ax.set_title(f"latency distribution, batch {results[0].stats.batch}, {results[0].stats.runs} runs each")
        ax.invert_yaxis()  # the first subject on top, as in the table
        ax.legend(loc="best")
    return Path(path)


# ----------------------------------------------------------------------------- batch sweep


@dataclass
class SweepRow:
    """One batch size of a sweep: its latency statistics (``throughput``: samples per second)."""

    batch: int
    stats: LatencyStats
    speedup_per_sample: float = 1.0  # (batch-1 p50) / (this p50 / batch)

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency (the mean is too noisy on a shared machine)."""
        return self.batch / self.stats.p50 if self.stats.p50 > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"batch": self.batch, "p50_ms": self.stats.p50 * 1e3, "p99_ms": self.stats.percentiles[99] * 1e3,
                "throughput_per_s": self.throughput, "speedup_per_sample": self.speedup_per_sample,
                "runs": self.stats.runs, "cv": self.stats.cv}


def parse_batches(text: str) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]`` (sorted, distinct, each >= 1)."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise UsageError(f"bad --batch {text!r}; expected N or a list like 1,2,4,8,16 (each >= 1)")
    return values


def batch_sweep(artifact: Artifact, batches: Sequence[int], *, iterations: int = 30, warmup: int = 3,
                dims: dict[str, int] | None = None, seed: int = 0, settle: float = 0.0, block: int = 1,
                on_round: Callable[[int, float], None] | None = None) -> list[SweepRow]:
    """Latency and throughput of ``artifact`` at each batch size, measured side by side (one run
    of every size per round, see run_interleaved). The inputs must lead with a symbolic batch."""
    specs = list(artifact.inputs)
    if not any(s.shape and isinstance(s.shape[0], str) for s in specs):
        raise UsageError("the model's batch dimension is fixed (no input leads with a symbolic dimension); make it "
                         "symbolic first: infoptc compile MODEL --passes make-batch-dynamic")
    feeds = []
    for b in batches:
        bound, _ = bind_dims(specs, b, dims or {})
        feeds.append(inputs_for(artifact, bound, seed))
        with stage(f"first run at batch {b}"):
            artifact.run(feeds[-1])
    runners = [(lambda f=f: artifact.run(f)) for f in feeds]
    samples = run_interleaved(runners, iterations=iterations, warmup=warmup, on_round=on_round, settle=settle,
                              block=block, wake=2)
    rows = [SweepRow(b, LatencyStats.of(s, b)) for b, s in zip(batches, samples)]
    base = rows[0].stats.p50 / rows[0].batch
    for r in rows:
        r.speedup_per_sample = base / (r.stats.p50 / r.batch) if r.stats.p50 > 0 else float("inf")
    return rows


# Throughput must grow by more than this from one swept size to the next for the larger to be worth waiting for.
BATCH_GROWTH = 0.10


def choose_batching(rows: Sequence[SweepRow], budget_ms: float, growth: float = BATCH_GROWTH) -> dict:
    """Triton dynamic batching from a sweep. Among the swept sizes whose p99 fits ``budget_ms``,
    the knee is the smallest one whose throughput no larger one beats by more than ``growth``;
    the preferred batch sizes are the sizes above 1, up to the knee, whose throughput beats every
    smaller fitting size's by more than ``growth`` (a size that gains less is not worth waiting
    for); the queue delay is what the budget leaves after the p99 of the largest preferred size
    (a request waits at most that long, then runs)."""
    if budget_ms <= 0:
        raise UsageError("the latency budget must be positive (ms)")
    fits = [r for r in sorted(rows, key=lambda r: r.batch) if r.stats.percentiles[99] * 1e3 <= budget_ms]
    if not fits:
        best = min(rows, key=lambda r: r.stats.percentiles[99])
        return {"preferred": [], "max_queue_delay_us": 0, "knee": None,
                "reason": f"no batch size fits {budget_ms:g} ms: p99 at batch {best.batch} is "
                          f"{best.stats.percentiles[99] * 1e3:.2f} ms; no queue delay"}
    # the knee: the smallest size that no larger one beats by more than ``growth`` (robust to a
    # noisy dip between two sizes, which a first-stop-growing rule would take for the end)
    knee = next(r for i, r in enumerate(fits)
                if all(later.throughput <= r.throughput * (1 + growth) for later in fits[i + 1:]))
    # a size is worth waiting for when it beats every smaller fitting size by more than ``growth``
    chosen = [r for i, r in enumerate(fits) if 1 < r.batch <= knee.batch
              and r.throughput > max((s.throughput for s in fits[:i]), default=0.0) * (1 + growth)]
    if not chosen:
        return {"preferred": [], "max_queue_delay_us": 0, "knee": knee.batch,
                "reason": f"no batch size beats a smaller one's throughput by more than {growth:.0%} within "
                          f"{budget_ms:g} ms; no queue delay"}
    last = chosen[-1]
    delay_ms = max(0.0, budget_ms - last.stats.percentiles[99] * 1e3)
    reason = (f"throughput grows by more than {growth:.0%} up to batch {last.batch} "
              f"({last.throughput:.1f}/s, p99 {last.stats.percentiles[99] * 1e3:.2f} ms)")
    return {"preferred": [r.batch for r in chosen], "max_queue_delay_us": int(delay_ms * 1e3), "knee": knee.batch,
            "reason": reason}


def plot_sweep(rows: Sequence[SweepRow], path: str | os.PathLike, title: str = "") -> Path:
    """Throughput and p50/p99 latency against batch size, written atomically."""
    sizes = [r.batch for r in rows]
    with figure(path, nrows=2, ncols=1, figsize=(6, 6), sharex=True) as (fig, (top, bottom)):
        top.plot(sizes, [r.throughput for r in rows], "o-")
        top.set_ylabel("throughput (samples/s)")
        top.set_title(title or "batch sweep")
        bottom.plot(sizes, [r.stats.p50 * 1e3 for r in rows], "o-", label="p50")
        bottom.plot(sizes, [r.stats.percentiles[99] * 1e3 for r in rows], "s--", label="p99")
        bottom.set_xscale("log", base=2)
        bottom.set_xticks(sizes, [str(s) for s in sizes])
        bottom.set_xlabel("batch size")
        bottom.set_ylabel("latency (ms)")
        bottom.legend(loc="best")
    return Path(path)
