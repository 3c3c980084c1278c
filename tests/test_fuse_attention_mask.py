"""fuse-attention-mask: a padding mask built into an additive attention bias -> Attention's mask_index."""

from __future__ import annotations

import sys
from pathlib import Path

import infoptc
import numpy as np
import onnx
import pytest
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract
from infoptc.pipelines import OPT_LEVELS
from infoptc.verify import check_equivalent
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "real_exports"
sys.path.insert(0, str(FIXTURES))
sys.path.insert(0, str(ROOT))

from golden_models import real_exports  # noqa: E402
from make_fixtures import TINY, fixture_path  # noqa: E402

B, S, HID, HEADS = 2, 6, 8, 2
MIN = float(np.finfo(np.float32).min)
RNG = np.random.default_rng(11)


def attention_model(axes=(1, 2), causal=False, fill=MIN):
    """Attention(x) with the bias Where(mask[:, None, None, :], 0, fill) expanded to [B, 1, S, S] (axes: where the
    Unsqueeze puts the mask's new axes); ``causal`` also Ands in j <= i, which is no padding mask."""
    inits = [numpy_helper.from_array(RNG.standard_normal((HID, 3 * HID)).astype(np.float32) * 0.5, "W"),
             numpy_helper.from_array(RNG.standard_normal(3 * HID).astype(np.float32) * 0.1, "b"),
             numpy_helper.from_array(np.array(axes, np.int64), "axes"),
             numpy_helper.from_array(np.float32(0.0), "zero"), numpy_helper.from_array(np.float32(fill), "fill")]
    nodes = [helper.make_node("Cast", ["attention_mask"], ["c"], to=TensorProto.BOOL, name="/Cast"),
             helper.make_node("Unsqueeze", ["c", "axes"], ["c4"], name="/Unsqueeze")]
    cond = "c4"
    if causal:
        inits += [numpy_helper.from_array(np.tril(np.ones((S, S), bool))[None, None], "tril")]
        nodes.append(helper.make_node("And", ["c4", "tril"], ["cc"], name="/And"))
        cond = "cc"
    inits.append(numpy_helper.from_array(np.array([B, 1, S, S], np.int64), "bias_shape"))
    nodes += [helper.make_node("Where", [cond, "zero", "fill"], ["bias1"], name="/Where"),
              helper.make_node("Expand", ["bias1", "bias_shape"], ["bias"], name="/Expand"),
              helper.make_node("Attention", ["x", "W", "b", "", "", "bias"], ["y"], domain="com.microsoft",
                               num_heads=HEADS, name="/Attention")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, HID]),
                                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, S])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, HID])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def masks() -> list[dict]:
    """Padding at the end, a fully padded row, holes, and values other than 0 / 1 (nonzero keeps)."""
    x = RNG.standard_normal((B, S, HID)).astype(np.float32)
    out = []
    for m in (np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]), np.array([[0] * S, [1, 0, 1, 0, 7, -1]])):
        out.append({"x": x, "attention_mask": m.astype(np.int64)})
    return out


def fuse(model, **kw):
    art = infoptc.compile(model, passes="fuse-attention-mask", **kw)
    return art.model, art.pass_records[0].counters, art


def test_an_unsqueezed_padding_mask_becomes_mask_index():
    model = attention_model()
    out, counters, _ = fuse(model)
    assert counters["fused"] == 1
    assert op_histogram(out) == {"Cast": 2, "com.microsoft::Attention": 1}
    attn = next(n for n in out.graph.node if n.op_type == "Attention")
    assert len(attn.input) == 4 and attn.input[3]
    assert helper.get_attribute_value(next(a for a in attn.attribute if a.name == "mask_filter_value")) == MIN
    check_equivalent(model, out, Contract.REASSOCIATING, feeds=masks())


@pytest.mark.parametrize("case, why", [
    ("query_axis", "is not unsqueezed to [B, 1, 1, T]"),
    ("causal", "operands that are not provably true"),
    ("small_fill", "is not a large finite negative number"),
])
def test_other_biases_stay_with_the_reason(case, why):
    model = {"query_axis": lambda: attention_model(axes=(1, 3)), "causal": lambda: attention_model(causal=True),
             "small_fill": lambda: attention_model(fill=-1.0)}[case]()
    out, counters, art = fuse(model)
    assert counters["fused"] == 0 and counters["rejected"] == 1
    assert op_histogram(out)["Where"] == 1
    assert why in art.reports["fuse-attention-mask"]["rejected"]["attention_mask"]


def test_standard_policy_leaves_the_bias():
    out, counters, _ = fuse(attention_model(), ops="standard")
    assert counters["fused"] == 0 and op_histogram(out)["Where"] == 1


@pytest.mark.parametrize("name, exporter, opset", [("bert", "torchscript", 17), ("bert", "dynamo", 20)])
def test_transformers_vmap_mask_of_an_export(name, exporter, opset):
    """transformers 5's padding mask (TorchScript: index arithmetic over the flattened mask;
    dynamo: GatherND of (b, j) pairs; an Expand per layer) becomes the mask input of each
    layer's Attention, and about 40 nodes go."""
    path = fixture_path(name, exporter, opset)
    original = onnx.load(str(path))
    without = infoptc.optimize(str(path), passes=OPT_LEVELS["O3"].replace(",fuse-attention-mask", ""))
    art = infoptc.compile(str(path), opt_level=3)
    record = next(r for r in art.pass_records if r.name == "fuse-attention-mask")
    layers = TINY[name]["num_hidden_layers"]
    assert record.counters["fused"] == layers
    attns = [n for n in art.model.graph.node if n.op_type == "Attention"]
    assert len(attns) == layers and all(len(a.input) == 4 and a.input[3] for a in attns)
    assert op_histogram(without)["Where"] > op_histogram(art.model)["Where"]  # the bias's and its shape's
    assert len(art.model.graph.node) <= len(without.graph.node) - 20
    feeds = [real_exports.example_inputs(name, batch=3, seq=12, seed=s, overrides=TINY[name]) for s in (0, 1)]
    feeds[1]["attention_mask"][1, :] = 0  # a fully padded row
    check_equivalent(original, art.model, Contract.REASSOCIATING, feeds=feeds)
