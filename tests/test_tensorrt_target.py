"""The tensorrt target without a GPU: the prepared ONNX passes the checker, runs on ONNX Runtime
and matches the original within int8's error; its Q/DQ are what TensorRT's explicit quantization
takes (symmetric int8, constant, per-channel weights, no int32 bias); unsupported ops are named
before anything is written; without TensorRT the command writes the ONNX and a build script and
exits 5 (0 with --emit-onnx); the script is valid Python importing only tensorrt and the standard
library, and drives TensorRT's API as it should (checked against a recording stand-in module,
which also runs the target's own engine-building path)."""

from __future__ import annotations

import ast
import json
import os
import py_compile
import subprocess
import sys
import textwrap

import infoptc
import numpy as np
import onnx
import pytest
from infoptc.backends import tensorrt as trt_target
from infoptc.cli import main
from infoptc.errors import UnsupportedOpError, UsageError
from infoptc.verify import run_onnx, sqnr_db
from onnx import TensorProto, helper, numpy_helper

BITS_LOST_TO_SYMMETRY_DB = 6.02  # a symmetric range spends one of 8 bits on a sign a one-sided range lacks


def calibration(shape, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    from golden_models import BUILDERS

    path = tmp_path_factory.mktemp("trt") / "resnet.onnx"
    onnx.save(BUILDERS["resnet"](), path)
    return path


@pytest.fixture(scope="module")
def prepared(resnet):
    return infoptc.compile(resnet, target="tensorrt", quantize="int8", calibration=calibration((1, 3, 224, 224)),
                           emit_onnx=True)


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_the_prepared_int8_onnx_passes_the_checker_and_matches_the_original(resnet, prepared):
    onnx.checker.check_model(prepared.model, full_check=True)
    x = calibration((1, 3, 224, 224), 1, seed=99)[0]
    ref = run_onnx(onnx.load(resnet), x)["logits"]
    got = run_onnx(prepared.model, x)["logits"]
    assert np.array_equal(prepared.run(x)["logits"], got)  # no engine: the artifact runs the prepared ONNX
    # the same calibration through ONNX Runtime's asymmetric uint8 recipe: the floor the symmetric
    # ranges may fall below by at most the one bit they spend on the sign
    ort_int8 = infoptc.compile(resnet, quantize="int8", calibration=calibration((1, 3, 224, 224)),
                               quantize_options={"isa": "generic", "speed-check": False})
    floor = sqnr_db(ref, run_onnx(ort_int8.model, x)["logits"]) - BITS_LOST_TO_SYMMETRY_DB
    assert sqnr_db(ref, got) >= floor
    assert sqnr_db(ref, got) > 20


def test_qdq_are_symmetric_int8_constants_with_per_channel_weights(prepared):
    model, inits = prepared.model, _inits(prepared.model)
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert qs and dqs
    for n in qs + dqs:
        assert n.input[1] in inits and (inits[n.input[1]] > 0).all(), n.name
        assert n.input[2] in inits, n.name
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), n.name
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in model.graph.node for o in n.output}
    for conv in convs:
        for i, what in ((0, "activation"), (1, "weight")):
            dq = producers.get(conv.input[i])
            assert dq is not None and dq.op_type == "DequantizeLinear", f"{conv.name}: {what} not behind a DQ"
        weight_dq = producers[conv.input[1]]
        w = inits[weight_dq.input[0]]
        assert w.dtype == np.int8 and inits[weight_dq.input[1]].shape == (w.shape[0],)  # one scale per channel
        assert {a.name: a.i for a in weight_dq.attribute}.get("axis", 1) == 0
        assert conv.input[2] in inits and inits[conv.input[2]].dtype == np.float32  # bias back in fp32
    assert not any(v.dtype == np.int32 for v in inits.values())
    assert trt_target.qdq_problems(model) == []
    assert trt_target.unsupported_nodes(model) == []
    assert prepared.describe()["precision"] == "int8"


def test_a_relu_folded_into_a_uint8_range_clips_again():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    art = infoptc.compile(model, target="tensorrt", quantize="int8", calibration=calibration((1, 3, 8, 8)),
                          emit_onnx=True)
    ops = [n.op_type for n in art.model.graph.node]
    assert ops.count("Relu") == 1  # the quantizer folded it into the uint8 range; TensorRT's int8 needs it back
    producers = {o: n for n in art.model.graph.node for o in n.output}
    relu = next(n for n in art.model.graph.node if n.op_type == "Relu")
    q = next(n for n in art.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == relu.output[0])
    assert producers[relu.input[0]].op_type == "Conv" and q is not None


def _model_with(op_nodes, extra_opsets=()):
    graph = helper.make_graph(op_nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *extra_opsets], ir_version=8)


def test_unsupported_ops_are_named_before_anything_is_written(tmp_path):
    model = _model_with([helper.make_node("Unique", ["x"], ["y"], name="the_unique")])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    out = tmp_path / "m.plan"
    assert main([str(path), "--target", "tensorrt", "-O0", "-o", str(out), "--emit-onnx", "-q"]) == 6  # an op the target cannot lower: bad input for it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(UnsupportedOpError, match="the_unique \\(Unique\\)"):
        infoptc.compile(model, target="tensorrt", opt_level=0, emit_onnx=True)
    custom = _model_with([helper.make_node("Gelu", ["x"], ["y"], name="ms_gelu", domain="com.microsoft")],
                         [helper.make_opsetid("com.microsoft", 1)])
    assert trt_target.unsupported_nodes(custom) == [("ms_gelu", "com.microsoft.Gelu",
                                                      "a custom-domain op needs a TensorRT plugin")]


def test_without_tensorrt_it_writes_the_onnx_and_a_script_and_exits_5(resnet, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_target, "engine_unavailable", lambda: "no GPU here (test)")
    out = tmp_path / "r.plan"
    assert main([str(resnet), "--target", "tensorrt", "-o", str(out), "-q"]) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.build.py", "r.onnx"]
    first = (tmp_path / "r.onnx").read_bytes()
    (tmp_path / "r.onnx").unlink()
    assert main([str(resnet), "--target", "tensorrt", "-o", str(out), "--emit-onnx", "-q"]) == 0
    assert (tmp_path / "r.onnx").read_bytes() == first  # same input and flags, same bytes
    onnx.checker.check_model(onnx.load(tmp_path / "r.onnx"))


def test_profiles_are_parsed_and_checked(tmp_path):
    shapes, profiles = trt_target.split_profiles(["x:1x3x8x8,4x3x8x8,16x3x8x8", "ids:1,128"])
    assert shapes == ["ids:1,128"] and profiles == {"x": ((1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))}
    from golden_models import BUILDERS

    mlp = BUILDERS["mlp"]()  # x: [batch, 64]
    with pytest.raises(UsageError, match="dynamic dimensions"):
        infoptc.compile(mlp, target="tensorrt", emit_onnx=True)
    with pytest.raises(UsageError, match="fixed to 64"):
        infoptc.compile(mlp, target="tensorrt", emit_onnx=True, profiles={"x": ((1, 32), (4, 64), (8, 64))})
    with pytest.raises(UsageError, match="min <= opt <= max"):
        infoptc.compile(mlp, target="tensorrt", emit_onnx=True, profiles={"x": ((4, 64), (2, 64), (8, 64))})
    art = infoptc.compile(mlp, target="tensorrt", emit_onnx=True, profiles={"x": ((1, 64), (4, 64), (8, 64))})
    assert art.settings["profiles"] == {"x": [[1, 64], [4, 64], [8, 64]]}
    assert art.describe()["precision"] == "fp32"


def _imports(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import in a standalone script"
            found.add(node.module.split(".")[0])
    return found


def test_the_build_script_is_python_importing_only_tensorrt_and_the_standard_library(tmp_path):
    script = trt_target.build_script({"onnx": "m.onnx", "plan": "m.plan", "profiles": {"x": [[1, 4], [2, 4], [8, 4]]},
                                      "timing_cache": "cache.bin", "workspace_mib": 512, "optimization_level": 4,
                                      "layer_report": "m.layers.json"})
    path = tmp_path / "m.build.py"
    path.write_text(script)
    py_compile.compile(str(path), doraise=True)
    assert _imports(script) - set(sys.stdlib_module_names) == {"tensorrt"}
    namespace: dict = {}
    exec(compile(ast.parse(script), str(path), "exec"), namespace)  # noqa: S102 - our own script, run to read SETTINGS
    assert namespace["SETTINGS"]["profiles"] == {"x": [[1, 4], [2, 4], [8, 4]]}
    assert namespace["SETTINGS"]["workspace_mib"] == 512


# A stand-in for the tensorrt package that records the calls the script makes and refuses any it
# does not know (so a misspelt API fails here as it would on a GPU machine).
FAKE_TENSORRT = textwrap.dedent('''
    import json, os
    __version__ = "10.99.0-stand-in"
    LOG = os.environ.get("FAKE_TRT_LOG")
    def _log(*call):
        if LOG:
            with open(LOG, "a") as f:
                f.write(json.dumps(call) + "\\n")
    class Logger:
        WARNING, ERROR = 2, 1
        def __init__(self, level): pass
    class NetworkDefinitionCreationFlag: STRONGLY_TYPED = 1
    class MemoryPoolType: WORKSPACE = "WORKSPACE"
    class ProfilingVerbosity: DETAILED = "DETAILED"
    class LayerInformationFormat: JSON = "JSON"
    class _Tensor:
        def __init__(self, name, shape): self.name, self.shape = name, shape
    class _Network:
        def __init__(self): self.inputs = []
        @property
        def num_inputs(self): return len(self.inputs)
        def get_input(self, i): return self.inputs[i]
    class OnnxParser:
        num_errors = 0
        def __init__(self, network, logger): self.network = network
        def parse_from_file(self, path):
            import onnx
            model = onnx.load(path)
            for vi in model.graph.input:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
                self.network.inputs.append(_Tensor(vi.name, tuple(dims)))
            _log("parse", len(model.graph.node))
            return True
    class _Cache:
        def __init__(self, data): self.data = data
        def serialize(self): return self.data + b"+"
    class _Config:
        def __init__(self): self.cache = None
        def set_memory_pool_limit(self, pool, size): _log("workspace", pool, size)
        def create_timing_cache(self, data): _log("cache_in", len(data)); return _Cache(data)
        def set_timing_cache(self, cache, ignore_mismatch): self.cache = cache
        def get_timing_cache(self): return self.cache
        def add_optimization_profile(self, profile): _log("profile", profile.shapes)
        def __setattr__(self, key, value):
            if key not in ("cache", "builder_optimization_level", "profiling_verbosity"):
                raise AttributeError(key)
            if key != "cache": _log(key, value)
            object.__setattr__(self, key, value)
    class _Profile:
        def __init__(self): self.shapes = {}
        def set_shape(self, name, lo, opt, hi): self.shapes[name] = [list(lo), list(opt), list(hi)]
    class Builder:
        def __init__(self, logger): pass
        def create_network(self, flags): _log("network", flags); return _Network()
        def create_builder_config(self): return _Config()
        def create_optimization_profile(self): return _Profile()
        def build_serialized_network(self, network, config): return b"PLAN:" + ",".join(t.name for t in network.inputs).encode()
    class _Inspector:
        def get_engine_information(self, fmt): return json.dumps({"Layers": ["a", "b", "c"]})
    class _Engine:
        def create_engine_inspector(self): return _Inspector()
    class Runtime:
        def __init__(self, logger): pass
        def deserialize_cuda_engine(self, plan): return _Engine()
''')


@pytest.fixture
def fake_tensorrt(tmp_path, monkeypatch):
    folder = tmp_path / "fake"
    (folder / "tensorrt").mkdir(parents=True)
    (folder / "tensorrt" / "__init__.py").write_text(FAKE_TENSORRT)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_TRT_LOG", str(log))
    return folder, log


def _calls(log):
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    log.unlink()
    return calls


def test_the_written_script_builds_with_profiles_cache_workspace_level_and_report(fake_tensorrt, tmp_path):
    from golden_models import BUILDERS

    fake, log = fake_tensorrt
    art = infoptc.compile(BUILDERS["mlp"](), target="tensorrt", emit_onnx=True, profiles={"x": ((1, 64), (4, 64), (8, 64))},
                          timing_cache=str(tmp_path / "timing.cache"), workspace_mib=256, optimization_level=5)
    written = art.save(tmp_path / "mlp.plan")
    script = tmp_path / "mlp.build.py"
    assert script in written
    env = {**os.environ, "PYTHONPATH": str(fake)}
    for run in range(2):
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, cwd="/")
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["timing_cache_reused"] is (run == 1)  # the second build starts from the first one's cache
        calls = _calls(log)
        assert ["network", 2] in calls  # 1 << STRONGLY_TYPED
        assert ["workspace", "WORKSPACE", 256 << 20] in calls
        assert ["builder_optimization_level", 5] in calls
        assert ["profile", {"x": [[1, 64], [4, 64], [8, 64]]}] in calls
    assert (tmp_path / "mlp.plan").read_bytes() == b"PLAN:x"
    assert json.loads((tmp_path / "mlp.layers.json").read_text())["Layers"] == ["a", "b", "c"]
    assert (tmp_path / "timing.cache").read_bytes() == b"++"


def test_where_tensorrt_imports_the_target_builds_the_engine_itself(fake_tensorrt, tmp_path, monkeypatch, resnet):
    fake, log = fake_tensorrt
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    assert trt_target.engine_unavailable() is None
    out = tmp_path / "r.plan"
    assert main([str(resnet), "--target", "tensorrt", "-o", str(out), "--builder-opt-level", "2",
                 "--timing-cache", str(tmp_path / "t.cache"), "-q"]) == 0
    assert out.read_bytes() == b"PLAN:input"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("r.")) == [
        "r.build.py", "r.layers.json", "r.onnx", "r.plan"]
    assert ["builder_optimization_level", 2] in _calls(log)
    assert (tmp_path / "t.cache").exists()
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)


def test_an_engine_exports_to_triton_with_the_batch_its_profiles_allow(fake_tensorrt, tmp_path, monkeypatch, resnet):
    from golden_models import BUILDERS
    from infoptc import triton

    fake, _ = fake_tensorrt
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    mlp = tmp_path / "mlp.onnx"
    onnx.save(BUILDERS["mlp"](), mlp)
    assert main([str(mlp), "--target", "tensorrt", "-o", str(tmp_path / "mlp.plan"),
                 "--input-shape", "x:1x64,4x64,16x64", "-q"]) == 0
    assert main([str(resnet), "--target", "tensorrt", "-o", str(tmp_path / "r.plan"), "-q"]) == 0
    result = triton.export_triton(tmp_path / "mlp.plan", tmp_path / "repo", "mlp", backend="tensorrt")
    config = triton.parse_config(result.config)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16 and list(config.input[0].dims) == [64]
    assert config.instance_group[0].kind == 1  # KIND_GPU
    assert (tmp_path / "repo" / "mlp" / "1" / "model.plan").read_bytes() == (tmp_path / "mlp.plan").read_bytes()
    with pytest.raises(UsageError, match="allow at most 16"):
        triton.export_triton(tmp_path / "mlp.plan", tmp_path / "repo", "mlp2", backend="tensorrt", max_batch_size=32)
    fixed = triton.export_triton(tmp_path / "r.plan", tmp_path / "repo", "r", backend="tensorrt", max_batch_size=8)
    assert fixed.max_batch_size == 0 and "engine" in fixed.batch_note  # built for batch 1: no rewriting an engine
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)


def test_tensorrt_flags_with_another_target_are_usage_errors(resnet, tmp_path):
    assert main([str(resnet), "--emit-onnx", "-o", str(tmp_path / "x.onnx"), "-q"]) == 2
    assert not any(tmp_path.iterdir())


def test_a_model_already_in_fp16_passes_through_as_fp16():
    """The fp16 conversion is another pass's job (--quantize fp16): this target takes its output as it is."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float16)
    nodes = [helper.make_node("Cast", ["input"], ["x16"], name="to_fp16", to=TensorProto.FLOAT16),
             helper.make_node("Conv", ["x16", "w"], ["y16"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["y16"], ["y"], name="to_fp32", to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    art = infoptc.compile(model, target="tensorrt", opt_level=1, emit_onnx=True)
    assert art.describe()["precision"] == "fp16"
    assert [n.op_type for n in art.model.graph.node] == ["Cast", "Conv", "Cast"]
    x = calibration((1, 3, 8, 8), 1)[0]
    assert np.array_equal(run_onnx(art.model, x)["y"], run_onnx(model, x)["y"])
