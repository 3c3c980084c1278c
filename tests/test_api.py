"""The Python API mirrors the CLI, and library code is quiet."""

from __future__ import annotations

import numpy as np
import onnx

import infoptc
from infoptc.verify import random_inputs, run_onnx

from _models import chain


def test_compile_returns_a_runnable_saveable_artifact(tmp_path, capfd):
    art = infoptc.compile(chain(), target="onnx", opt_level=2)
    feeds = random_inputs(chain(), seed=3)
    expected = run_onnx(chain(), feeds)
    np.testing.assert_array_equal(art.run(feeds)["y"], expected["y"])
    art.save(tmp_path / "a.onnx")
    again = infoptc.load(tmp_path / "a.onnx")
    np.testing.assert_array_equal(again.run(feeds)["y"], expected["y"])
    assert [s.name for s in again.inputs] == ["x"] and again.outputs[0].shape == ("batch", 3)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # library code never prints


def test_artifacts_have_a_repr():
    art = infoptc.compile(chain(), target="onnx")
    assert repr(art) == (f"<OnnxArtifact target='onnx' inputs=(x: float32[batch, 4]) outputs=(y: float32[batch, 3]) "
                         f"size={art.size_bytes():,} B>")


def test_optimize_returns_a_model_proto(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(chain(), path)
    m = infoptc.optimize(str(path), opt_level=2)
    assert isinstance(m, onnx.ModelProto)
    assert [n.op_type for n in m.graph.node] == ["MatMul", "Relu"]
    onnx.checker.check_model(m, full_check=True)


def test_explicit_pipeline_and_input_shape_binding():
    m = infoptc.optimize(chain(), passes="dce", input_shapes={"x": (5, 4)})
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [5, 4]
    assert len(m.graph.node) == 5  # only the dead Neg went


def test_golden_mlp_runs_end_to_end(golden):
    art = infoptc.compile(golden("mlp"), opt_level=2)
    m = onnx.load(golden("mlp"))
    feeds = random_inputs(m, seed=0)
    np.testing.assert_array_equal(art.run(feeds)["y"], run_onnx(m, feeds)["y"])
    ops = {n.op_type for n in art.model.graph.node}
    assert not ops & {"Identity", "Dropout"}


def test_verify_each_with_bound_input_shapes(golden):
    art = infoptc.compile(golden("mlp"), opt_level=2, input_shapes={"x": (3, 64)}, verify_each=True)
    assert [d.dim_value for d in art.model.graph.input[0].type.tensor_type.shape.dim] == [3, 64]
