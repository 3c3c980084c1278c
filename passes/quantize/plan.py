"""Which ops of a graph quantize-int8 turns into int8, and which tensors carry int8 values.

Walked in graph order: a Conv/Gemm/MatMul with a constant fp32 weight is quantized (its activation
input gets a range of its own; its output too, unless only fp32 ops read a MatMul/Gemm); data-movement
ops on an int8 tensor stay int8 with their input's range; Add/Mul/Sigmoid/pools between int8 tensors
get their own output range where some reader takes int8; a sole Relu/Clip-from-0 after a quantized
op folds into its output range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .common import const_float, excluded, is_float_activation

# Ops that move int8 values without arithmetic: ONNX Runtime runs them on the integers when
# their input and output share scale and zero point.
PASS_THROUGH = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
# Ops with int8 kernels of their own output range.
ELEMENTWISE = {"Add", "Mul"}  # QLinearAdd / QLinearMul, with broadcasting
POOLS = {"GlobalAveragePool", "AveragePool"}
UNARY = {"Sigmoid"}  # QLinearSigmoid: a 256-entry table
# Ops that take an int8 input well: an elementwise op is quantized only when one of its readers is
# one of these, so that a transformer's residual Add feeding LayerNormalization stays fp32 (its
# stream has outlier channels one 8-bit range cannot hold; CNNs' residuals feed convs and stay int8)
INT8_READERS = {"Conv", "MatMul", "Gemm", "Add", "Mul", "MaxPool", "GlobalAveragePool", "AveragePool",
                "Sigmoid", "Relu", "Clip"} | PASS_THROUGH
FOLDABLE = {"Relu", "Clip"}


@dataclass
class Plan:
    """What to quantize: compute nodes with the axis of their weight's channels, tensors to carry
    as int8 (``own``: a range of their own; ``shared``: the range of another tensor), folds."""

    weights: dict[int, tuple[gs.Node, int, int]] = field(default_factory=dict)  # id -> (node, input index, axis)
    nodes: list[gs.Node] = field(default_factory=list)
    own: list[str] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)
    clip: dict[str, tuple[float, float]] = field(default_factory=dict)  # tensor -> bounds of a folded Relu/Clip
    folds: list[tuple[gs.Node, gs.Node]] = field(default_factory=list)  # (producer, activation)
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> why it stays fp32

    def quantized(self, name: str) -> bool:
        return name in self.shared or name in self._own

    def __post_init__(self):
        self._own: set[str] = set()

    def add_own(self, name: str) -> None:
        if name not in self._own and name not in self.shared:
            self._own.add(name)
            self.own.append(name)

    def root(self, name: str) -> str:
        while name in self.shared:
            name = self.shared[name]
        return name


def weight_axis(node: gs.Node) -> tuple[int, int] | None:
    """(input index, channel axis) of a compute node's constant weight, None if it has none we take."""
    if node.op == "Conv" and len(node.inputs) >= 2:
        w = const_float(node.inputs[1])
        if w is not None and w.ndim in (3, 4) and (len(node.inputs) < 3 or const_float(node.inputs[2]) is not None):
            return 1, 0
    if node.op == "Gemm" and len(node.inputs) >= 2:
        w = const_float(node.inputs[1])
        ok = (w is not None and w.ndim == 2 and not node.attrs.get("transA", 0)
              and float(node.attrs.get("alpha", 1.0)) == 1.0 and float(node.attrs.get("beta", 1.0)) == 1.0
              and (len(node.inputs) < 3 or not node.inputs[2].name or const_float(node.inputs[2]) is not None))
        if ok:
            return 1, 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul" and len(node.inputs) == 2:
        w = const_float(node.inputs[1])
        if w is not None and w.ndim == 2:
            return 1, 1
    return None


def _single_consumer(t: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    if t.name in graph_outputs or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def _fold_bounds(act: gs.Node) -> tuple[float, float] | None:
    """The [lo, hi] an activation clips to, when it is a Relu or a Clip from 0 with constant bounds."""
    if act.op == "Relu":
        return 0.0, np.inf
    if act.op == "Clip":
        bounds = []
        for i, default in ((1, -np.inf), (2, np.inf)):
            t = act.inputs[i] if len(act.inputs) > i and act.inputs[i].name else None
            if t is None:
                bounds.append(default)
                continue
            v = const_float(t)
            if v is None or v.size != 1:
                return None
            bounds.append(float(v.reshape(-1)[0]))
        if "min" in act.attrs or "max" in act.attrs:  # opset < 11
            bounds = [float(act.attrs.get("min", -np.inf)), float(act.attrs.get("max", np.inf))]
        if bounds[0] != 0:  # the range of a uint8 Q starts at 0 exactly; Clip(0.5, 6) lifts values Q would keep
            return None
        return bounds[0], bounds[1]
    return None


def stem_convs(graph: gs.Graph) -> list[gs.Node]:
    """Convs reading a graph input of at most 4 channels (an image's RGB stem): a 27-tap int8
    product gains little over fp32 while its Q runs over the whole input."""
    inputs = {id(t) for t in graph.inputs}
    found = []
    for node in graph.nodes:
        if node.op == "Conv" and node.inputs and id(node.inputs[0]) in inputs and len(node.inputs) > 1:
            w = const_float(node.inputs[1])
            if w is not None and w.ndim >= 3 and w.shape[1] <= 4:
                found.append(node)
    return found


def _int8_readers(node: gs.Node, outputs: set[str], depth: int = 0) -> bool:
    """Some reader of the node's output (through a Relu/Clip it may fold) takes int8 input well.
    An Add or Mul counts only when it adds two activations and is itself read in int8 (a bias Add,
    or a residual Add feeding LayerNorm, runs in fp32)."""
    out = node.outputs[0]
    if out.name in outputs:
        return False
    readers = list(out.outputs)
    for r in list(readers):
        if r.op in FOLDABLE and r.outputs:
            readers += list(r.outputs[0].outputs)
    for r in readers:
        if r.op in FOLDABLE:
            continue
        if r.op in ELEMENTWISE:
            if (depth < 4 and len(r.inputs) == 2 and all(map(is_float_activation, r.inputs)) and r.outputs
                    and _int8_readers(r, outputs, depth + 1)):
                return True
        elif r.op in INT8_READERS:
            return True
    return False


def plan_static(graph: gs.Graph, exclude: set[str], matmul_activations: bool = True,
                elementwise: bool = True, output_fp32: bool = True) -> Plan:
    plan = Plan()
    outputs = {t.name for t in graph.outputs}

    def take_output(node: gs.Node) -> None:
        """Quantize the node's output, folding a sole Relu/Clip consumer into its range."""
        out = node.outputs[0]
        act = _single_consumer(out, outputs)
        bounds = _fold_bounds(act) if act is not None and act.op in FOLDABLE and not excluded(act, exclude) else None
        if bounds is not None and is_float_activation(act.outputs[0]):
            plan.folds.append((node, act))
            out = act.outputs[0]
            plan.clip[out.name] = bounds
        plan.add_own(out.name)

    for node in graph.nodes:
        if excluded(node, exclude) or not node.outputs or not is_float_activation(node.outputs[0]):
            continue
        weight = weight_axis(node)
        x = node.inputs[0] if node.inputs else None
        if weight is not None and x is not None and is_float_activation(x):
            plan.weights[id(node)] = (node, *weight)
            plan.nodes.append(node)
            plan.add_own(x.name)
            # a Conv needs its output quantized (QLinearConv); a MatMul/Gemm read only by fp32 ops
            # keeps an fp32 output, which ORT runs as MatMulIntegerToFloat: no requantization of
            # e.g. a transformer's projection before its bias, residual and LayerNorm
            if node.op == "Conv" or not output_fp32 or _int8_readers(node, outputs):
                take_output(node)
        elif node.op == "MatMul" and matmul_activations and len(node.inputs) == 2 and all(map(is_float_activation, node.inputs)):
            plan.nodes.append(node)
            for t in node.inputs:
                plan.add_own(t.name)
            take_output(node)
        elif node.op in PASS_THROUGH and x is not None and plan.quantized(x.name) and len(node.outputs) == 1:
            plan.nodes.append(node)
            plan.shared[node.outputs[0].name] = x.name
        elif node.op in POOLS and x is not None and plan.quantized(x.name):
            plan.nodes.append(node)
            take_output(node)
        elif node.op in UNARY and elementwise and x is not None and plan.quantized(x.name):
            plan.nodes.append(node)
            take_output(node)
        elif node.op in ELEMENTWISE and (elementwise or node.op == "Add") and len(node.inputs) == 2 \
                and all(map(is_float_activation, node.inputs)) and any(plan.quantized(t.name) for t in node.inputs) \
                and _int8_readers(node, outputs):
            plan.nodes.append(node)
            for t in node.inputs:
                plan.add_own(t.name)
            take_output(node)
        elif node.op in ("Conv", "Gemm", "MatMul"):
            plan.skipped[node.name] = "weights not constant fp32 or attributes without an int8 kernel"
    return plan


def fold(graph: gs.Graph, producer: gs.Node, act: gs.Node) -> None:
    """Drop ``act``: ``producer`` writes ``act``'s output tensor directly."""
    out = act.outputs[0]
    act.outputs.clear()
    act.inputs.clear()
    producer.outputs[0] = out
