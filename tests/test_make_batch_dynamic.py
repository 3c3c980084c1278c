"""make-batch-dynamic: a fixed batch of 1 becomes symbolic where the graph allows it. At batch 1
the outputs are the original's bit for bit; at batch n they are the original's run n times, one
sample each; where the graph would mix samples (or cannot keep the batch) it refuses, naming why."""

from __future__ import annotations

import infoptc
import numpy as np
import onnx
import pytest
from infoptc.errors import CompileError
from infoptc.passes.shape.make_batch_dynamic import make_batch_dynamic
from infoptc.verify import run_onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def conv_reshape_gemm(reshape_to=(1, -1), allowzero=0):
    """x[1,3,8,8] -> Conv -> Relu -> Reshape(hard-coded batch 1) -> Gemm: what -O2's fold-shapes leaves."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(reshape_to, dtype=np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((4 * 8 * 8, 5)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["flat"], name="flatten", allowzero=allowzero),
             helper.make_node("Gemm", ["flat", "fc"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", F, [1, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def samples(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(n)]


def test_the_batch_becomes_symbolic_and_the_reshape_keeps_it():
    model = conv_reshape_gemm()
    out = infoptc.optimize(model, passes="make-batch-dynamic")
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 8, 8]
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    xs = samples(5)
    for x in xs[:2]:  # batch 1: the original's bits
        assert np.array_equal(run_onnx(out, {"x": x})["y"], run_onnx(model, {"x": x})["y"])
    for n in (2, 5):  # batch n: the original run once per sample
        got = run_onnx(out, {"x": np.concatenate(xs[:n])})["y"]
        want = np.concatenate([run_onnx(model, {"x": x})["y"] for x in xs[:n]])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # the kernels may block n rows differently


def test_it_counts_the_fixed_reshapes():
    _, why, fixed = make_batch_dynamic(conv_reshape_gemm())
    assert fixed == 1 and "1 Reshape constant(s) fixed" in why


def test_allowzero_with_a_minus_one_is_refused_naming_the_reshape():
    done, why, _ = make_batch_dynamic(conv_reshape_gemm(allowzero=1))
    assert done is None and "flatten" in why and "allowzero" in why
    with pytest.raises(CompileError, match="flatten"):
        infoptc.optimize(conv_reshape_gemm(allowzero=1), passes="make-batch-dynamic")


def test_a_reshape_that_folds_the_batch_away_is_refused_naming_the_output():
    # [1,3,8,8] -> [3, 64]: the batch joins another axis; no constant can keep it at axis 0
    done, why, _ = make_batch_dynamic(conv_reshape_gemm((4, -1)))
    assert done is None and "y" in why and "axis 0" in why


def test_a_graph_that_mixes_samples_is_refused():
    # softmax over the batch axis: every shape stays right, the numbers do not
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=0)], "g",
                              [helper.make_tensor_value_info("x", F, [1, 4])],
                              [helper.make_tensor_value_info("y", F, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    done, why, _ = make_batch_dynamic(model)
    assert done is None and "mixes samples" in why
    assert make_batch_dynamic(model, check=False)[0] is not None  # shapes alone cannot tell


def test_other_leading_dims_are_refused_and_symbolic_ones_left_alone(golden):
    done, why, _ = make_batch_dynamic(onnx.load(golden("control_flow")))  # x: [2, 8]
    assert done is None and "x (2)" in why
    mlp = onnx.load(golden("mlp"))  # already [batch, 64]
    assert make_batch_dynamic(mlp)[1] == "the batch dimension is symbolic already"
    assert infoptc.optimize(mlp, passes="make-batch-dynamic", opt_level=0).graph.input[0] == mlp.graph.input[0]


def test_a_golden_cnn_after_o2(golden):
    model = onnx.load(golden("resnet"))
    optimized = infoptc.optimize(model, passes="default<O2>,make-batch-dynamic")
    xs = [np.random.default_rng(i).standard_normal((1, 3, 224, 224)).astype(np.float32) for i in range(3)]
    got = run_onnx(optimized, {"input": np.concatenate(xs)})["logits"]
    want = np.concatenate([run_onnx(model, {"input": x})["logits"] for x in xs])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # O2 reassociates (conv-bn folding)


def test_a_batch_1_constant_concatenated_with_batched_tensors_is_expanded_to_the_batch():
    """A ViT's class token: Concat(cls[1,1,D], x[1,N,D], axis=1) would stay batch 1 forever."""
    rng = np.random.default_rng(3)
    cls = numpy_helper.from_array(rng.standard_normal((1, 1, 4)).astype(np.float32), "cls")
    nodes = [helper.make_node("Concat", ["cls", "x"], ["tokens"], name="with_cls", axis=1),
             helper.make_node("Relu", ["tokens"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3, 4])],
                              [helper.make_tensor_value_info("y", F, [1, 4, 4])], [cls])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    done, why, count = make_batch_dynamic(model)
    assert done is not None and count == 1 and "1 batch-1 Concat input(s) expanded" in why
    onnx.checker.check_model(done, full_check=True)
    xs = [rng.standard_normal((1, 3, 4)).astype(np.float32) for _ in range(3)]
    got = run_onnx(done, {"x": np.concatenate(xs)})["y"]
    assert np.array_equal(got, np.concatenate([run_onnx(model, {"x": x})["y"] for x in xs]))  # copies only
