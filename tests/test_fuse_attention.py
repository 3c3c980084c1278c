"""fuse-attention: exported attention blocks -> MultiHeadAttention (com.microsoft) or Attention (opset 23)."""

from __future__ import annotations

import infoptc
import numpy as np
import onnx
import pytest
from infoptc import ir
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract, PassContext, get_pass
from infoptc.passes.fuse.fuse_attention import RULES
from infoptc.pattern import explain
from infoptc.verify import OrtRunner, check_equivalent, compare_outputs
from onnx import TensorProto, helper, numpy_helper

import golden_models

F, I64 = TensorProto.FLOAT, TensorProto.INT64
HEADS, SIZE = 2, 4
HIDDEN = HEADS * SIZE


class Builder:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def op(self, op_type, *inputs, outputs=1, **attrs):
        self.n += 1
        outs = [f"{op_type}_{self.n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"/attn/{op_type}_{self.n}", **attrs))
        return outs[0] if outputs == 1 else outs

    def c(self, value, dtype=np.float32):
        self.n += 1
        name = f"const_{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def dim(self, x, i):  # the exporter's x.size(i): Shape -> Gather -> Unsqueeze
        return self.op("Unsqueeze", self.op("Gather", self.op("Shape", x), self.c(i, np.int64), axis=0),
                       self.c([0], np.int64))

    def split_heads(self, x, perm, constant_shape=None):
        shape = (self.c(constant_shape, np.int64) if constant_shape is not None else
                 self.op("Concat", self.dim(x, 0), self.dim(x, 1), self.c([HEADS], np.int64),
                         self.c([SIZE], np.int64), axis=0))
        return self.op("Transpose", self.op("Reshape", x, shape), perm=perm)


def attention_model(style="bert", opset=17, scale="div", softmax_axis=-1, fill=None, probs_output=False,
                    constant_shape=None, rotary=False):
    """q/k/v projections of x, head split, scores, mask, Softmax, context, merge: as bert.py / gpt.py emit."""
    b = Builder()
    rng = np.random.default_rng(1)
    proj = {n: b.op("MatMul", "x", b.c(rng.standard_normal((HIDDEN, HIDDEN)) * 0.5)) for n in "qkv"}
    qh = b.split_heads(proj["q"], [0, 2, 1, 3], constant_shape)
    if rotary:  # something computed on the split heads, as Llama's rotary embedding: q*cos + rot(q)*sin
        qh = b.op("Add", b.op("Mul", qh, b.c(np.full(SIZE, 0.9))), b.op("Mul", qh, b.c(np.full(SIZE, 0.1))))
    vh = b.split_heads(proj["v"], [0, 2, 1, 3])
    if style == "gpt":
        kt = b.op("Transpose", b.split_heads(proj["k"], [0, 2, 1, 3]), perm=[0, 1, 3, 2])
    else:
        kt = b.split_heads(proj["k"], [0, 2, 3, 1])
    scores = b.op("MatMul", qh, kt)
    if scale == "div":
        scores = b.op("Div", scores, b.c(np.sqrt(SIZE)))
    elif scale == "mul":
        scores = b.op("Mul", b.c(1 / np.sqrt(SIZE)), scores)
    if style == "bert":
        scores = b.op("Add", scores, "mask")
    elif style == "gpt":  # causal mask rebuilt from the scores' shape, applied with Where
        n = b.op("Gather", b.op("Shape", scores), b.c(-1, np.int64), axis=0)
        r = b.op("Range", b.c(0, np.int64), n, b.c(1, np.int64))
        causal = b.op("LessOrEqual", b.op("Unsqueeze", r, b.c([0], np.int64)), b.op("Unsqueeze", r, b.c([1], np.int64)))
        scores = b.op("Where", causal, scores, b.c(np.finfo(np.float32).min if fill is None else fill))
    probs = b.op("Softmax", scores, axis=softmax_axis)
    merged = b.op("Transpose", b.op("MatMul", probs, vh), perm=[0, 2, 1, 3])
    shape = b.op("Concat", b.dim(merged, 0), b.dim(merged, 1), b.c([HIDDEN], np.int64), axis=0)
    b.nodes.append(helper.make_node("Reshape", [merged, shape], ["y"], name="/attn/Reshape_out"))
    inputs = [helper.make_tensor_value_info("x", F, ["batch", "seq", HIDDEN])]
    if style == "bert":
        inputs.append(helper.make_tensor_value_info("mask", F, ["batch", 1, 1, "seq"]))
    outputs = [helper.make_tensor_value_info("y", F, ["batch", "seq", HIDDEN])]
    if probs_output:
        outputs.append(helper.make_tensor_value_info(probs, F, ["batch", HEADS, "seq", "seq"]))
    graph = helper.make_graph(b.nodes, "g", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 23 else 8
    return model


def fuse(model, passes="fuse-attention"):
    art = infoptc.compile(model, passes=passes)
    return art.model, art.pass_records[-1].counters


@pytest.mark.parametrize("style, scale", [("bert", "div"), ("gpt", "div"), ("bert", "mul"), ("plain", "none")])
def test_attention_becomes_multi_head_attention_below_opset_23(style, scale):
    model = attention_model(style, scale=scale)
    out, counters = fuse(model)
    hist = op_histogram(out)
    assert hist["com.microsoft::MultiHeadAttention"] == 1 and counters == {"fused": 1, "attention": 1, "attention_past": 0}
    assert not {"Softmax", "Transpose", "Reshape"} & set(hist)
    mha = next(n for n in out.graph.node if n.op_type == "MultiHeadAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
    assert attrs["num_heads"] == HEADS and attrs["scale"] == pytest.approx(1 / np.sqrt(SIZE) if scale != "none" else 1)
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


@pytest.mark.parametrize("style", ["bert", "gpt"])
def test_standard_attention_at_opset_23(style):
    model = attention_model(style, opset=23)
    out, counters = fuse(model)
    assert op_histogram(out)["Attention"] == 1 and "Softmax" not in op_histogram(out)
    assert counters["attention"] == 1
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


@pytest.mark.parametrize("case", ["probs_used", "softmax_axis", "weak_fill", "fixed_batch_shape"])
def test_not_fused(case):
    model = {
        "probs_used": lambda: attention_model(probs_output=True),
        "softmax_axis": lambda: attention_model(softmax_axis=2),
        "weak_fill": lambda: attention_model("gpt", fill=-10.0),  # Where(-10) is not a mask: it changes weights
        "fixed_batch_shape": lambda: attention_model(constant_shape=[2, -1, HEADS, SIZE]),
    }[case]()
    out, counters = fuse(model)
    assert counters["fused"] == 0 and op_histogram(out)["Softmax"] == 1
    graph = ir.to_graph(ir.infer_shapes(model))
    root = next(n for n in graph.nodes if n.name == "/attn/Reshape_out")
    why = explain(RULES[0], graph, root, PassContext(opset=17, target="onnx"))
    assert {"probs_used": "is a graph output", "softmax_axis": "attribute axis=2", "weak_fill": "Where fills masked",
            "fixed_batch_shape": "sets dim 0 to 2"}[case] in why


def test_an_attention_block_no_pattern_describes_says_why_in_stats():
    """Something computed on the split heads that is not transformers' rotate_half (the rotary
    the patterns describe, tests/test_fuse_attention_llama.py): no pattern's structure is there, so
    the engine has no refused match to report; the Softmax left over is the rejected count, with
    the pattern engine's best partial match at the merge Reshape after it as the reason."""
    art = infoptc.compile(attention_model(rotary=True), passes="fuse-attention")
    counters = art.pass_records[-1].counters
    assert counters["fused"] == 0 and counters["unfused_softmax"] == 1 and counters["rejected"] == 1
    why = art.reports["fuse-attention"]["rejected"]["softmax"]
    assert why.startswith("at '/attn/Softmax_") and "no match: Concat#9 wants Concat, found Transpose node" in why


def test_not_fused_for_a_target_without_the_contrib_op():
    graph = ir.to_graph(ir.infer_shapes(attention_model()))
    result = get_pass("fuse-attention")().run(graph, PassContext(opset=17, target="tvm"))
    assert result.counters["fused"] == 0 and result.counters["rejected"] == 1


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_golden_transformers(golden, name):
    model = onnx.load(golden(name))
    out, counters = fuse(model, "fuse-transposes,fuse-attention")
    hist = op_histogram(out)
    assert counters["attention"] == 2  # one per layer
    assert hist["com.microsoft::MultiHeadAttention"] == 2 and "Softmax" not in hist
    check_equivalent(model, out, Contract.REASSOCIATING)
    # the models' own inputs: bert pads the tail of row 0, gpt is causal over 16 tokens
    feeds = golden_models.example_inputs(name, batch=2, seq=16)
    diffs = compare_outputs(OrtRunner(model, threads=1).run(feeds), OrtRunner(out, threads=1).run(feeds),
                            Contract.REASSOCIATING)
    assert all(d.ok for d in diffs), [d.describe() for d in diffs]


@pytest.mark.parametrize("exporter, opset", [("torchscript", 17), ("dynamo", 20)])
def test_sdpa_export_with_an_all_padding_row_keeps_the_nan_guard(exporter, opset):
    """torch's SDPA as TorchScript exports it masks with -inf and zeroes the NaN weights of a row
    whose every key is masked; MultiHeadAttention gives NaN there, so the fused result keeps the
    guard (Where(IsNaN(y), 0, y)) unless the bias provably has no -inf (the dynamo export's finfo.min)."""
    from test_fuse_attention_llama import _fixtures

    real_exports, TINY, fixture_path = _fixtures()
    path = str(fixture_path("bert_sdpa", exporter, opset))
    out = infoptc.compile(path, opt_level=3).model
    assert op_histogram(out).get("IsNaN", 0) == (2 if exporter == "torchscript" else 0)
    feeds = real_exports.example_inputs("bert_sdpa", batch=2, seq=12, overrides=TINY["bert_sdpa"])
    feeds["attention_mask"][1] = 0
    expected, got = OrtRunner(onnx.load(path), threads=1).run(feeds), OrtRunner(out, threads=1).run(feeds)
    diffs = compare_outputs(expected, got, Contract.REASSOCIATING)
    assert all(d.ok for d in diffs) and not any(np.isnan(v).any() for v in got.values()), [d.describe() for d in diffs]
