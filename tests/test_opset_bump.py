"""--opset N / compile(opset=N): the model's ai.onnx opset raised before optimizing, so that
--ops standard can emit the opset-23 Attention and RMSNormalization."""

from __future__ import annotations

import sys
from pathlib import Path

import infoptc
import numpy as np
import onnx
import pytest
from infoptc import opset as opset_mod
from infoptc.analysis import op_histogram
from infoptc.errors import UsageError, VerificationError
from infoptc.pass_manager import Contract
from infoptc.verify import check_equivalent
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import golden_models  # noqa: E402

H = 16
RNG = np.random.default_rng(5)


def rms_model(opset=17):
    """y = x / Sqrt(ReduceMean(x * x) + eps) * w, ReduceMean's axes an attribute (opset < 18:
    the converter moves it to an input)."""
    inits = [numpy_helper.from_array(RNG.uniform(0.5, 1.5, H).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps")]
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Div", ["x", "rms"], ["n"]),
             helper.make_node("Mul", ["n", "w"], ["y"])]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def feeds(n=2):
    return [{"x": RNG.standard_normal((2, 5, H)).astype(np.float32)} for _ in range(n)]


def test_rms_norm_becomes_the_standard_op_after_the_bump_and_matches():
    model = rms_model()
    art = infoptc.compile(model, opt_level=3, ops="standard", opset=23)
    assert op_histogram(art.model) == {"RMSNormalization": 1}
    assert opset_mod.model_opset(art.model) == 23
    check_equivalent(model, art.model, Contract.REASSOCIATING, feeds=feeds())


def test_without_the_bump_the_model_keeps_its_opset_and_the_reason_says_so():
    art = infoptc.compile(rms_model(), opt_level=3, ops="standard")
    assert "RMSNormalization" not in op_histogram(art.model) and opset_mod.model_opset(art.model) == 17
    assert "needs opset 23" in str(art.reports["fuse-rms-norm"]["rejected"])


def test_golden_bert_gets_standard_attention_after_the_bump_and_matches():
    model = golden_models.BUILDERS["bert"]()
    art = infoptc.compile(model, opt_level=3, ops="standard", opset=23)
    hist = op_histogram(art.model)
    assert hist["Attention"] == 2 and not any("::" in op for op in hist)  # ai.onnx ops only
    inputs = [golden_models.example_inputs("bert", batch=2, seq=7, seed=s) for s in range(2)]
    check_equivalent(model, art.model, Contract.REASSOCIATING, feeds=inputs)


def test_the_same_opset_is_no_conversion():
    model = rms_model(23)
    assert opset_mod.raise_opset(model, 23) is model


@pytest.mark.parametrize("value, words", [("16", "lower than the model's opset 17"), ("abc", "not an opset number"),
                                          ("99", "converts to opsets 7 to"), ("6", "converts to opsets 7 to")])
def test_bad_values_exit_2_with_one_line(tmp_path, cli, value, words):
    path = tmp_path / "m.onnx"
    onnx.save(rms_model(), path)
    code, _, err = cli("compile", path, "--opset", value, "-o", tmp_path / "out.onnx")
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_cli_bump_writes_the_standard_op(tmp_path, cli):
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(rms_model(), path)
    code, _, err = cli("compile", path, "-O3", "--ops", "standard", "--opset", "23", "-o", out)
    assert code == 0, err
    model = onnx.load(out)
    assert op_histogram(model) == {"RMSNormalization": 1} and opset_mod.model_opset(model) == 23


def test_a_model_the_converter_cannot_convert_is_a_usage_error(monkeypatch):
    def fail(model, version):
        raise RuntimeError("No Adapter For Foo\nmore lines")

    monkeypatch.setattr(opset_mod.onnx.version_converter, "convert_version", fail)
    with pytest.raises(UsageError, match=r"--opset 23; converting this opset-17 model failed: No Adapter For Foo$"):
        infoptc.compile(rms_model(), opset=23)


def test_a_conversion_that_changes_the_outputs_is_refused(monkeypatch):
    real = onnx.version_converter.convert_version

    def wrong(model, version):
        converted = real(model, version)
        w = next(i for i in converted.graph.initializer if i.name == "w")
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2, "w"))
        return converted

    monkeypatch.setattr(opset_mod.onnx.version_converter, "convert_version", wrong)
    with pytest.raises(VerificationError, match="opset-23 model differs from the original"):
        infoptc.compile(rms_model(), opset=23)


@pytest.mark.parametrize("name, exporter", [("gpt2", "torchscript"), ("bert", "torchscript")])
def test_real_export_fixtures_get_standard_attention_after_the_bump(name, exporter):
    """The committed tiny torch.onnx exports (opset 17): standard Attention only after --opset 23."""
    fixtures = Path(__file__).resolve().parent / "fixtures" / "real_exports"
    sys.path.insert(0, str(fixtures))
    from make_fixtures import TINY, fixture_path

    from golden_models import real_exports

    path = fixture_path(name, exporter, 17)
    original = onnx.load(str(path))
    layers = next(TINY[name][k] for k in ("num_hidden_layers", "n_layer") if k in TINY[name])
    before = op_histogram(infoptc.optimize(str(path), opt_level=3, ops="standard"))
    art = infoptc.compile(str(path), opt_level=3, ops="standard", opset=23)
    hist = op_histogram(art.model)
    assert "Attention" not in before and hist["Attention"] == layers and not any("::" in op for op in hist)
    inputs = [real_exports.example_inputs(name, batch=2, seq=12, seed=s, overrides=TINY[name]) for s in (0, 1)]
    check_equivalent(original, art.model, Contract.REASSOCIATING, feeds=inputs)
