"""equalize-cross-layer: balance the per-channel weight ranges of consecutive convolutions.

    Conv2(Relu(Conv1(x, W1, b1)), W2)  ->  Conv2(Relu(Conv1(x, W1 / s, b1 / s)), W2 * s)

with one ``s_i`` per channel between them, ``s_i = sqrt(r1_i / r2_i)`` for ``r1_i`` the largest
|weight| of Conv1's output channel i and ``r2_i`` that of Conv2's input channel i: afterwards both
ranges are ``sqrt(r1_i * r2_i)``, so one int8 scale per tensor wastes no channel's resolution
(Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", 2019).
Exact in real arithmetic because Relu is positively homogeneous (relu(x / s) = relu(x) / s, s > 0);
nothing but a Relu may sit between the two (Clip to 6 is not homogeneous), and Conv1's output must
feed Conv2 alone. Conv2 may be depthwise; grouped convolutions otherwise are left alone.
The rounding of the rescaled weights makes it reassociating, not exact.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from infoptc.rewrite import Namer

from .common import const_float


def _conv_weights(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    if node.op != "Conv" or len(node.inputs) < 2:
        return None
    w = const_float(node.inputs[1])
    if w is None or w.ndim != 4:
        return None
    b = const_float(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if len(node.inputs) > 2 and node.inputs[2].name and b is None:
        return None
    return w, b


def _sole_consumer(t: gs.Tensor, outputs: set[str]) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 and t.name not in outputs else None


def equalizable_pairs(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node]]:
    """(Conv1, Conv2) with only a Relu (or nothing) between them and no other reader."""
    outputs = {t.name for t in graph.outputs}
    pairs = []
    for first in graph.nodes:
        if _conv_weights(first) is None or int(first.attrs.get("group", 1)) != 1:
            continue
        nxt = _sole_consumer(first.outputs[0], outputs)
        if nxt is not None and nxt.op == "Relu":
            nxt = _sole_consumer(nxt.outputs[0], outputs)
        if nxt is None or _conv_weights(nxt) is None:
            continue
        w1, w2 = _conv_weights(first)[0], _conv_weights(nxt)[0]
        group = int(nxt.attrs.get("group", 1))
        channels = w1.shape[0]
        if group == 1 and w2.shape[1] == channels or group == channels and w2.shape[:2] == (channels, 1):
            pairs.append((first, nxt))
    return pairs


def set_constant(node: gs.Node, index: int, values: np.ndarray, namer: Namer, suffix: str) -> None:
    """Give the node a fresh fp32 constant at input ``index`` (the old one may be shared)."""
    old = node.inputs[index] if len(node.inputs) > index else None
    name = namer((old.name if old is not None and old.name else f"{node.name}_bias") + suffix)
    const = gs.Constant(name, np.array(values, dtype=np.float32, order="C"))
    if len(node.inputs) > index:
        node.inputs[index] = const
    else:
        node.inputs.append(const)


@register_pass
class EqualizeCrossLayer(Pass):
    name = "equalize-cross-layer"
    summary = "balance per-channel weight ranges of Conv -> [Relu] -> Conv pairs before int8 (data-free)"
    contract = Contract.REASSOCIATING
    reports_changes = True
    options = {"iterations": Option(4, "rounds over the pairs (a chain of three convs converges in a few)")}

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        pairs = equalizable_pairs(graph)
        if not pairs:
            return PassResult(False, {"pairs": 0})
        scales = {id(a): np.ones(_conv_weights(a)[0].shape[0]) for a, _ in pairs}
        weights = {id(n): _conv_weights(n)[0].astype(np.float64) for pair in pairs for n in pair}
        biases = {id(a): _conv_weights(a)[1] for a, _ in pairs}
        for _ in range(self.opts["iterations"]):
            for first, second in pairs:
                w1, w2 = weights[id(first)], weights[id(second)]
                r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
                depthwise = int(second.attrs.get("group", 1)) > 1
                r2 = (np.abs(w2).reshape(w2.shape[0], -1).max(axis=1) if depthwise
                      else np.abs(w2).transpose(1, 0, 2, 3).reshape(w2.shape[1], -1).max(axis=1))
                s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1)), 1.0)
                weights[id(first)] = w1 / s.reshape(-1, 1, 1, 1)
                weights[id(second)] = w2 * (s.reshape(-1, 1, 1, 1) if depthwise else s.reshape(1, -1, 1, 1))
                scales[id(first)] = scales[id(first)] * s
        namer = Namer([graph])
        done: set[int] = set()
        for first, second in pairs:
            if id(first) not in done:
                set_constant(first, 1, weights[id(first)], namer, "_equalized")
                done.add(id(first))
            if biases[id(first)] is not None:
                set_constant(first, 2, biases[id(first)].astype(np.float64) / scales[id(first)], namer, "_equalized")
            if id(second) not in done:
                set_constant(second, 1, weights[id(second)], namer, "_equalized")
                done.add(id(second))
        return PassResult(True, {"pairs": len(pairs)})
