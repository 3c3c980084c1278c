"""`infoptc profile`: parsing a Chrome trace, the ONNX Runtime profiler, other targets, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infoptc.profile import parse_trace
from infoptc.targets import TARGET_REGISTRY, Artifact, Target, TensorSpec


def _node(name, op, ts, dur):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ph": "X", "ts": ts, "dur": dur, "args": {"op_name": op}}


def _run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ph": "X", "ts": ts, "dur": dur}


def test_parse_trace_groups_by_op_and_skips_warmup():
    events = [
        {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 500},
        _node("mm1", "MatMul", 1001, 900), _node("relu", "Relu", 1902, 50), _run(1000, 1000),  # warm-up
        _node("mm1", "MatMul", 3001, 60), _node("mm2", "MatMul", 3062, 20), _node("relu", "Relu", 3083, 10),
        _run(3000, 100),
        _node("mm1", "MatMul", 5001, 40), _node("mm2", "MatMul", 5042, 20), _node("relu", "Relu", 5063, 10),
        _run(5000, 100),
    ]
    prof = parse_trace(events, warmup_runs=1)
    assert prof.runs == 2 and prof.run_us == 100 and prof.kernel_us == 80
    by_op = {r["op_type"]: r for r in prof.by_op}
    assert by_op["MatMul"]["us"] == 70 and by_op["MatMul"]["nodes"] == 2 and by_op["MatMul"]["calls"] == 2
    assert by_op["Relu"]["us"] == 10
    assert [r["op_type"] for r in prof.by_op] == ["MatMul", "Relu"]  # sorted by share
    assert by_op["MatMul"]["share"] == pytest.approx(0.7)  # of the run time, overhead included
    assert [r["node"] for r in prof.by_node] == ["mm1", "mm2", "relu"]
    assert prof.as_dict()["overhead_us"] == 20


def test_parse_trace_without_run_events_needs_runs():
    events = [_node("a", "Add", 0, 30), _node("a", "Add", 100, 10)]
    prof = parse_trace(events, runs=2)
    assert prof.by_op[0]["us"] == 20 and prof.by_op[0]["share"] == 1.0


def test_profile_onnx_model_tables_trace_and_json(cli, golden, tmp_path):
    trace = tmp_path / "trace.json"
    code, out, err = cli("profile", golden("mlp"), "--iterations", "3", "--warmup", "1", "--trace", trace, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) >= {"by_op", "top_nodes", "breakdown_s", "runs", "run_us", "kernel_us", "trace"}
    assert data["runs"] == 3
    assert data["by_op"] and sum(r["share"] for r in data["by_op"]) <= 1.0 + 1e-9
    shares = [r["share"] for r in data["by_op"]]
    assert shares == sorted(shares, reverse=True)
    assert set(data["breakdown_s"]) >= {"model_load", "session_creation", "input_preparation", "first_inference",
                                        "inference_p50", "output_fetch_p50", "cold_run_total"}
    events = json.loads(trace.read_text())  # a Chrome trace: a list of complete events
    assert any(e.get("name") == "model_run" for e in events)
    assert any(e.get("cat") == "Node" for e in events)
    assert not list(tmp_path.glob(".trace.json.*"))  # no temporary file left behind

    code, out, err = cli("profile", golden("mlp"), "--iterations", "2", "--warmup", "0")
    assert code == 0, err
    for title in ("time per op type", "top", "latency breakdown", "session creation", "output fetch"):
        assert title in out


class _Art(Artifact):
    """An artifact of a target without a profiler."""

    target = "fake-prof"

    @property
    def inputs(self):
        return [TensorSpec("x", "float32", (2,))]

    @property
    def outputs(self):
        return [TensorSpec("y", "float32", (2,))]

    def run(self, inputs):
        return {"y": inputs["x"]}


class _ProfilingArt(_Art):
    """One whose profile() returns Chrome-trace events: a 30 us Conv inside each 40 us run."""

    def profile(self, inputs, iterations, warmup):
        events = []
        for i in range(warmup + iterations):
            events += [_node("k", "Conv", 1000 * i + 1, 30), _run(1000 * i, 40)]
        return events


class _FakeTarget(Target):
    name = "fake-prof"
    summary = "test double"

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return path.suffix in (".prof1", ".prof0")

    @classmethod
    def load(cls, path: Path):
        return _ProfilingArt() if path.suffix == ".prof1" else _Art()


def test_profile_other_targets(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(TARGET_REGISTRY, _FakeTarget.name, _FakeTarget)
    (tmp_path / "m.prof1").write_bytes(b"x")
    (tmp_path / "m.prof0").write_bytes(b"x")
    code, out, err = cli("profile", tmp_path / "m.prof1", "--iterations", "2", "--warmup", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["by_op"][0]["op_type"] == "Conv" and data["by_op"][0]["us"] == 30 and data["runs"] == 2
    code, out, err = cli("profile", tmp_path / "m.prof0")
    assert code == 2 and "offers no profiler" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and out == ""


def test_profile_bad_input(cli, golden, tmp_path):
    code, out, err = cli("profile", tmp_path / "missing.onnx")
    assert code == 6 and "no such file" in err and "Traceback" not in err
    bad = tmp_path / "bad.npz"
    import numpy as np

    np.savez(bad, x=np.zeros((1, 65), np.float32))
    code, out, err = cli("profile", golden("mlp"), "--inputs", bad)
    assert code == 2 and "shape" in err and len(err.strip().splitlines()) == 1
