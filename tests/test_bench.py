"""`infoptc bench`: statistics, the CPU peak estimate, interleaving, JSON/plot output, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from infoptc.bench import LatencyStats, bind_dims, cpu_info, run_interleaved
from infoptc.errors import UsageError
from infoptc.targets import TARGET_REGISTRY, Artifact, Target, TensorSpec

# ----------------------------------------------------------------------------- a fake target

CALLS: list[str] = []


class FakeArtifact(Artifact):
    """Records every run, so the order of runs across artifacts can be checked."""

    target = "fake-bench"

    def __init__(self, name: str):
        self.name = name

    @property
    def inputs(self):
        return [TensorSpec("x", "float32", ("batch", 4))]

    @property
    def outputs(self):
        return [TensorSpec("y", "float32", ("batch", 4))]

    def run(self, inputs):
        CALLS.append(self.name)
        return {"y": inputs["x"] * 2}


class FakeTarget(Target):
    name = "fake-bench"
    summary = "test double"
    suffix = ".fakebench"

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return path.suffix == ".fakebench"

    @classmethod
    def load(cls, path: Path) -> FakeArtifact:
        return FakeArtifact(path.stem)


@pytest.fixture
def fake_files(tmp_path, monkeypatch):
    monkeypatch.setitem(TARGET_REGISTRY, FakeTarget.name, FakeTarget)
    CALLS.clear()
    paths = []
    for name in ("a", "b", "c"):
        p = tmp_path / f"{name}.fakebench"
        p.write_bytes(b"fake")
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- statistics


def test_latency_stats_follow_their_definitions():
    samples = [0.004, 0.001, 0.003, 0.002]
    s = LatencyStats.of(samples, batch=8)
    assert (s.min, s.max) == (0.001, 0.004)
    assert s.mean == pytest.approx(0.0025)
    assert s.p50 == pytest.approx(0.0025)  # linear interpolation between 2 ms and 3 ms
    assert s.percentiles[90] == pytest.approx(0.0037)
    assert s.cv == pytest.approx(np.std(samples, ddof=1) / 0.0025)
    assert s.throughput == pytest.approx(8 / 0.0025)  # batch-aware: inferences per second
    d = s.as_dict()
    assert set(d["latency_ms"]) == {"min", "mean", "p50", "p90", "p95", "p99", "max", "std"}
    assert d["latency_ms"]["max"] == pytest.approx(4.0)


CPUINFO = """\
processor\t: {p}
model name\t: Test CPU 9000
cpu MHz\t\t: 3000.000
physical id\t: 0
core id\t\t: {core}
flags\t\t: fpu sse sse2 {vec}
"""


def _cpuinfo(vec: str, logical: int = 4, per_core: int = 2) -> str:
    return "\n".join(CPUINFO.format(p=i, core=i // per_core, vec=vec) for i in range(logical))


def test_cpu_peak_from_flags_cores_and_clock():
    avx512 = cpu_info(_cpuinfo("avx avx2 fma avx512f"), max_khz="", usable=None)
    assert (avx512.vector_bits, avx512.fma) == (512, True)
    assert avx512.flops_per_cycle_per_core == 2 * 16 * 2
    assert (avx512.logical_cores, avx512.physical_cores) == (4, 2)  # hyperthreads share FP units
    assert avx512.peak_gflops() == pytest.approx(2 * 3.0 * 64)
    assert avx512.peak_gflops(cores=1) == pytest.approx(3.0 * 64)
    avx2 = cpu_info(_cpuinfo("avx avx2 fma"), max_khz="3500000", usable={0, 1})
    assert avx2.flops_per_cycle_per_core == 32
    assert avx2.mhz == 3500 and "max" in avx2.mhz_source  # cpufreq max wins over cpu MHz
    assert avx2.physical_cores == 1  # only CPUs 0 and 1 (one core) are usable
    plain = cpu_info(_cpuinfo(""), max_khz="", usable=None)
    assert plain.flops_per_cycle_per_core == 2 * 4 * 1  # SSE without FMA
    unknown = cpu_info("", max_khz="", usable=None)
    assert unknown.peak_gflops() is None


def test_bind_dims_batch_and_named_dims():
    specs = [TensorSpec("ids", "int64", ("batch", "seq")), TensorSpec("mask", "int64", ("batch", "seq"))]
    bound, batch = bind_dims(specs, 4, {"seq": 16})
    assert bound == {"batch": 4, "seq": 16} and batch == 4
    fixed = [TensorSpec("x", "float32", (1, 3))]
    assert bind_dims(fixed, None, {})[1] == 1
    with pytest.raises(UsageError, match="fixed leading dimension"):
        bind_dims(fixed, 8, {})


# ----------------------------------------------------------------------------- interleaving


def test_run_interleaved_alternates_and_counts():
    order = []
    runners = [lambda: order.append("A"), lambda: order.append("B")]
    samples = run_interleaved(runners, iterations=3, warmup=2)
    assert order == ["A", "B"] * 5
    assert [len(s) for s in samples] == [3, 3]


def test_run_interleaved_separates_runners_with_a_pause_and_a_wake_up_run(monkeypatch):
    import infoptc.bench as bench

    calls: list[str] = []
    monkeypatch.setattr(bench.time, "sleep", lambda s: calls.append(f"sleep {s}"))
    runners = [lambda: calls.append("a"), lambda: calls.append("b")]
    samples = run_interleaved(runners, iterations=2, settle=0.01, block=3)
    assert [len(s) for s in samples] == [6, 6]  # block timed runs per turn; the wake-up run is untimed
    turn = lambda name: ["sleep 0.01", name, name, name, name]  # noqa: E731
    assert calls == turn("a") + turn("b") + turn("a") + turn("b")
    calls.clear()  # one runner: nothing to separate it from
    assert [len(s) for s in run_interleaved(runners[:1], iterations=2, settle=0.01, block=3)] == [2]
    assert calls == ["a", "a"]


def test_run_interleaved_duration_with_a_fake_clock():
    ticks = iter(range(0, 10**12, 10**8))  # every clock read advances 0.1 s
    samples = run_interleaved([lambda: None], duration=1.0, clock=lambda: next(ticks))
    # one round reads the clock 3 times (0.3 s): rounds end at 0.3, 0.6, 0.9, 1.2 s
    assert len(samples[0]) == 4
    assert all(s == pytest.approx(0.1) for s in samples[0])


def test_cli_runs_several_artifacts_interleaved(cli, fake_files):
    a, b, c = fake_files
    code, out, err = cli("bench", a, b, c, "--iterations", "4", "--warmup", "2", "-q")
    assert code == 0, err
    # one untimed first run each, then warm-up and timed rounds as A B C A B C ...
    assert CALLS == ["a", "b", "c"] + ["a", "b", "c"] * (2 + 4)
    assert "time vs first (p50)" in out and "a.fakebench" in out and "c.fakebench" in out
    assert "warm-up rounds, interleaved run by run;" in out
    CALLS.clear()  # -O compiles ONNX models only; other targets' artifacts run as they are
    code, out, err = cli("bench", a, b, "-O", "2", "--iterations", "1", "--warmup", "0", "--json")
    assert code == 0, err
    assert [r["label"] for r in json.loads(out)["results"]] == ["a.fakebench", "b.fakebench"]
    assert CALLS == ["a", "b", "a", "b"]
    CALLS.clear()  # --settle: turns of 5 untimed + --block timed runs each; --iterations counts runs
    code, out, err = cli("bench", a, b, "--iterations", "6", "--warmup", "0", "--settle", "0.001", "--block", "3",
                         "--json")
    assert code == 0, err
    assert [r["runs"] for r in json.loads(out)["results"]] == [6, 6]
    assert CALLS == ["a", "b"] + (["a"] * 8 + ["b"] * 8) * 2


class OtherRuntimeArtifact(FakeArtifact):
    """Stands for an artifact of another runtime (a TVM .so beside an ONNX model)."""


def test_cli_takes_turns_when_the_subjects_run_on_different_runtimes(cli, fake_files, monkeypatch):
    a, b, c = fake_files
    monkeypatch.setattr(FakeTarget, "load", classmethod(
        lambda cls, path: (OtherRuntimeArtifact if path.stem == "c" else FakeArtifact)(path.stem)))
    code, out, err = cli("bench", a, c, "--iterations", "20", "--warmup", "0", "--block", "10", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["settings"]["settle_s"] == 0.05 and "different runtimes" in err
    assert [r["runs"] for r in data["results"]] == [20, 20]
    assert CALLS == ["a", "c"] + (["a"] * 15 + ["c"] * 15) * 2
    code, out, err = cli("bench", a, c, "--iterations", "20", "--warmup", "0", "--block", "10")
    assert code == 0 and "taking turns of 10 runs" in err, err
    assert "20 runs after 0 warm-up rounds, in turns of 10 runs after a 0.05 s pause;" in out  # as stderr says
    assert "interleaved" not in out
    CALLS.clear()  # one runtime: run by run, unless asked
    code, out, err = cli("bench", a, b, "--iterations", "2", "--warmup", "0", "--json")
    assert code == 0 and json.loads(out)["settings"]["settle_s"] == 0.0
    assert CALLS == ["a", "b"] * 3


# ----------------------------------------------------------------------------- real models


def test_bench_two_levels_json_file_and_table(cli, golden, tmp_path):
    report = tmp_path / "bench.json"
    code, out, err = cli("bench", golden("mlp"), "-O", "0", "-O", "2", "--iterations", "5", "--warmup", "1",
                         "--batch", "3", "--json", report)
    assert code == 0, err
    assert out.lstrip().startswith("latency in ms")  # only the table on stdout
    for label in ("mlp.onnx -O0", "mlp.onnx -O2", "p99", "CV", "throughput", "% of peak (est.)", "peak RSS"):
        assert label in out
    data = json.loads(report.read_text())
    assert set(data) >= {"machine", "settings", "peak_rss_bytes", "results"}
    assert set(data["machine"]) >= {"physical_cores", "mhz", "isa", "fp32_flops_per_cycle_per_core",
                                    "peak_gflops_estimate"}
    assert data["settings"]["batch"] == 3 and data["settings"]["interleaved"] is True
    first, second = data["results"]
    for r in data["results"]:
        assert set(r) >= {"label", "runs", "latency_ms", "cv", "throughput_per_s", "ratio_to_first", "flops_estimate",
                          "gflops_per_s", "percent_of_peak_estimate", "first_run_ms", "samples_ms", "input_shapes"}
        assert r["runs"] == 5 and len(r["samples_ms"]) == 5
        assert r["input_shapes"] == {"x": [3, 64]}
        assert r["throughput_per_s"] == pytest.approx(3 / (r["latency_ms"]["mean"] / 1e3))
        assert r["latency_ms"]["min"] <= r["latency_ms"]["p50"] <= r["latency_ms"]["p99"] <= r["latency_ms"]["max"]
        assert r["flops_estimate"] > 0
    assert first["ratio_to_first"] == 1.0
    assert second["ratio_to_first"] == pytest.approx(second["latency_ms"]["p50"] / first["latency_ms"]["p50"])
    assert data["peak_rss_bytes"] >= max(r["peak_rss_after_setup_bytes"] for r in data["results"]) > 0


def test_bench_json_on_stdout_and_plot(cli, golden, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "latency.png"
    code, out, err = cli("bench", golden("mlp"), "--iterations", "3", "--warmup", "0", "--threads", "1",
                         "--json", "--plot", plot)
    assert code == 0, err
    data = json.loads(out)  # stdout is the JSON document and nothing else
    assert data["results"][0]["label"] == "mlp.onnx" and data["results"][0]["opt_level"] is None
    assert data["settings"]["threads"] == 1 and data["machine"]["cores_used_for_peak"] == 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, code, message", [
    (["missing.onnx"], 6, "no such file"),
    (["{mlp}", "--json", "out.txt"], 2, ".json file"),
    (["{mlp}", "--dim", "seq"], 2, "bad --dim"),
    (["{mlp}", "--iterations", "2", "--duration", "1"], 2, "not allowed with"),
    (["{mlp}", "--inputs", "{bad_npz}"], 2, "dtype float64"),
])
def test_bench_bad_input_one_line(cli, golden, tmp_path, monkeypatch, argv, code, message):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((1, 64)))  # float64 where the model takes float32
    argv = [a.format(mlp=golden("mlp"), bad_npz=bad) for a in argv]
    got, out, err = cli("bench", *argv, "--iterations", "1") if "--iterations" not in argv else cli("bench", *argv)
    assert got == code
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == ""
