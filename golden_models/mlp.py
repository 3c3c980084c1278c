"""Tiny MLP smoke-test model (a few KB).

x [batch, 64] -> fc1 (MatMul+Add) -> Relu -> Dropout(ratio=0.1, inference)
-> Identity -> fc2 -> Relu -> Cast(float32, a no-op) -> fc3 -> Identity -> y
[batch, 10].  Dropout / Identity / Cast are all no-ops for the optimizer to
remove.
"""

from __future__ import annotations

import numpy as np
import onnx

from ._graph import FLOAT, TorchStyleGraph, normal, tensor_info

SEED = 5678
IN_FEATURES = 64
HIDDEN = (16, 16)
OUT_FEATURES = 10


def _linear(g, rng, x, name, fin, fout):
    w = g.init(f"{name}.weight", normal(rng, (fin, fout), np.sqrt(2.0 / fin)))
    b = g.init(f"{name}.bias", normal(rng, (fout,), 0.1))
    y = g.op("MatMul", [x, w], f"/{name}")
    return g.op("Add", [y, b], f"/{name}")


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    g = TorchStyleGraph()
    h1, h2 = HIDDEN
    x = _linear(g, rng, "x", "fc1", IN_FEATURES, h1)
    x = g.op("Relu", [x], "/act1")
    ratio = g.const(0.1, "/dropout", np.float32)
    x = g.op("Dropout", [x, ratio], "/dropout")
    x = g.op("Identity", [x], "")
    x = _linear(g, rng, x, "fc2", h1, h2)
    x = g.op("Relu", [x], "/act2")
    x = g.op("Cast", [x], "", to=FLOAT)
    x = _linear(g, rng, x, "fc3", h2, OUT_FEATURES)
    g.op("Identity", [x], "", outputs=["y"])
    return g.make_model(
        "main_graph",
        [tensor_info("x", FLOAT, ["batch", IN_FEATURES])],
        [tensor_info("y", FLOAT, ["batch", OUT_FEATURES])],
        doc_string="MLP smoke-test golden model",
    )


def example_inputs(batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, IN_FEATURES)).astype(np.float32)}
