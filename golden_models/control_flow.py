"""Control-flow model: If + Loop whose bodies capture outer-scope values.

Outer graph (x: float32 [2, 8]):
    h    = Relu(MatMul(x, weight))            # "/Relu_output_0", outer node output
    cond = Greater(ReduceSum(x), 0)
    z    = If(cond, then: h + bias, else: h - bias)      # bias: outer initializer
    y    = Loop(trip_count=3, cond=true, state=z)
             body: state' = Tanh(state * decay + h) + 0.1 * float(iter)
                   (decay: outer initializer, h: outer node output)

``reference(x)`` computes the same thing with numpy.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ._graph import BOOL, FLOAT, INT64, TorchStyleGraph, f32, normal, tensor_info

SEED = 6789
SHAPE = (2, 8)
TRIP_COUNT = 3


def _weights():
    rng = np.random.default_rng(SEED)
    weight = normal(rng, (SHAPE[1], SHAPE[1]), 0.5)
    bias = normal(rng, (SHAPE[1],), 0.5)
    decay = f32(0.5)
    return weight, bias, decay


def build() -> onnx.ModelProto:
    weight, bias, decay = _weights()
    g = TorchStyleGraph()
    g.init("weight", weight)
    g.init("bias", bias)
    g.init("decay", decay)
    g.init("trip_count", np.array(TRIP_COUNT, dtype=np.int64))
    g.init("keep_going", np.array(True))

    h = g.op("MatMul", ["x", "weight"], "")
    h = g.op("Relu", [h], "")  # -> "/Relu_output_0", captured by both subgraphs
    total = g.op("ReduceSum", ["x"], "", keepdims=0)
    zero = g.const(0.0, "", np.float32)
    cond = g.op("Greater", [total, zero], "")

    # -- If branches: reference outer node output ``h`` and outer initializer ``bias``
    then_g = helper.make_graph(
        [helper.make_node("Add", [h, "bias"], ["/If/then/Add_output_0"], name="/If/then/Add")],
        "then_branch", [], [tensor_info("/If/then/Add_output_0", FLOAT, list(SHAPE))],
    )
    else_g = helper.make_graph(
        [helper.make_node("Sub", [h, "bias"], ["/If/else/Sub_output_0"], name="/If/else/Sub")],
        "else_branch", [], [tensor_info("/If/else/Sub_output_0", FLOAT, list(SHAPE))],
    )
    z = g.op("If", [cond], "", then_branch=then_g, else_branch=else_g)

    # -- Loop body: (iter, cond, state) -> (cond, state'); captures ``decay`` and ``h``
    b = "/Loop/body"
    body_nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name=f"{b}/Identity"),
        helper.make_node("Mul", ["state_in", "decay"], [f"{b}/Mul_output_0"], name=f"{b}/Mul"),
        helper.make_node("Add", [f"{b}/Mul_output_0", h], [f"{b}/Add_output_0"], name=f"{b}/Add"),
        helper.make_node("Tanh", [f"{b}/Add_output_0"], [f"{b}/Tanh_output_0"], name=f"{b}/Tanh"),
        helper.make_node("Cast", ["iter_num"], [f"{b}/Cast_output_0"], name=f"{b}/Cast", to=FLOAT),
        helper.make_node(
            "Constant", [], [f"{b}/Constant_output_0"], name=f"{b}/Constant",
            value=helper.make_tensor("", FLOAT, [], [0.1]),
        ),
        helper.make_node("Mul", [f"{b}/Cast_output_0", f"{b}/Constant_output_0"],
                         [f"{b}/Mul_1_output_0"], name=f"{b}/Mul_1"),
        helper.make_node("Add", [f"{b}/Tanh_output_0", f"{b}/Mul_1_output_0"], ["state_out"],
                         name=f"{b}/Add_1"),
    ]
    body = helper.make_graph(
        body_nodes, "loop_body",
        [tensor_info("iter_num", INT64, []), tensor_info("cond_in", BOOL, []),
         tensor_info("state_in", FLOAT, list(SHAPE))],
        [tensor_info("cond_out", BOOL, []), tensor_info("state_out", FLOAT, list(SHAPE))],
    )
    g.op("Loop", ["trip_count", "keep_going", z], "", outputs=["y"], body=body)

    return g.make_model(
        "main_graph",
        [tensor_info("x", FLOAT, list(SHAPE))],
        [tensor_info("y", FLOAT, list(SHAPE))],
        doc_string="If/Loop golden model with outer-scope captures",
    )


def reference(x: np.ndarray) -> np.ndarray:
    """Numpy reference of the model (float32)."""
    weight, bias, decay = _weights()
    h = np.maximum(x.astype(np.float32) @ weight, 0)
    state = h + bias if x.sum() > 0 else h - bias
    for i in range(TRIP_COUNT):
        state = np.tanh(state * decay + h) + np.float32(0.1) * np.float32(i)
    return state.astype(np.float32)


def example_inputs(seed: int = 0, positive: bool | None = None) -> dict[str, np.ndarray]:
    """Random x; ``positive`` forces the sign of sum(x) (i.e. the If branch)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    if positive is not None and (x.sum() > 0) != positive:
        x = -x
    return {"x": x}
