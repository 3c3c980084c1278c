"""fuse-gemm-reshape: Reshape -> Gemm -> Reshape (torch's addmm on a 2-D view) -> MatMul + Add."""

from __future__ import annotations

import infoptc
import numpy as np
import pytest
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract
from infoptc.verify import check_equivalent
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
K, N = 8, 6
RNG = np.random.default_rng(9)


def conv1d_model(trans_b=False, restore="shape"):
    """GPT-2's Conv1D as TorchScript writes it: view(-1, K), addmm, view(x.shape[:-1] + (N,))."""
    w = RNG.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(RNG.standard_normal(N).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([-1, K], np.int64), "flat"),
             numpy_helper.from_array(np.array([0], np.int64), "i0"), numpy_helper.from_array(np.array([1], np.int64), "i1"),
             numpy_helper.from_array(np.array([N], np.int64), "n"),
             numpy_helper.from_array(np.array([2, 3, N], np.int64), "fixed")]
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]),
             helper.make_node("Gemm", ["x2", "W", "b"], ["g"], transB=int(trans_b))]
    if restore == "shape":
        nodes += [helper.make_node("Shape", ["x"], ["sx"]), helper.make_node("Gather", ["sx", "i0"], ["d0"], axis=0),
                  helper.make_node("Gather", ["sx", "i1"], ["d1"], axis=0),
                  helper.make_node("Concat", ["d0", "d1", "n"], ["target"], axis=0),
                  helper.make_node("Reshape", ["g", "target"], ["y"])]
    else:
        nodes.append(helper.make_node("Reshape", ["g", "fixed"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["batch", "seq", K])],
                              [helper.make_tensor_value_info("y", F, ["batch", "seq", N] if restore == "shape" else [2, 3, N])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def fuse(model):
    art = infoptc.compile(model, passes="fuse-gemm-reshape")
    return art.model, art.pass_records[0].counters


@pytest.mark.parametrize("trans_b", [False, True])
def test_views_around_gemm_become_a_batched_matmul(trans_b):
    model = conv1d_model(trans_b)
    out, counters = fuse(model)
    assert op_histogram(out) == {"MatMul": 1, "Add": 1} and counters == {"fused": 1, "gemm_views": 1}
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


def test_an_output_view_that_may_not_restore_the_leading_dims_stays():
    out, counters = fuse(conv1d_model(restore="fixed"))  # [2, 3, N] for a [batch, seq, K] input
    assert op_histogram(out)["Gemm"] == 1 and counters["rejected"] == 1
