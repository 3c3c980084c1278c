"""fold-shapes: shape subgraphs fold to constants; Reshape/Expand shapes become static."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import golden_models
import infoptc
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract, get_pass
from infoptc.verify import check_equivalent, run_onnx

F, I64 = TP.FLOAT, TP.INT64
SHAPE_OPS = {"Shape", "Size", "Gather", "Unsqueeze", "Concat", "Range", "ConstantOfShape", "Expand", "Slice"}


def make_model(nodes, inputs, outputs, inits=None):
    graph = helper.make_graph(nodes, "t", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in (inits or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def optimize(model, passes="fold-shapes", **kwargs):
    artifact = infoptc.compile(model, passes=passes, **kwargs)
    counters: Counter = Counter()
    for record in artifact.pass_records:
        if record.name == "fold-shapes":
            counters.update(record.counters)
    return artifact.model, counters


def dim_of(x, axis, tag):
    """Exporter style ``x.size(axis)`` as a 1-D tensor: Shape, Gather, Unsqueeze."""
    return [helper.make_node("Shape", [x], [f"{tag}_s"]),
            helper.make_node("Gather", [f"{tag}_s", f"{tag}_i"], [f"{tag}_g"], axis=0),
            helper.make_node("Unsqueeze", [f"{tag}_g", "axis0"], [tag])], {f"{tag}_i": np.array(axis, np.int64)}


def test_reshape_with_dynamic_dims_gets_a_static_shape():
    # view(x.size(0), x.size(1), 4, 8) of x [n, s, 32]: becomes Reshape(x, [0, 0, 4, 8]).
    n0, i0 = dim_of("x", 0, "d0")
    n1, i1 = dim_of("x", 1, "d1")
    m = make_model(n0 + n1 + [helper.make_node("Concat", ["d0", "d1", "heads"], ["shape"], axis=0),
                              helper.make_node("Reshape", ["x", "shape"], ["y"])],
                   [vi("x", ["n", "s", 32])], [vi("y", ["n", "s", 4, 8])],
                   inits={**i0, **i1, "axis0": np.array([0], np.int64), "heads": np.array([4, 8], np.int64)})
    out, counters = optimize(m)
    assert counters["reshape_shapes"] == 1
    assert op_histogram(out) == {"Reshape": 1}
    (shape,) = [numpy_helper.to_array(t) for t in out.graph.initializer]
    assert shape.tolist() == [0, 0, 4, 8]
    assert get_pass("fold-shapes").contract == Contract.EXACT
    for dims in ((1, 3), (5, 2)):
        feeds = {"x": np.random.default_rng(0).standard_normal((*dims, 32)).astype(np.float32)}
        np.testing.assert_array_equal(run_onnx(m, feeds)["y"], run_onnx(out, feeds)["y"])


def test_dims_of_another_tensor_with_other_names_stay_dynamic():
    # z's dim 0 is "m", x's is "n": nothing says they are equal, so the shape stays computed.
    n0, i0 = dim_of("z", 0, "d0")
    m = make_model(n0 + [helper.make_node("Concat", ["d0", "rest"], ["shape"], axis=0),
                         helper.make_node("Reshape", ["x", "shape"], ["y"])],
                   [vi("x", ["n", 6]), vi("z", ["m"])], [vi("y", ["m", 2, 3])],
                   inits={**i0, "axis0": np.array([0], np.int64), "rest": np.array([2, 3], np.int64)})
    out, counters = optimize(m)
    assert counters["reshape_shapes"] == 0
    assert op_histogram(out)["Shape"] == 1


def test_static_shapes_fold_to_constants():
    n1, i1 = dim_of("x", 1, "d1")
    m = make_model(n1 + [helper.make_node("Size", ["x"], ["size"]),
                         helper.make_node("Reshape", ["size", "one"], ["size1"]),
                         helper.make_node("Concat", ["d1", "size1"], ["v"], axis=0),
                         helper.make_node("Cast", ["v"], ["y"], to=F)],
                   [vi("x", ["n", 3])], [vi("y", [2])],
                   inits={**i1, "axis0": np.array([0], np.int64), "one": np.array([1], np.int64)})
    # x.size(1) is static (3) even though dim 0 is not; Size needs every dim.
    out, counters = optimize(m)
    assert counters["shape_values"] >= 1
    assert "Gather" not in op_histogram(out) and op_histogram(out)["Size"] == 1
    # bound with --input-shape, Size folds too; fold-constants then folds the rest
    out, _ = optimize(m, passes="fixpoint(fold-shapes,fold-constants)", input_shapes={"x": (4, 3)})
    assert op_histogram(out) == {"Constant": 1}
    feeds = {"x": np.zeros((4, 3), np.float32)}
    np.testing.assert_array_equal(run_onnx(m, feeds)["y"], run_onnx(out, feeds)["y"])


def test_expand_to_own_dims_becomes_static():
    # Expand(x [n, 1], [x.size(0), 5]) -> Expand(x, [1, 5])
    n0, i0 = dim_of("x", 0, "d0")
    m = make_model(n0 + [helper.make_node("Concat", ["d0", "five"], ["shape"], axis=0),
                         helper.make_node("Expand", ["x", "shape"], ["y"])],
                   [vi("x", ["n", 1])], [vi("y", ["n", 5])],
                   inits={**i0, "axis0": np.array([0], np.int64), "five": np.array([5], np.int64)})
    out, counters = optimize(m)
    assert counters["expand_shapes"] == 1 and op_histogram(out) == {"Expand": 1}
    feeds = {"x": np.arange(3, dtype=np.float32).reshape(3, 1)}
    np.testing.assert_array_equal(run_onnx(m, feeds)["y"], run_onnx(out, feeds)["y"])


def _run_both(original, optimized, name, batch, seq):
    feeds = golden_models.example_inputs(name, batch=batch, seq=seq, seed=seq)
    ref = run_onnx(original, feeds, threads=1, optimize=False)
    got = run_onnx(optimized, feeds, threads=1, optimize=False)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-5)


def test_bert_shape_subgraphs_fold_away_with_input_shape(golden, cli, tmp_path):
    out_path = tmp_path / "bert.opt.onnx"
    code, _, err = cli("compile", golden("bert"), "-O2", "--input-shape", "input_ids:1x32", "-o", out_path, "-q")
    assert code == 0, err
    original, optimized = onnx.load(golden("bert")), onnx.load(out_path)
    hist = op_histogram(optimized)
    assert not {"Shape", "Concat", "Expand", "Slice"} & set(hist), hist
    assert hist["Gather"] == 1  # only the word-embedding lookup of the ids is left
    _run_both(original, optimized, "bert", 1, 32)


def test_gpt_shape_subgraphs_fold_away_with_input_shape(golden):
    original = onnx.load(golden("gpt"))
    optimized = infoptc.optimize(original, opt_level=2, input_shapes={"input_ids": (1, 32)})
    hist = op_histogram(optimized)
    assert not (SHAPE_OPS - {"Gather"}) & set(hist), hist
    assert not {"Range", "LessOrEqual"} & set(hist)  # the causal mask became a constant
    _run_both(original, optimized, "gpt", 1, 32)


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_dynamic_transformers_fold_partially(golden, name):
    original = onnx.load(golden(name))
    optimized, counters = optimize(original, passes="fixpoint(fold-shapes,fold-constants,cse)")
    before, after = op_histogram(original), op_histogram(optimized)
    assert counters["reshape_shapes"] == 8  # every head split/merge
    assert after["Shape"] < before["Shape"] and after["Shape"] <= 3
    reshape_shapes = {n.input[1] for n in optimized.graph.node if n.op_type == "Reshape"}
    assert reshape_shapes <= {t.name for t in optimized.graph.initializer}
    check_equivalent(original, optimized, Contract.REASSOCIATING)
    for batch, seq in ((1, 7), (3, 20)):  # still dynamic
        _run_both(original, optimized, name, batch, seq)
