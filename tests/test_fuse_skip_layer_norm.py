"""fuse-skip-layer-norm: residual Add (+ bias) + LayerNormalization -> com.microsoft SkipLayerNormalization."""

from __future__ import annotations

import infoptc
import numpy as np
import pytest
from infoptc import ir
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract, PassContext
from infoptc.passes.fuse import fuse_skip_layer_norm
from infoptc.pattern import explain
from infoptc.verify import check_equivalent
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
H = 8
RNG = np.random.default_rng(3)


def residual_model(bias=True, beta=True, sum_read=False, skip_shape=(2, 5, H)):
    """y = LayerNorm(x @ W (+ b) + r) as a post-norm (BERT) block; ``sum_read``: the residual
    sum also leaves the block (pre-norm: it is the next residual)."""
    inits = [numpy_helper.from_array(RNG.standard_normal((H, H)).astype(np.float32), "W"),
             numpy_helper.from_array(RNG.standard_normal(H).astype(np.float32), "b"),
             numpy_helper.from_array(RNG.uniform(0.5, 1.5, H).astype(np.float32), "gamma"),
             numpy_helper.from_array(RNG.standard_normal(H).astype(np.float32), "beta")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="/dense/MatMul")]
    last = "m"
    if bias:
        nodes.append(helper.make_node("Add", ["b", "m"], ["mb"], name="/dense/Add"))  # bias first, as torch writes it
        last = "mb"
    nodes.append(helper.make_node("Add", [last, "r"], ["s"], name="/Add"))
    affine = ["gamma", "beta"] if beta else ["gamma"]
    nodes.append(helper.make_node("LayerNormalization", ["s", *affine], ["y"], name="/LayerNorm", axis=-1,
                                  epsilon=1e-5))
    outputs = [helper.make_tensor_value_info("y", F, [2, 5, H])]
    if sum_read:
        outputs.append(helper.make_tensor_value_info("s", F, [2, 5, H]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 5, H]),
                                           helper.make_tensor_value_info("r", F, list(skip_shape))], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def fuse(model, passes="fuse-skip-layer-norm{device=gpu}", **kw):
    art = infoptc.compile(model, passes=passes, **kw)
    return art.model, art.pass_records[0].counters


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("beta", [True, False])
def test_residual_add_and_layer_norm_become_one_op(bias, beta):
    model = residual_model(bias=bias, beta=beta)
    out, counters = fuse(model)
    assert op_histogram(out) == {"MatMul": 1, "com.microsoft::SkipLayerNormalization": 1}
    assert counters == {"fused": 1, "skip_layer_norm": 1}
    skip = next(n for n in out.graph.node if n.op_type == "SkipLayerNormalization")
    assert (skip.input[4] == "b") == bias and (skip.input[3] == "beta") == beta
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_the_residual_sum_keeps_its_other_readers():
    model = residual_model(sum_read=True)
    out, _ = fuse(model)
    skip = next(n for n in out.graph.node if n.op_type == "SkipLayerNormalization")
    assert skip.output[3] == "s" and [o.name for o in out.graph.output] == ["y", "s"]
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


@pytest.mark.parametrize("sum_read", [False, True])
def test_for_the_cpu_provider_add_and_layer_norm_stay_with_the_reason(sum_read):
    """ONNX Runtime's CPU SkipLayerNormalization is slower than the Add + LayerNormalization it
    runs otherwise (ViT-Ti -O3 was 1.16x the original, BERT 1.07x)."""
    model = residual_model(sum_read=sum_read)
    out, counters = fuse(model, passes="fuse-skip-layer-norm")
    assert op_histogram(out)["LayerNormalization"] == 1 and counters["rejected"] == 1
    graph = ir.to_graph(ir.infer_shapes(model))
    ln = next(n for n in graph.nodes if n.op == "LayerNormalization")
    why = explain(fuse_skip_layer_norm.RULES[0], graph, ln, PassContext(opset=17, target="onnx"))
    assert "CPU SkipLayerNormalization kernel is slower" in why and "device=gpu" in why


def test_a_broadcast_skip_is_left_alone_with_the_reason():
    model = residual_model(bias=False, skip_shape=(1, 5, H))
    out, counters = fuse(model)
    assert "com.microsoft::SkipLayerNormalization" not in op_histogram(out) and counters["rejected"] == 1
    graph = ir.to_graph(ir.infer_shapes(model))
    ln = next(n for n in graph.nodes if n.op == "LayerNormalization")
    why = explain(fuse_skip_layer_norm.RULES[0], graph, ln, PassContext(opset=17, target="onnx"),
                  options={"device": "gpu"})
    assert "not provably of one shape" in why


def test_standard_policy_and_other_targets_keep_the_standard_ops():
    model = residual_model()
    for kw in ({"ops": "standard"},):
        out, counters = fuse(model, **kw)
        assert op_histogram(out)["LayerNormalization"] == 1 and counters["rejected"] == 1
    graph = ir.to_graph(ir.infer_shapes(model))
    ln = next(n for n in graph.nodes if n.op == "LayerNormalization")
    why = explain(fuse_skip_layer_norm.RULES[0], graph, ln, PassContext(opset=17, target="llvm"))
    assert "contrib ops are not allowed (ops 'ort', target 'llvm')" in why
