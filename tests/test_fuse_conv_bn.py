"""fuse-conv-bn: BatchNormalization and per-channel Mul/Add folded into Conv."""

from __future__ import annotations

import infoptc
import numpy as np
import onnx
import pytest
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract
from infoptc.verify import check_equivalent
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
RNG = np.random.default_rng(7)


def vi(name, shape):
    return helper.make_tensor_value_info(name, F, shape)


def const(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def make(nodes, inits, extra_inputs=(), outputs=("y",)):
    graph = helper.make_graph(nodes, "g", [vi("x", [1, 3, 8, 8]), *extra_inputs],
                              [vi(o, [1, 4, 8, 8]) for o in outputs], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def conv(bias=True, out="c"):
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    return helper.make_node("Conv", inputs, [out], kernel_shape=[3, 3], pads=[1, 1, 1, 1])


def conv_params():
    return [const("w", RNG.standard_normal((4, 3, 3, 3))), const("b", RNG.standard_normal(4))]


def bn_params(prefix="bn"):
    return [const(f"{prefix}_scale", RNG.uniform(0.5, 1.5, 4)), const(f"{prefix}_bias", RNG.standard_normal(4)),
            const(f"{prefix}_mean", RNG.standard_normal(4)), const(f"{prefix}_var", RNG.uniform(0.5, 2.0, 4))]


def bn(src="c", out="y", mean="bn_mean"):
    return helper.make_node("BatchNormalization", [src, "bn_scale", "bn_bias", mean, "bn_var"], [out], epsilon=1e-3)


def fuse(model):
    art = infoptc.compile(model, passes="fuse-conv-bn")
    return art.model, art.pass_records[0].counters


@pytest.mark.parametrize("bias", [True, False])
def test_batch_norm_folds_into_conv(bias):
    model = make([conv(bias), bn()], conv_params() + bn_params())
    out, counters = fuse(model)
    assert op_histogram(out) == {"Conv": 1}
    assert counters["fused"] == 1 and counters["conv_bn"] == 1
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_per_channel_mul_and_add_fold_into_conv():
    nodes = [conv(bias=False), helper.make_node("Mul", ["c", "s"], ["m"]), helper.make_node("Add", ["t", "m"], ["y"])]
    inits = conv_params()[:1] + [const("s", RNG.uniform(0.5, 2, (4, 1, 1))), const("t", RNG.standard_normal((1, 4, 1, 1)))]
    model = make(nodes, inits)
    out, counters = fuse(model)
    assert op_histogram(out) == {"Conv": 1}
    assert counters == {"fused": 2, "conv_bn": 0, "conv_mul": 1, "conv_add": 1}
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_shared_conv_output_is_not_folded():
    model = make([conv(), bn(), helper.make_node("Relu", ["c"], ["r"])], conv_params() + bn_params(),
                 outputs=("y", "r"))
    out, counters = fuse(model)
    assert op_histogram(out) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    assert counters["fused"] == 0 and counters["rejected"] == 1


@pytest.mark.parametrize("level", ["2", "3"])
def test_equal_convs_with_their_own_batch_norms_fold_before_cse_merges_them(level):
    # Two branches whose convs read equal weights (ONNX's light models: every weight is 0.02):
    # cse + dedup-initializers would merge the convs into one feeding both batch norms, which
    # could then absorb neither. The -O levels fold batch norms first, inside the fixpoint.
    w, b = conv_params()
    copies = [const("w2", numpy_helper.to_array(w)), const("b2", numpy_helper.to_array(b))]
    nodes = [conv(out="c"), helper.make_node("Conv", ["x", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             bn(), helper.make_node("BatchNormalization", ["c2", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"], ["y2"],
                                    epsilon=1e-3)]
    model = make(nodes, [w, b, *copies, *bn_params(), *bn_params("bn2")], outputs=("y", "y2"))
    out = infoptc.optimize(model, opt_level=level)
    assert op_histogram(out) == {"Conv": 2}
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_non_constant_statistics_are_not_folded():
    model = make([conv(), bn(mean="m_in")], conv_params() + bn_params(), extra_inputs=[vi("m_in", [4])])
    out, _ = fuse(model)
    assert op_histogram(out) == {"Conv": 1, "BatchNormalization": 1}


def test_spatially_varying_multiplier_is_not_folded():
    nodes = [conv(), helper.make_node("Mul", ["c", "s"], ["y"])]
    model = make(nodes, conv_params() + [const("s", RNG.standard_normal((1, 1, 1, 8)))])
    out, counters = fuse(model)
    assert op_histogram(out) == {"Conv": 1, "Mul": 1}
    assert counters["rejected"] == 1


@pytest.mark.parametrize("name, batch_norms", [("resnet", 15), ("mobilenet", 22)])
def test_golden_cnns_lose_every_batch_norm(golden, name, batch_norms):
    model = onnx.load(golden(name))
    assert op_histogram(model)["BatchNormalization"] == batch_norms
    out, counters = fuse(model)
    assert "BatchNormalization" not in op_histogram(out)
    assert counters["conv_bn"] == batch_norms
    assert op_histogram(out)["Conv"] == op_histogram(model)["Conv"]
    if name == "resnet":
        check_equivalent(model, out, Contract.REASSOCIATING)
