"""FLOPs estimates (compiler/analysis.py): right on models with symbolic dims, and "unknown"
with a reason, never a silently wrong count, where shapes cannot be inferred."""

from __future__ import annotations

import sys

import pytest

from infoptc import analysis


def test_flops_of_a_model_with_symbolic_dims(golden):
    """BERT's shapes come from Shape/Gather/Concat/Reshape chains that only ONNX Runtime's
    symbolic shape inference resolves; it needs sympy, which the package must declare (ONNX
    Runtime >= 1.32 no longer brings it)."""
    import onnx

    model = onnx.load(golden("bert"))
    assert analysis.estimate_flops(model) == 3_175_681  # batch = seq = 1 (inspect: 3.18 M)
    flops = analysis.estimate_flops(model, {"batch": 1, "seq": 128})
    assert 400e6 < flops < 480e6  # the README's bench table: 440 M


def test_flops_unknown_says_why(golden, monkeypatch):
    import onnx

    monkeypatch.setitem(sys.modules, "sympy", None)  # as on an install without sympy
    monkeypatch.delitem(sys.modules, "onnxruntime.tools.symbolic_shape_infer", raising=False)
    model = onnx.load(golden("bert"))
    with pytest.raises(analysis.FlopsUnknown, match="no shape inferred for .*symbolic shape inference is "
                                                    "unavailable .*sympy"):
        analysis.estimate_flops(model)
    summary = analysis.summarize(model)
    assert summary.flops is None and "sympy" in summary.flops_unknown


def test_skeleton_counts_the_same_flops(golden):
    import onnx

    model = onnx.load(golden("bert"))
    light = analysis.skeleton(model)
    assert light.ByteSize() < model.ByteSize() / 50
    assert analysis.estimate_flops(light, {"seq": 16}) == analysis.estimate_flops(model, {"seq": 16})


def test_incomplete_inference_writes_no_file(tmp_path, monkeypatch):
    """ONNX Runtime's infer_shapes saves sym_shape_infer_temp.onnx in the current folder when a
    shape stays unknown; the estimate must leave the user's folder alone."""
    import numpy as np
    from onnx import TensorProto, helper

    from _models import model

    monkeypatch.chdir(tmp_path)
    nodes = [helper.make_node("Frob", ["x"], ["f"], domain="org.nowhere"), helper.make_node("Relu", ["f"], ["y"])]
    m = model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m.opset_import.append(helper.make_opsetid("org.nowhere", 1))
    with pytest.raises(analysis.FlopsUnknown, match="no shape inferred for 'f'"):
        analysis.estimate_flops(m)
    assert list(tmp_path.iterdir()) == []
    assert np.isfinite(analysis.estimate_flops(model([helper.make_node("Relu", ["x"], ["y"])],
                                                     [helper.make_tensor_value_info("x", 1, ["n", 4])],
                                                     [helper.make_tensor_value_info("y", 1, ["n", 4])])))
