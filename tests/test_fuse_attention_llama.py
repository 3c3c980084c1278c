"""fuse-attention on Llama-class attention: rotary embedding on the split q and k, grouped-query
K/V repeated by Unsqueeze/Expand/Reshape, causal + padding mask, KV caches. Tiny models written
the way the TorchScript and the dynamo exporter write transformers' LlamaAttention (as -O3 hands
them to the pass), and tiny real exports (tests/fixtures/real_exports: llama, llama_sdpa,
llama_past, gpt2_past), compared on ONNX Runtime with the original, padded rows included."""

from __future__ import annotations

import infoptc
import numpy as np
import onnx
import pytest
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract
from infoptc.verify import OrtRunner, check_equivalent, compare_outputs
from onnx import TensorProto, helper, numpy_helper

F, I64 = TensorProto.FLOAT, TensorProto.INT64
HEADS, KV_HEADS, SIZE = 4, 2, 8
HIDDEN = HEADS * SIZE
MIN = float(np.finfo(np.float32).min)


class Builder:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def op(self, op_type, *inputs, **attrs):
        self.n += 1
        out = f"{op_type}_{self.n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"/attn/{op_type}_{self.n}", **attrs))
        return out

    def c(self, value, dtype=np.int64):
        self.n += 1
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), f"const_{self.n}"))
        return f"const_{self.n}"

    def dim(self, x, i, exporter):
        """x.size(i) as a 1-element shape entry, as each exporter writes it."""
        if exporter == "dynamo":
            return self.op("Shape", x, start=i, end=i + 1)
        return self.op("Unsqueeze", self.op("Gather", self.op("Shape", x), self.c(i), axis=0), self.c([0]))

    def length(self, x, exporter):
        """x.size(1) as a scalar, for Range."""
        if exporter == "dynamo":
            return self.op("Squeeze", self.op("Shape", x, start=1, end=2))
        return self.op("Gather", self.op("Shape", x), self.c(1), axis=0)


def llama_attention(exporter="torchscript", opset=20, kv_heads=KV_HEADS, half=SIZE // 2, table_batch=1,
                    groups=None, rotary=True):
    """hidden x [B, S, HIDDEN] and attention_mask [B, S] -> LlamaAttention's output [B, S, HIDDEN]."""
    b = Builder()
    rng = np.random.default_rng(7)
    groups = groups or HEADS // kv_heads
    zero = {"allowzero": 1} if exporter == "dynamo" else {}
    w = {n: b.c(rng.standard_normal((HIDDEN, h * SIZE)) * 0.3, np.float32)
         for n, h in (("q", HEADS), ("k", kv_heads), ("v", kv_heads))}
    split = (b.op("Concat", b.dim("x", 0, exporter), b.dim("x", 1, exporter), b.c([-1]), b.c([SIZE]), axis=0)
             if exporter == "dynamo" else b.c([0, 0, -1, SIZE]))
    heads = {n: b.op("Transpose", b.op("Reshape", b.op("MatMul", "x", w[n]), split, **zero), perm=[0, 2, 1, 3])
             for n in "qkv"}
    # the rotary tables: cos/sin(positions * inv_freq), duplicated halves, [1, S, SIZE] -> [1, 1, S, SIZE]
    positions = b.op("Range", b.c(0), b.length("x", exporter), b.c(1))
    inv_freq = b.c(1.0 / 10000 ** (np.arange(0, SIZE, 2) / SIZE), np.float32)
    if exporter == "dynamo":
        pos = b.op("Unsqueeze", positions, b.c([0, 2]))
    else:
        pos = b.op("Unsqueeze", b.op("Unsqueeze", positions, b.c([0])), b.c([2]))
    if table_batch != 1:  # per-batch positions: a table [B, S, SIZE]
        pos = b.op("Expand", pos, b.op("Concat", b.dim("x", 0, exporter), b.c([1, 1]), axis=0))
    freqs = b.op("Mul", b.op("Cast", pos, to=F), inv_freq)
    emb = b.op("Concat", freqs, freqs, axis=-1)
    cos, sin = (b.op("Unsqueeze", b.op(f, emb), b.c([1])) for f in ("Cos", "Sin"))

    def rotate(x):
        upper = b.op("Slice", x, b.c([half]), b.c([2**63 - 1]), b.c([3]), b.c([1]))
        lower = b.op("Slice", x, b.c([0]), b.c([half]), b.c([3]), b.c([1]))
        rotated = b.op("Concat", b.op("Neg", upper), lower, axis=-1)
        return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))

    def repeat(x):  # transformers' repeat_kv
        if exporter == "dynamo":
            target = b.op("Concat", b.dim("x", 0, exporter), b.c([kv_heads, groups]), b.dim("x", 1, exporter),
                          b.c([SIZE]), axis=0)
            merged = b.op("Concat", b.dim("x", 0, exporter), b.c([HEADS]), b.dim("x", 1, exporter), b.c([SIZE]), axis=0)
        else:  # sizes read from the tensor itself, the Expand target guarded by Where(Equal(t, -1), 1, t)
            t = b.op("Concat", b.dim(x, 0, exporter), b.c([kv_heads, groups]), b.dim(x, 2, exporter), b.c([SIZE]),
                     axis=0)
            target = b.op("Where", b.op("Equal", t, b.c([-1] * 5)), b.c([1] * 5), t)
            merged = b.op("Concat", b.dim(x, 0, exporter), b.c([HEADS]), b.dim(x, 2, exporter), b.c([SIZE]), axis=0)
        return b.op("Reshape", b.op("Expand", b.op("Unsqueeze", x, b.c([2])), target), merged, **zero)

    q, k, v = (rotate(heads["q"]), rotate(heads["k"]), heads["v"]) if rotary else (heads["q"], heads["k"], heads["v"])
    if kv_heads != HEADS:
        k, v = repeat(k), repeat(v)
    # causal + padding mask: Where(j <= i and mask[b, j], 0, finfo.min), [B, 1, S, S]
    j = b.op("Range", b.c(0), b.length("x", exporter), b.c(1))
    causal = b.op("LessOrEqual", b.op("Unsqueeze", j, b.c([0])), b.op("Unsqueeze", j, b.c([1])))
    padding = b.op("Cast", b.op("Unsqueeze", "attention_mask", b.c([1, 2])), to=TensorProto.BOOL)
    bias = b.op("Where", b.op("And", causal, padding), b.c(0.0, np.float32), b.c(MIN, np.float32))
    scores = b.op("Add", b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])),
                              b.c(1 / np.sqrt(SIZE), np.float32)), bias)
    context = b.op("Transpose", b.op("MatMul", b.op("Softmax", scores, axis=-1), v), perm=[0, 2, 1, 3])
    merge = b.op("Concat", b.dim("x", 0, exporter), b.dim("x", 1, exporter), b.c([-1]), axis=0)
    b.nodes.append(helper.make_node("Reshape", [context, merge], ["y"], name="/attn/Reshape_out", **zero))
    graph = helper.make_graph(b.nodes, "llama_attention", [
        helper.make_tensor_value_info("x", F, ["batch", "seq", HIDDEN]),
        helper.make_tensor_value_info("attention_mask", I64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", F, ["batch", "seq", HIDDEN])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 23 else 8
    return model


def feeds():
    """Batch 3, seq 7: row 0 pads its tail, row 1 its head (left padding), row 2 none."""
    rng = np.random.default_rng(3)
    mask = np.ones((3, 7), np.int64)
    mask[0, 5:] = 0
    mask[1, :2] = 0
    return [{"x": rng.standard_normal((3, 7, HIDDEN)).astype(np.float32), "attention_mask": mask},
            {"x": rng.standard_normal((1, 1, HIDDEN)).astype(np.float32), "attention_mask": np.ones((1, 1), np.int64)}]


def fused(model, **kw):
    art = infoptc.compile(model, passes="fuse-attention", **kw)
    return art.model, art.pass_records[-1].counters, art.reports.get("fuse-attention", {})


def assert_matches(model, out):
    for feed in feeds():
        diffs = compare_outputs(OrtRunner(model, threads=1).run(feed), OrtRunner(out, threads=1).run(feed),
                                Contract.REASSOCIATING)
        assert all(d.ok for d in diffs), [d.describe() for d in diffs]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("kv_heads", [KV_HEADS, HEADS])
def test_llama_attention_becomes_rotary_embedding_and_multi_head_attention(exporter, kv_heads):
    model = llama_attention(exporter, kv_heads=kv_heads)
    out, counters, _ = fused(model)
    hist = op_histogram(out)
    assert counters["attention"] == 1 and "Softmax" not in hist and "Neg" not in hist
    assert hist["com.microsoft::MultiHeadAttention"] == 1 and hist["com.microsoft::RotaryEmbedding"] == 2
    assert_matches(model, out)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_grouped_query_attention_without_rotary(exporter):
    model = llama_attention(exporter, rotary=False)
    out, counters, _ = fused(model)
    hist = op_histogram(out)
    assert counters["attention"] == 1 and hist["com.microsoft::MultiHeadAttention"] == 1
    assert "Softmax" not in hist and "com.microsoft::RotaryEmbedding" not in hist
    assert_matches(model, out)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_standard_attention_and_rotary_embedding_at_opset_23(exporter):
    model = llama_attention(exporter, opset=23)
    out, counters, _ = fused(model, ops="standard")
    hist = op_histogram(out)
    assert counters["attention"] == 1 and hist["Attention"] == 1 and hist["RotaryEmbedding"] == 2
    assert not any("::" in op for op in hist) and "Softmax" not in hist and "Expand" in hist  # the tables' Expand
    attention = next(n for n in out.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    assert (attrs["q_num_heads"], attrs["kv_num_heads"]) == (HEADS, KV_HEADS)
    onnx.checker.check_model(out, full_check=True)
    assert_matches(model, out)


def test_standard_policy_below_opset_23_keeps_the_decomposition_and_says_why():
    model = llama_attention("torchscript", opset=20)
    out, counters, report = fused(model, ops="standard")
    assert counters["fused"] == 0 and op_histogram(out)["Softmax"] == 1
    assert "standard Attention needs opset 23" in report["rejected"]["attention"]


@pytest.mark.parametrize("case, why", [
    ("partial_rotary", "does not slice the upper half"),
    ("table_per_batch", "per-batch positions are not fused"),
    ("wrong_groups", "expands to"),
])
def test_not_fused_with_the_reason(case, why):
    model = {"partial_rotary": lambda: llama_attention(half=2),
             "table_per_batch": lambda: llama_attention(table_batch=2),
             "wrong_groups": lambda: llama_attention("dynamo", groups=1)}[case]()
    out, counters, report = fused(model)
    assert counters["fused"] == 0 and op_histogram(out)["Softmax"] == 1
    assert why in report["rejected"]["attention"]


def _fixtures():
    """golden_models.real_exports and the tiny fixtures' TINY / fixture_path
    (tests/fixtures/real_exports/make_fixtures.py, which made them)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "real_exports"))
    from golden_models import real_exports
    from make_fixtures import TINY, fixture_path

    return real_exports, TINY, fixture_path


def _real_export(name, exporter, opset):
    real_exports, TINY, fixture_path = _fixtures()
    feeds = [real_exports.example_inputs(name, batch=3, seq=12, seed=s, overrides=TINY[name]) for s in (0, 1)]
    return str(fixture_path(name, exporter, opset)), real_exports.num_layers(TINY[name]), feeds


@pytest.mark.parametrize("name", ["llama", "llama_sdpa"])
@pytest.mark.parametrize("exporter, opset", [("torchscript", 17), ("dynamo", 20)])
def test_a_real_llama_export_fuses_every_layer_and_matches(name, exporter, opset):
    """transformers' LlamaModel (2 layers, 4 query / 2 KV heads) as torch.onnx exported it
    (tests/fixtures/real_exports/make_fixtures.py), with eager attention and with transformers'
    default (torch's scaled_dot_product_attention: sqrt(scale) on q and k, a -inf mask in the
    TorchScript export, NaN weights zeroed): -O3 fuses each layer's attention."""
    path, n_layers, llama_feeds = _real_export(name, exporter, opset)
    original = onnx.load(path)
    for feed in llama_feeds:  # row 0 pads its tail; row 1 its head; row 2 is all padding
        feed["attention_mask"][1, :3] = 0
        feed["attention_mask"][2] = 0
    art = infoptc.compile(path, opt_level=3)
    hist = op_histogram(art.model)
    assert hist["com.microsoft::MultiHeadAttention"] == n_layers and "Softmax" not in hist
    assert hist["com.microsoft::RotaryEmbedding"] == 2 * n_layers
    check_equivalent(original, art.model, Contract.REASSOCIATING, feeds=llama_feeds)


@pytest.mark.parametrize("name", ["llama", "llama_sdpa"])
@pytest.mark.parametrize("exporter, opset", [("torchscript", 17), ("dynamo", 20)])
def test_a_real_llama_export_at_opset_23_gets_the_standard_ops(name, exporter, opset):
    """The same exports with --ops standard --opset 23: RotaryEmbedding + Attention(kv_num_heads) in
    every layer (the second layer's sequence length is followed back through the first layer's
    RotaryEmbedding), only ai.onnx ops, matching the original export."""
    path, n_layers, llama_feeds = _real_export(name, exporter, opset)
    original = onnx.load(path)
    for feed in llama_feeds:
        feed["attention_mask"][1, :3] = 0
        feed["attention_mask"][2] = 0
    out = infoptc.compile(path, opt_level=3, ops="standard", opset=23).model
    hist = op_histogram(out)
    assert hist["Attention"] == n_layers and hist["RotaryEmbedding"] == 2 * n_layers and "Softmax" not in hist
    assert not any("::" in op for op in hist)
    onnx.checker.check_model(out)
    check_equivalent(original, out, Contract.REASSOCIATING, feeds=llama_feeds)


def _past_feeds(name):
    """Prefill with a cache (12 cached + 12 new tokens; row 1 left-padded, row 2 pads its tail) and
    a one-token decode step."""
    real_exports, TINY, _ = _fixtures()  # the feeds do not depend on the exporter
    prefill = real_exports.example_inputs(name, batch=3, seq=12, overrides=TINY[name])
    prefill["attention_mask"][1, :5] = 0
    step = {k: v[:2] for k, v in real_exports.example_inputs(name, batch=2, seq=1, overrides=TINY[name]).items()}
    return [prefill, step]


@pytest.mark.parametrize("name", ["llama_past", "gpt2_past"])
@pytest.mark.parametrize("exporter, opset", [("torchscript", 17), ("dynamo", 20)])
@pytest.mark.parametrize("standard", [False, True])
def test_a_real_export_with_past_key_values(name, exporter, opset, standard):
    """LlamaModel / GPT2Model with use_cache=True: present = Concat(past, new k) (rotated, for
    llama) is a model output. --ops ort: the presents are rebuilt in [B, K, T, H] (RotaryEmbedding
    on the 4-D new keys) and repeated for MultiHeadAttention, or given to it as past_key/past_value
    where the heads agree (gpt2); --ops standard --opset 23: Attention takes past_key/past_value
    and returns the presents itself. The dynamo llama export reads the total length as
    Reshape(past length + new length) in the repeat's targets."""
    path, n_layers, _ = _real_export(name, exporter, opset)
    original = onnx.load(path)
    options = {"ops": "standard", "opset": 23} if standard else {}
    out = infoptc.compile(path, opt_level=3, **options).model
    hist = op_histogram(out)
    attention = "Attention" if standard else "com.microsoft::MultiHeadAttention"
    rotary = "RotaryEmbedding" if standard else "com.microsoft::RotaryEmbedding"
    assert hist[attention] == n_layers and "Softmax" not in hist
    assert hist.get(rotary, 0) == (2 * n_layers if name == "llama_past" else 0)
    assert [o.name for o in out.graph.output] == [o.name for o in original.graph.output]
    check_equivalent(original, out, Contract.REASSOCIATING, feeds=_past_feeds(name))
