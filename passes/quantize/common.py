"""What the quantizers share: which ops mean a model is already quantized, the options every
quantizer takes, and small predicates on graphsurgeon tensors and nodes."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.errors import UsageError
from infoptc.pass_manager import Option

from .recipe import ISAS

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                 "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QGemm", "QLinearAdd",
                 "MatMulNBits", "QAttention", "MatMulIntegerToFloat"}


def already_quantized(graph: gs.Graph) -> list[str]:
    return sorted({n.op for n in graph.nodes if n.op in QUANTIZED_OPS})


def refuse_quantized(graph: gs.Graph, requantize: bool) -> None:
    present = already_quantized(graph)
    if present and not requantize:
        raise UsageError(f"the model is already quantized ({', '.join(present)} present); "
                         "pass requantize=true (--requantize) to quantize it again")


def parse_exclude(text: str | Iterable[str]) -> set[str]:
    """The ``exclude`` option: node names or op types separated by ';' (or ','), or from Python a
    collection of them (node names may hold any character then)."""
    if not isinstance(text, str):
        return {str(e) for e in text}
    return {e.strip() for e in text.replace(",", ";").split(";") if e.strip()}


# options every quantizer takes
# options of every pass that reads calibration data
CALIBRATION_OPTIONS = {
    "calibration": Option("", "calibration data: an .npz of stacked samples or a folder of .npz files"),
    "samples": Option(0, "calibration samples to use (0: all)"),
}

COMMON_OPTIONS = {
    "exclude": Option("", "node names or op types left fp32, separated by ';'"),
    "isa": Option("auto", "the CPU the int8 kernels target (auto: this host)", choices=ISAS),
    "requantize": Option(False, "quantize a model that already holds quantized ops"),
}


def is_float_activation(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Variable) and (t.dtype is None or np.dtype(t.dtype) == np.float32)


def const_float(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant) and np.dtype(t.dtype) == np.float32:
        return np.asarray(t.values)
    return None


def excluded(node: gs.Node, exclude: set[str]) -> bool:
    return node.name in exclude or node.op in exclude
