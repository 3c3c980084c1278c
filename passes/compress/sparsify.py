"""sparsify: zero weights by magnitude, unstructured or in the 2:4 pattern.

``pattern=unstructured`` zeroes the ``ratio`` smallest |w| of each weight tensor;
``pattern=2:4`` keeps the two largest |w| of every four consecutive weights along the input
(reduction) axis: Conv input channels, a Gemm's K, a MatMul's rows; the layout NVIDIA's sparse
tensor cores (TensorRT) run at up to twice the speed. Tensors whose input axis is not a multiple
of 4 are left alone. ONNX Runtime's CPU kernels are dense: the model runs no faster there, and
is only smaller once compressed (zip, gzip). LOSSY; weights already in the pattern are unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from infoptc.rewrite import Namer

from .weights import WEIGHT_INPUT, weight_tensors


def reduction_axis(node: gs.Node, w: np.ndarray) -> int:
    if node.op == "Conv":
        return 1
    if node.op == "ConvTranspose":
        return 0
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return 1
    return w.ndim - 2


def two_of_four(w: np.ndarray, axis: int) -> np.ndarray | None:
    """``w`` with the two smallest |w| of each 4 consecutive along ``axis`` zeroed (None: axis % 4)."""
    if w.shape[axis] % 4:
        return None
    moved = np.moveaxis(w, axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (-1, 4))
    order = np.argsort(-np.abs(groups), axis=-1, kind="stable")
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, order[..., :2], True, axis=-1)
    return np.moveaxis(np.where(mask, groups, 0).reshape(moved.shape), -1, axis).astype(w.dtype)


def magnitude(w: np.ndarray, ratio: float) -> np.ndarray:
    flat = w.reshape(-1)
    order = np.argsort(np.abs(flat), kind="stable")
    out = flat.copy()
    out[order[: int(ratio * flat.size)]] = 0
    return out.reshape(w.shape)


def _ratio(text) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise ValueError("the fraction of weights to zero must be in [0, 1)")
    return value


@register_pass
class Sparsify(Pass):
    name = "sparsify"
    summary = "zero weights by magnitude (unstructured ratio, or 2:4 along the input axis); smaller once zipped"
    contract = Contract.LOSSY
    reports_changes = True
    options = {
        "pattern": Option("2:4", "2:4, or unstructured (with ratio)", choices=("2:4", "unstructured")),
        "ratio": Option(0.5, "unstructured: the fraction of each tensor's weights to zero", parse=_ratio),
        "min-size": Option(1024, "leave weights with fewer elements alone"),
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        namer = Namer([graph])
        done: dict[int, gs.Constant] = {}
        counters = {"tensors": 0, "zeroed": 0, "skipped_not_multiple_of_4": 0}
        for node, w in weight_tensors(graph, self.opts["min-size"]):
            old = node.inputs[WEIGHT_INPUT[node.op]]
            if id(old) not in done:
                new = (two_of_four(w, reduction_axis(node, w)) if self.opts["pattern"] == "2:4"
                       else magnitude(w, self.opts["ratio"]))
                if new is None:
                    counters["skipped_not_multiple_of_4"] += 1
                    continue
                added = int(np.count_nonzero(w) - np.count_nonzero(new))
                if added == 0:
                    continue
                counters["tensors"] += 1
                counters["zeroed"] += added
                done[id(old)] = gs.Constant(namer(f"{old.name}_sparse"), np.ascontiguousarray(new))
            node.inputs[WEIGHT_INPUT[node.op]] = done[id(old)]
        return PassResult(counters["tensors"] > 0, counters)
