"""toposort: unsorted (but acyclic) input is accepted and sorted."""

from onnx import helper as h

import infoptc
from infoptc import Contract
from infoptc.verify import check_equivalent

from _models import fvi, model


def test_unsorted_model_is_sorted():
    nodes = [h.make_node("Neg", ["a"], ["y"], name="second"), h.make_node("Relu", ["x"], ["a"], name="first")]
    m = model(nodes, [fvi("x", [3])], [fvi("y", [3])])
    out = infoptc.optimize(m, passes="toposort")
    assert [n.name for n in out.graph.node] == ["first", "second"]
    check_equivalent(model(list(reversed(nodes)), [fvi("x", [3])], [fvi("y", [3])]), out, Contract.EXACT)
