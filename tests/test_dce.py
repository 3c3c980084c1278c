"""dce: dead nodes and initializers go, graph inputs and outputs stay."""

import numpy as np
from onnx import helper as h
from onnx import numpy_helper as nh

import infoptc
from infoptc import Contract
from infoptc.verify import check_equivalent

from _models import chain, fvi, model, with_subgraph


def test_removes_dead_nodes_and_initializers_keeps_inputs():
    unused = nh.from_array(np.ones(3, np.float32), "unused_w")
    m = model([h.make_node("Relu", ["x"], ["y"]), h.make_node("Add", ["x", "unused_w"], ["dead"])],
              [fvi("x", [3]), fvi("unused_input", [3])], [fvi("y", [3])], [unused])
    out = infoptc.optimize(m, passes="dce")
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    assert [i.name for i in out.graph.input] == ["x", "unused_input"]
    assert not out.graph.initializer


def test_dead_code_inside_subgraph_and_outer_values_used_by_bodies_stay():
    m = with_subgraph()
    out = infoptc.optimize(m, passes="dce")
    assert "Relu" in {n.op_type for n in out.graph.node}  # only the If body reads it
    check_equivalent(m, out, Contract.EXACT, samples=3)


def test_counts_in_stats():
    art = infoptc.compile(chain(), passes="dce")
    rec = art.pass_records[0]
    assert rec.counters == {"removed_nodes": 1, "removed_initializers": 0} and rec.changed
