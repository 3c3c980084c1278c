"""Tests for the deterministic golden ONNX models in ``golden_models/``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402

import golden_models  # noqa: E402
from golden_models import BUILDERS, MODEL_NAMES, build_all  # noqa: E402

ort = pytest.importorskip("onnxruntime")

ALL = list(MODEL_NAMES)
NEEDS_SKLEARN = {"digits_cnn"}

# model -> (example_inputs kwargs, {output name: expected shape})
RUN_SPECS = {
    "resnet": ({}, {"logits": (1, 10)}),
    "mobilenet": ({}, {"logits": (1, 10)}),
    "bert": ({"batch": 2, "seq": 16}, {"last_hidden_state": (2, 16, 256)}),
    "gpt": ({"batch": 2, "seq": 16}, {"logits": (2, 16, 1000)}),
    "mlp": ({"batch": 4}, {"y": (4, 10)}),
    "control_flow": ({}, {"y": (2, 8)}),
    "digits_cnn": ({"batch": 4}, {"logits": (4, 10)}),
}


class _Cache:
    """Builds each model at most once per test module."""

    def __init__(self):
        self._models: dict[str, onnx.ModelProto] = {}
        self._sessions: dict[str, object] = {}

    def model(self, name: str) -> onnx.ModelProto:
        if name in NEEDS_SKLEARN:
            pytest.importorskip("sklearn")
        if name not in self._models:
            self._models[name] = BUILDERS[name]()
        return self._models[name]

    def session(self, name: str):
        if name not in self._sessions:
            self._sessions[name] = make_session(self.model(name))
        return self._sessions[name]


def make_session(model: onnx.ModelProto):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )


def run(sess, feeds) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


@pytest.fixture(scope="module")
def cache() -> _Cache:
    return _Cache()


def test_builders_registry():
    assert set(BUILDERS) == {
        "resnet", "mobilenet", "bert", "gpt", "mlp", "control_flow", "digits_cnn"
    }
    assert all(callable(b) for b in BUILDERS.values())


@pytest.mark.parametrize("name", ALL)
def test_checker_and_versions(cache, name):
    model = cache.model(name)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets == {"": 17}


@pytest.mark.parametrize("name", ALL)
def test_runs_on_onnxruntime(cache, name):
    kwargs, expected = RUN_SPECS[name]
    feeds = golden_models.example_inputs(name, **kwargs)
    model = cache.model(name)
    assert sorted(feeds) == sorted(i.name for i in model.graph.input)
    outs = run(cache.session(name), feeds)
    assert set(outs) == set(expected)
    for out_name, shape in expected.items():
        assert outs[out_name].shape == shape, (name, out_name)
        assert outs[out_name].dtype == np.float32
        assert np.isfinite(outs[out_name]).all(), (name, out_name)


@pytest.mark.parametrize("name", ALL)
def test_build_is_deterministic(cache, name):
    first = cache.model(name).SerializeToString()
    second = BUILDERS[name]().SerializeToString()
    assert first == second


@pytest.mark.parametrize("name", ALL)
def test_torch_style_names(cache, name):
    graph = cache.model(name).graph
    node_names = [n.name for n in graph.node]
    assert len(node_names) == len(set(node_names))
    assert all(n.startswith("/") for n in node_names), node_names[:5]
    for node in graph.node:
        for out in node.output:
            graph_outputs = {o.name for o in graph.output}
            assert out in graph_outputs or out.startswith(node.name + "_output_"), (node.name, out)


def test_torch_style_parameter_names(cache):
    inits = {i.name for i in cache.model("resnet").graph.initializer}
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "fc.weight"} <= inits
    names = {n.name for n in cache.model("resnet").graph.node}
    assert {"/layer1/layer1.0/conv1/Conv", "/layer1/layer1.0/Add", "/fc/Gemm"} <= names
    inits = {i.name for i in cache.model("bert").graph.initializer}
    assert "encoder.layer.0.attention.self.query.weight" in inits


def test_cnn_patterns(cache):
    res = cache.model("resnet").graph
    ops = [n.op_type for n in res.node]
    for op in ("Conv", "BatchNormalization", "Relu", "Add", "MaxPool",
               "GlobalAveragePool", "Flatten", "Gemm"):
        assert op in ops, op
    mob = cache.model("mobilenet").graph
    convs = [n for n in mob.node if n.op_type == "Conv"]
    groups = [next((a.i for a in c.attribute if a.name == "group"), 1) for c in convs]
    assert any(g > 1 for g in groups), "no depthwise conv"
    clips = [n for n in mob.node if n.op_type == "Clip"]
    assert clips and all(len(c.input) == 3 for c in clips)
    assert any(n.op_type == "Add" for n in mob.node)
    assert any(n.op_type == "BatchNormalization" for n in mob.node)


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_transformers_accept_dynamic_shapes(cache, name):
    sess = cache.session(name)
    for batch, seq in [(1, 7), (3, 32)]:
        outs = run(sess, golden_models.example_inputs(name, batch=batch, seq=seq, seed=batch))
        (out,) = outs.values()
        width = 256 if name == "bert" else 1000
        assert out.shape == (batch, seq, width)
        assert np.isfinite(out).all()
    dims = [[d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in cache.model(name).graph.input]
    assert all(d == ["batch", "seq"] for d in dims)


def test_bert_patterns_and_mask(cache):
    graph = cache.model("bert").graph
    ops = {n.op_type for n in graph.node}
    assert {"Erf", "Softmax", "ReduceMean", "Pow", "Sqrt", "Shape", "Concat", "Reshape"} <= ops
    for n in graph.node:
        if n.op_type == "ReduceMean":
            assert [a.name for a in n.attribute if a.name == "axes"] == ["axes"]
    # padded key positions must not influence the unpadded ones
    sess = cache.session("bert")
    feeds = golden_models.example_inputs("bert", batch=1, seq=12, seed=3)
    feeds["attention_mask"][:] = 1
    feeds["attention_mask"][0, 8:] = 0
    full = run(sess, feeds)["last_hidden_state"]
    short = run(sess, {k: v[:, :8].copy() for k, v in feeds.items()})["last_hidden_state"]
    np.testing.assert_allclose(full[:, :8], short, rtol=1e-4, atol=1e-4)


def test_gpt_patterns_and_causality(cache):
    graph = cache.model("gpt").graph
    ops = {n.op_type for n in graph.node}
    assert {"Range", "LessOrEqual", "Where", "Tanh", "Softmax"} <= ops
    # tied embeddings: the word embedding feeds both a Gather and a Transpose
    users = {n.op_type for n in graph.node if "transformer.wte.weight" in n.input}
    assert users == {"Gather", "Transpose"}
    sess = cache.session("gpt")
    feeds = golden_models.example_inputs("gpt", batch=1, seq=10, seed=5)
    base = run(sess, feeds)["logits"]
    changed = feeds["input_ids"].copy()
    changed[0, 6:] = (changed[0, 6:] + 1) % 1000
    after = run(sess, {"input_ids": changed})["logits"]
    np.testing.assert_allclose(base[:, :6], after[:, :6], rtol=1e-5, atol=1e-5)
    assert not np.allclose(base[:, 6:], after[:, 6:])


def test_mlp_is_small_and_has_noops(cache):
    model = cache.model("mlp")
    assert len(model.SerializeToString()) < 16_000
    ops = [n.op_type for n in model.graph.node]
    for op in ("MatMul", "Add", "Relu", "Dropout", "Identity", "Cast"):
        assert op in ops, op


def _subgraph_outer_refs(graph: onnx.GraphProto) -> set[str]:
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for n in graph.node:
        local.update(n.output)
    return {i for n in graph.node for i in n.input if i and i not in local}


def test_control_flow_structure_and_values(cache):
    model = cache.model("control_flow")
    graph = model.graph
    by_op = {n.op_type: n for n in graph.node}
    assert "If" in by_op and "Loop" in by_op
    outer_inits = {i.name for i in graph.initializer}
    outer_node_outputs = {o for n in graph.node for o in n.output}
    bodies = [a.g for n in (by_op["If"], by_op["Loop"]) for a in n.attribute
              if a.type == onnx.AttributeProto.GRAPH]
    assert len(bodies) == 3
    for body in bodies:
        refs = _subgraph_outer_refs(body)
        assert refs & outer_inits, body.name
        assert refs & outer_node_outputs, body.name
    cf = golden_models.module("control_flow")
    sess = cache.session("control_flow")
    for positive in (True, False):
        x = cf.example_inputs(seed=11, positive=positive)["x"]
        y = run(sess, {"x": x})["y"]
        np.testing.assert_allclose(y, cf.reference(x), rtol=1e-5, atol=1e-5)


def test_digits_accuracy_on_held_out_npz(cache, tmp_path):
    pytest.importorskip("sklearn")
    digits = golden_models.module("digits_cnn")
    path = digits.save_dataset(tmp_path / "digits_cnn_test.npz")
    again = digits.save_dataset(tmp_path / "again.npz")
    assert path.read_bytes() == again.read_bytes()
    data = np.load(path)
    x, y = data["x"], data["y"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
    assert y.dtype == np.int64 and len(y) == len(x) >= 300
    logits = run(cache.session("digits_cnn"), {"input": x})["logits"]
    acc = float((logits.argmax(axis=1) == y).mean())
    assert acc >= 0.9, acc


def test_build_all_writes_saved_models(cache, tmp_path):
    paths = build_all(tmp_path, ["mlp", "control_flow"])
    assert paths == [tmp_path / "mlp.onnx", tmp_path / "control_flow.onnx"]
    for p in paths:
        assert p.read_bytes() == cache.model(p.stem).SerializeToString()
        onnx.checker.check_model(onnx.load(str(p)), full_check=True)
    with pytest.raises(KeyError):
        build_all(tmp_path, ["nope"])


@pytest.mark.parametrize("how", ["script", "module"])
def test_build_cli(cache, tmp_path, how):
    cmd = ([sys.executable, str(REPO_ROOT / "golden_models" / "build.py")] if how == "script"
           else [sys.executable, "-m", "golden_models.build"])
    subprocess.run(cmd + ["mlp", "--out", str(tmp_path)], cwd=REPO_ROOT, check=True,
                   capture_output=True, timeout=120)
    assert (tmp_path / "mlp.onnx").read_bytes() == cache.model("mlp").SerializeToString()
