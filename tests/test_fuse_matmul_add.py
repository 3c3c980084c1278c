"""fuse-matmul-add: 2-D MatMul + bias Add -> Gemm; 3-D transformer MatMuls stay."""

from __future__ import annotations

import infoptc
import numpy as np
import onnx
import pytest
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract
from infoptc.verify import check_equivalent
from onnx import helper, numpy_helper

RNG = np.random.default_rng(3)


def linear(x_shape, bias, *, bias_first=False, dtype=np.float32, extra_use=False):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    k, n = x_shape[-1], 5
    out_shape = list(x_shape[:-1]) + [n]
    add = ["b", "m"] if bias_first else ["m", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", add, ["y"])]
    outputs = [helper.make_tensor_value_info("y", elem, out_shape)]
    if extra_use:
        nodes.append(helper.make_node("Neg", ["m"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", elem, out_shape))
    inits = [numpy_helper.from_array((RNG.standard_normal((k, n)) * 3).astype(dtype), "w"),
             numpy_helper.from_array((RNG.standard_normal(bias) * 3).astype(dtype), "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, list(x_shape))], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def fuse(model):
    art = infoptc.compile(model, passes="fuse-matmul-add")
    return art.model, art.pass_records[0].counters


@pytest.mark.parametrize("x_shape, bias, bias_first", [
    (["batch", 4], [5], False),  # the exporter's Linear: bias [N], symbolic batch
    ([3, 4], [5], True),
    ([3, 4], [1, 5], False),
    ([3, 4], [3, 5], False),
    ([3, 4], [3, 1], False),
])
def test_two_d_linear_becomes_gemm(x_shape, bias, bias_first):
    model = linear(x_shape, bias, bias_first=bias_first)
    out, counters = fuse(model)
    assert op_histogram(out) == {"Gemm": 1}
    assert counters == {"fused": 1, "matmul_add": 1}
    check_equivalent(model, out, Contract.REASSOCIATING, samples=2)


@pytest.mark.parametrize("case", ["three_d", "shared_matmul", "integer", "bias_rank_3"])
def test_not_fused(case):
    model = {
        "three_d": lambda: linear([2, 3, 4], [5]),
        "shared_matmul": lambda: linear([3, 4], [5], extra_use=True),
        "integer": lambda: linear([3, 4], [5], dtype=np.int64),
        "bias_rank_3": lambda: linear([3, 4], [1, 1, 5]),
    }[case]()
    out, counters = fuse(model)
    assert "Gemm" not in op_histogram(out) and op_histogram(out)["MatMul"] == 1
    assert counters["fused"] == 0 and counters["rejected"] == 1


def test_golden_models(golden):
    mlp = onnx.load(golden("mlp"))
    out, counters = fuse(mlp)
    assert counters["matmul_add"] == 3
    assert op_histogram(out)["Gemm"] == 3 and "MatMul" not in op_histogram(out)
    check_equivalent(mlp, out, Contract.REASSOCIATING, samples=2)
    for name in ("bert", "gpt"):  # every MatMul there is 3-D: left to ONNX Runtime
        model = onnx.load(golden(name))
        out, counters = fuse(model)
        assert counters["fused"] == 0 and "Gemm" not in op_histogram(out)
