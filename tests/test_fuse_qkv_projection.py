"""fuse-qkv-projection: q/k/v projections of one input + MultiHeadAttention -> packed com.microsoft Attention."""

from __future__ import annotations

import infoptc
import numpy as np
import pytest
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract
from infoptc.verify import check_equivalent
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
HIDDEN, HEADS, S = 16, 2, 5
RNG = np.random.default_rng(13)


def mha_model(biased=(True, True, True), masked=True, cross=False, q_scale=None):
    """What fuse-attention leaves: three projections and MultiHeadAttention (BERT: all biased;
    Whisper's k_proj: no bias); ``cross``: k and v project another input."""
    inits, nodes = [], []
    for name, on in zip("qkv", biased):
        inits.append(numpy_helper.from_array((RNG.standard_normal((HIDDEN, HIDDEN)) * 0.3).astype(np.float32), f"W{name}"))
        src = "y" if cross and name != "q" else "x"
        nodes.append(helper.make_node("MatMul", [src, f"W{name}"], [f"m{name}"]))
        if on:
            inits.append(numpy_helper.from_array(RNG.standard_normal(HIDDEN).astype(np.float32), f"b{name}"))
            nodes.append(helper.make_node("Add", [f"b{name}", f"m{name}"], [name]))  # bias first, as torch writes it
        else:
            nodes.append(helper.make_node("Identity", [f"m{name}"], [name]))
    if q_scale is not None:  # Whisper: q_proj(x) * scaling
        inits.append(numpy_helper.from_array(np.float32(q_scale), "c"))
        nodes.append(helper.make_node("Mul", ["q", "c"], ["qs"]))
    inputs = [helper.make_tensor_value_info("x", F, ["batch", S, HIDDEN])]
    if cross:
        inputs.append(helper.make_tensor_value_info("y", F, ["batch", S, HIDDEN]))
    mha_inputs = ["q" if q_scale is None else "qs", "k", "v"]
    if masked:
        inputs.append(helper.make_tensor_value_info("bias", F, ["batch", 1, S, S]))
        mha_inputs += ["", "", "bias"]
    nodes.append(helper.make_node("MultiHeadAttention", mha_inputs, ["out"], domain="com.microsoft", num_heads=HEADS))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", F, ["batch", S, HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def fuse(model, **kw):
    art = infoptc.compile(model, passes="eliminate-noops,fuse-qkv-projection", **kw)
    return art.model, art.pass_records[-1].counters


@pytest.mark.parametrize("biased", [(True, True, True), (True, False, True), (False, False, False)])
@pytest.mark.parametrize("masked", [True, False])
def test_projections_pack_into_one_attention(biased, masked):
    model = mha_model(biased, masked)
    out, counters = fuse(model)
    assert op_histogram(out) == {"com.microsoft::Attention": 1} and counters == {"fused": 1, "pack_qkv": 1}
    attention = out.graph.node[0]
    assert (attention.input[5] == "bias") == masked
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_a_scaled_query_folds_its_scale_into_the_packed_weights():
    model = mha_model((True, False, True), q_scale=0.125)
    out, counters = fuse(model)
    assert op_histogram(out) == {"com.microsoft::Attention": 1} and counters["pack_qkv"] == 1
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_cross_attention_and_the_standard_policy_stay():
    out, _ = fuse(mha_model(cross=True))
    assert op_histogram(out)["com.microsoft::MultiHeadAttention"] == 1
    out, counters = fuse(mha_model(), ops="standard")
    assert op_histogram(out)["com.microsoft::MultiHeadAttention"] == 1 and counters["rejected"] == 1
