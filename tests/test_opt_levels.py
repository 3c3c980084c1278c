"""The -O levels: every golden model stays equivalent at every level; -O2 simplifies."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import infoptc
from golden_models import MODEL_NAMES
from infoptc.analysis import node_count
from infoptc.pass_manager import Contract, PassManager
from infoptc.pipelines import OPT_LEVELS, parse_pipeline, pipeline_for_level
from infoptc.verify import check_equivalent

LEVELS = ["O1", "O2", "O3", "Os"]


def _golden(golden, name) -> onnx.ModelProto:
    if name == "digits_cnn":
        pytest.importorskip("sklearn")
    return onnx.load(golden(name))


def test_every_level_parses_and_o1_is_exact():
    for text in OPT_LEVELS.values():
        parse_pipeline(text)
    assert PassManager(pipeline_for_level("O1")).contract == Contract.EXACT
    assert PassManager(pipeline_for_level("O2")).contract == Contract.REASSOCIATING


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_golden_model_stays_equivalent_at_every_level(golden, name):
    model = _golden(golden, name)
    counts = {}
    for level in LEVELS:
        optimized = infoptc.optimize(model, opt_level=level)
        contract = PassManager(pipeline_for_level(level)).contract
        check_equivalent(model, optimized, contract, samples=2, what=f"{name} at -{level}")
        counts[level] = node_count(optimized)
        assert counts[level] <= node_count(model)
    assert counts["O2"] <= counts["O1"]


@pytest.mark.parametrize("name,at_most", [("bert", 0.6), ("gpt", 0.6), ("mlp", 0.7)])
def test_o2_removes_nodes(golden, name, at_most):
    model = _golden(golden, name)
    optimized = infoptc.optimize(model, opt_level=2)
    assert node_count(optimized) <= at_most * node_count(model)


def test_o2_is_deterministic(golden):
    model = _golden(golden, "bert")
    first = infoptc.optimize(model, opt_level=2).SerializeToString(deterministic=True)
    assert first == infoptc.optimize(model, opt_level=2).SerializeToString(deterministic=True)


def test_os_does_not_grow_the_model_where_o2_may():
    # ConstantOfShape of 64 KB feeding an Add: O2 folds it (below 1 MB), Os keeps the op.
    dims = np.array([128, 128], np.int64)
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["dims"], ["c"], value=numpy_helper.from_array(np.ones(1, np.float32))),
         helper.make_node("Add", ["x", "c"], ["y"])], "t",
        [helper.make_tensor_value_info("x", TP.FLOAT, [128, 128])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [128, 128])], [numpy_helper.from_array(dims, "dims")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    small = infoptc.optimize(model, opt_level="s")
    folded = infoptc.optimize(model, opt_level=2)
    assert small.ByteSize() < 2 * model.ByteSize() < folded.ByteSize()
    check_equivalent(model, small, Contract.REASSOCIATING)


def test_cli_prints_the_pipeline_of_a_level(cli):
    code, out, _ = cli("passes", "--pipeline", "-O2")
    assert code == 0
    assert out.strip() == OPT_LEVELS["O2"]
    code, out, _ = cli("passes", "--pipeline", "-Os")
    assert code == 0 and "size-limit" in out
