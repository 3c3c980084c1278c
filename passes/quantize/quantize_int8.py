"""quantize-int8: calibrated static int8 in the QDQ form ONNX Runtime fuses into int8 kernels.

    Conv(x, w, b)       ->  DQ(Q(x)) -> Conv(DQ(w_s8, s_w), DQ(b_s32, s_x*s_w)) -> Q -> DQ
    Relu(Conv(...))     ->  the Relu is dropped: the Q after the Conv, whose range starts at 0, clips
    MaxPool / Reshape / Flatten / Transpose on an int8 tensor stay int8 with the same scale

Activations are uint8 with a calibrated asymmetric range, weights int8 symmetric per output
channel, biases int32 (ONNX Runtime's x86 kernels: QLinearConv, QLinearMatMul, QGemm,
QLinearAdd, QLinearGlobalAveragePool). Ops without an int8 kernel stay fp32 between a DQ and a Q.
Ranges come from running the model over the calibration data (``calibration.py``).
The pass records a per-tensor report (scale, zero point, SQNR against fp32 on the calibration
data, worst first) in ``ctx.reports["quantize-int8"]`` and its choices in the model's metadata.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.errors import UsageError
from infoptc.ir import from_graph, to_graph
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from infoptc.rewrite import Namer

from . import calibration, speed
from .observers import METHODS, quant_params
from .recipe import ISAS, recipe_for

log = logging.getLogger("infoptc")

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                 "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QGemm", "QLinearAdd",
                 "MatMulNBits", "QAttention", "MatMulIntegerToFloat"}
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


def already_quantized(graph: gs.Graph) -> list[str]:
    return sorted({n.op for n in graph.nodes if n.op in QUANTIZED_OPS})


def refuse_quantized(graph: gs.Graph, requantize: bool) -> None:
    present = already_quantized(graph)
    if present and not requantize:
        raise UsageError(f"the model is already quantized ({', '.join(present)} present); "
                         "pass requantize=true (--requantize) to quantize it again")


def parse_exclude(text: str) -> set[str]:
    """The ``exclude`` option: node names or op types separated by ';' (or ',')."""
    return {e.strip() for e in text.replace(",", ";").split(";") if e.strip()}


# options every quantizer takes
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


def excluded(node: gs.Node, exclude: set[str]) -> bool:
    return node.name in exclude or node.op in exclude


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


def _fold(graph: gs.Graph, producer: gs.Node, act: gs.Node) -> None:
    """Drop ``act``: ``producer`` writes ``act``'s output tensor directly."""
    out = act.outputs[0]
    act.outputs.clear()
    act.inputs.clear()
    producer.outputs[0] = out


def quantize_weight(w: np.ndarray, axis: int, qmax: int, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: (values, scale per channel along ``axis``; all equal when not per channel)."""
    moved = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
    bound = np.abs(moved).max(axis=1)
    if not per_channel:
        bound = np.full_like(bound, bound.max())
    scale = np.where(bound > 0, bound / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape).astype(np.float64)), -qmax, qmax).astype(np.int8)
    return q, scale


class Builder:
    """Adds constants and nodes to a graph under fresh names."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.name = Namer([graph], eager=True)

    def const(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.name(base), np.array(values, copy=True, order="C"))  # keeps 0-d arrays 0-d

    def node(self, op: str, base: str, inputs: list, out: gs.Variable, attrs: dict | None = None) -> gs.Node:
        node = gs.Node(op, self.name(base), attrs or {}, inputs, [out])
        self.graph.nodes.append(node)
        return node


def _insert_qdq(b: Builder, t: gs.Variable, scale: np.float32, zp: int, graph: gs.Graph) -> None:
    """Route ``t`` through one QuantizeLinear and a DequantizeLinear per consumer (ONNX Runtime
    groups a DQ with one consumer only: a DQ shared by a Conv and an Add leaves the Add in fp32).
    The first DQ's output keeps the name ``t`` (graph outputs and the report find it there), except
    for graph inputs, which keep theirs."""
    s = b.const(f"{t.name}_scale", np.array(scale, dtype=np.float32))
    z = b.const(f"{t.name}_zero_point", np.array(zp, dtype=np.uint8))
    q = gs.Variable(b.name(f"{t.name}_quantized"), dtype=np.uint8, shape=t.shape)
    consumers = list(t.outputs)
    is_output = any(o is t for o in graph.outputs)
    if any(i is t for i in graph.inputs):
        b.node("QuantizeLinear", f"{t.name}_QuantizeLinear", [t, s, z], q)
        firsts: list[gs.Variable] = []
    else:  # the producer writes a new fp32 tensor; ``t`` becomes a DQ output
        raw = gs.Variable(b.name(f"{t.name}_fp32"), dtype=np.float32, shape=t.shape)
        producer = t.inputs[0]
        producer.outputs[producer.outputs.index(t)] = raw
        b.node("QuantizeLinear", f"{t.name}_QuantizeLinear", [raw, s, z], q)
        b.node("DequantizeLinear", f"{t.name}_DequantizeLinear", [q, s, z], t)
        firsts = [t]
    for k, consumer in enumerate(consumers):
        if firsts and k == 0 and not is_output:
            continue  # the first consumer reads ``t`` itself
        dq = gs.Variable(b.name(f"{t.name}_dequantized"), dtype=np.float32, shape=t.shape)
        b.node("DequantizeLinear", f"{t.name}_DequantizeLinear", [q, s, z], dq)
        for i, inp in enumerate(consumer.inputs):
            if inp is t:
                consumer.inputs[i] = dq


def _dq_weight(b: Builder, node: gs.Node, index: int, axis: int, qmax: int, x_scale: np.float32,
               per_channel: bool = True) -> int:
    """Replace the node's weight (and bias) by int8 (int32) constants behind DequantizeLinear.
    Returns the fp32 bytes replaced."""
    w = np.asarray(node.inputs[index].values)
    q, scale = quantize_weight(w, axis, qmax, per_channel)
    # per tensor: scalar scale and zero point, no axis (the form every int8 kernel takes)
    stored = scale if per_channel else np.array(scale[0], dtype=np.float32)
    attrs = {"axis": axis} if per_channel else {}
    wq = b.const(f"{node.inputs[index].name}_quantized", q)
    ws = b.const(f"{node.inputs[index].name}_scale", stored)
    wz = b.const(f"{node.inputs[index].name}_zero_point", np.zeros(stored.shape, dtype=np.int8))
    wdq = gs.Variable(b.name(f"{node.inputs[index].name}_dequantized"), dtype=np.float32, shape=list(w.shape))
    b.node("DequantizeLinear", f"{node.name}_weight_DequantizeLinear", [wq, ws, wz], wdq, attrs)
    replaced = w.nbytes
    node.inputs[index] = wdq
    bias_index = 2
    if node.op in ("Conv", "Gemm") and len(node.inputs) > bias_index and node.inputs[bias_index].name:
        bias = np.asarray(node.inputs[bias_index].values, dtype=np.float64)
        if bias.ndim == 1 and bias.shape[0] == scale.shape[0]:
            bscale = (np.float64(x_scale) * stored.astype(np.float64)).astype(np.float32)
            bq = np.clip(np.round(bias / bscale.astype(np.float64)), -(2**31) + 1, 2**31 - 1).astype(np.int32)
            bias_attrs = attrs
            name = node.inputs[bias_index].name
            bdq = gs.Variable(b.name(f"{name}_dequantized"), dtype=np.float32, shape=[bias.shape[0]])
            b.node("DequantizeLinear", f"{node.name}_bias_DequantizeLinear",
                   [b.const(f"{name}_quantized", bq), b.const(f"{name}_scale", bscale),
                    b.const(f"{name}_zero_point", np.zeros(bscale.shape, dtype=np.int32))], bdq,
                   {"axis": 0} if bias_attrs else {})
            replaced += bias.astype(np.float32).nbytes
            node.inputs[bias_index] = bdq
    return replaced


def quantize_embeddings(graph: gs.Graph, b: Builder, min_elements: int, exclude: set[str]) -> int:
    """Store large embedding tables in int8, one scale per row (weight-only: the gathered rows are
    scaled back to fp32, a few KB per call instead of the whole table):

        Gather(table, ids)  ->  Mul(Cast(Gather(table_s8, ids), float), Gather(row_scale, ids))

    Returns how many tables were replaced."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "Gather" or excluded(node, exclude) or int(node.attrs.get("axis", 0)) != 0:
            continue
        table = const_float(node.inputs[0])
        if table is None or table.ndim != 2 or table.size < min_elements:
            continue
        q, scale = quantize_weight(table, 0, 127)
        name = node.inputs[0].name
        ids, out = node.inputs[1], node.outputs[0]
        rows = gs.Variable(b.name(f"{name}_rows_s8"), dtype=np.int8)
        b.node("Gather", f"{node.name}_s8", [b.const(f"{name}_quantized", q), ids], rows, {"axis": 0})
        rows_f = gs.Variable(b.name(f"{name}_rows"), dtype=np.float32)
        b.node("Cast", f"{node.name}_cast", [rows], rows_f, {"to": 1})
        row_scale = gs.Variable(b.name(f"{name}_row_scale"), dtype=np.float32)
        b.node("Gather", f"{node.name}_scale", [b.const(f"{name}_scale", scale.reshape(-1, 1)), ids], row_scale,
               {"axis": 0})
        node.outputs.clear()
        node.inputs.clear()
        b.node("Mul", f"{node.name}_dequantize", [rows_f, row_scale], out)
        count += 1
    return count


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(test, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def layer_report(fp32, quant, tensors: list[str], params: dict[str, tuple], producers: dict[str, str],
                 data, samples: int) -> list[dict]:
    """Per quantized tensor: its op, scale, zero point and SQNR (dB) of the quantized model's value
    against the fp32 model's, over the first ``samples`` calibration samples. Worst first."""
    produced = lambda m: {o for n in m.graph.node for o in n.output}
    both = produced(fp32) & produced(quant)  # a dead branch's DQ is gone after cleanup
    names = [t for t in tensors if t in both]
    ref_session = calibration.ort_session(calibration.with_outputs(fp32, names))
    q_session = calibration.ort_session(calibration.with_outputs(quant, names))
    refs: dict[str, list] = {n: [] for n in names}
    tests: dict[str, list] = {n: [] for n in names}
    for i, feed in enumerate(data):
        if i >= samples:
            break
        for n, r, q in zip(names, ref_session.run(names, feed), q_session.run(names, feed)):
            refs[n].append(r.ravel())
            tests[n].append(q.ravel())
    rows = []
    for n in names:
        scale, zp = params[n]
        rows.append({"tensor": n, "op": producers.get(n, "input"), "scale": float(scale), "zero_point": int(zp),
                     "sqnr_db": round(float(sqnr_db(np.concatenate(refs[n]), np.concatenate(tests[n]))), 2)})
    rows.sort(key=lambda r: (r["sqnr_db"], r["tensor"]))
    return rows


@register_pass
class QuantizeInt8(Pass):
    name = "quantize-int8"
    summary = "calibrated static int8 (uint8 activations, int8 per-channel weights) as QDQ for ONNX Runtime's int8 kernels"
    contract = Contract.LOSSY
    reports_changes = True
    options = {
        "calibration": Option("", "calibration data: an .npz of stacked samples or a folder of .npz files"),
        "method": Option("mse", "how activation ranges are chosen (mse: least expected squared error)", choices=METHODS),
        "percentile": Option(99.999, "the percentile kept by method=percentile"),
        "samples": Option(0, "calibration samples to use (0: all)"),
        "cache": Option("", "file that keeps observed ranges, keyed by model and data hashes"),
        **COMMON_OPTIONS,
        "per-channel": Option(True, "one weight scale per output channel (false: one per tensor)"),
        "matmul-activations": Option(True, "also quantize MatMuls of two activations (attention)"),
        "elementwise": Option(True, "also quantize Mul and Sigmoid between int8 tensors (SiLU, squeeze-excitation)"),
        "embeddings": Option(True, "store Gather tables (embeddings) of 4096+ elements in int8, one scale per row"),
        "speed-check": Option(True, "time the int8 model against fp32 on this host: keep fp32 when int8 is "
                                    "slower, and leave elementwise ops in fp32 when that is faster"),
        "report-samples": Option(4, "calibration samples the per-tensor SQNR report runs (0: no report)"),
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        refuse_quantized(graph, self.opts["requantize"])
        recipe = recipe_for(self.opts["isa"])
        exclude = parse_exclude(self.opts["exclude"])
        # the coverages to choose from, the first the default: int8 elementwise ops (SiLU and
        # squeeze-excitation gates) and an int8 stem conv on an RGB input pay on some CPUs and not
        # on others, so with the speed check the alternatives are measured too
        ew = self.opts["elementwise"]
        coverages = {"full": (ew, frozenset())}
        if self.opts["speed-check"]:
            if ew:
                coverages["elementwise-fp32"] = (False, frozenset())
            stems = frozenset(n.name for n in stem_convs(graph))
            if stems:
                coverages["stem-fp32"] = (ew, stems)
        plans = {k: plan_static(graph, exclude | extra, self.opts["matmul-activations"], e)
                 for k, (e, extra) in coverages.items()}
        plan = plans["full"]
        if not plan.weights:
            log.warning("quantize-int8: nothing worth quantizing (no Conv, Gemm or MatMul with constant "
                        "fp32 weights); the model stays fp32")
            return PassResult(False, {"quantized": 0})
        for k in list(coverages)[1:]:  # an alternative that leaves nothing out is no alternative
            if len(plans[k].nodes) == len(plan.nodes) or not plans[k].weights:
                del coverages[k], plans[k]
        source = calibration.calibration_source(ctx.options, self.opts, self.name)
        if graph.opset < 13:
            raise UsageError(f"quantize-int8 needs opset 13 or newer (per-channel QuantizeLinear); the model "
                             f"imports opset {graph.opset}")
        fp32 = from_graph(graph)
        data = calibration.CalibrationData(source, calibration.model_inputs(fp32), self.opts["samples"])
        observed = list(dict.fromkeys(name for k in coverages for name in plans[k].own))
        observers, hit = calibration.cached_observers(fp32, observed, data, self.opts["cache"] or None)
        # a model output or a Softmax output keeps its whole range whatever the method: clipping
        # the largest probabilities (or anything the user reads) flattens exactly what matters
        whole = {t.name for t in graph.outputs} | {n.outputs[0].name for n in graph.nodes if n.op == "Softmax"}
        ranges = {name: observers[name].range("minmax" if name in whole else self.opts["method"],
                                              self.opts["percentile"]) for name in observed}

        timing, chosen = None, "full"
        if self.opts["speed-check"]:
            candidates = {}
            for k, (e, extra) in coverages.items():
                trial = to_graph(fp32)
                self._apply(trial, plan_static(trial, exclude | extra, self.opts["matmul-activations"], e), ranges,
                            recipe, exclude)
                trial.cleanup().toposort()
                candidates[k] = from_graph(trial)
            timing = speed.compare(fp32, candidates, next(iter(data)))
            if timing.best is None:
                log.warning("quantize-int8: int8 is not faster than fp32 on this host (%s); the model stays fp32 "
                            "(speed-check=false / --no-speed-check quantizes anyway)", timing.summary())
                ctx.reports[self.name] = {"recipe": recipe.as_dict(), "speed": timing.as_dict(), "tensors": []}
                return PassResult(False, {"quantized": 0, "kept_fp32_slower": 1})
            chosen = timing.best
            plan = plans[chosen]

        producers = {o.name: node.op for node in graph.nodes for o in node.outputs}
        params, counters = self._apply(graph, plan, ranges, recipe, exclude)
        counters["calibration_cached"] = int(hit)
        ctx.metadata["infoptc.quantization"] = json.dumps(
            {"pass": self.name, "recipe": recipe.as_dict(), "method": self.opts["method"],
             "samples": self.opts["samples"] or "all", "coverage": chosen}, sort_keys=True)
        report = {"recipe": recipe.as_dict(), "skipped": plan.skipped, "tensors": []}
        if timing is not None:
            report["speed"] = timing.as_dict()
        if self.opts["report-samples"]:
            graph.cleanup().toposort()
            report["tensors"] = layer_report(fp32, from_graph(graph), list(params), params, producers, data,
                                             self.opts["report-samples"])
        ctx.reports[self.name] = report
        return PassResult(True, counters)

    def _apply(self, graph: gs.Graph, plan: Plan, ranges: dict, recipe, exclude: set[str]) -> tuple[dict, dict]:
        """Rewrite ``graph`` as ``plan`` says, with the observed ``ranges``. Returns (params, counters)."""
        params: dict[str, tuple[np.float32, int]] = {}
        for name in plan.own:
            lo, hi = ranges[name]
            clip_lo, clip_hi = plan.clip.get(name, (-np.inf, np.inf))
            params[name] = quant_params(max(lo, clip_lo), min(hi, clip_hi))
        for name in plan.shared:
            params[name] = params[plan.root(name)]
        for producer, act in plan.folds:
            _fold(graph, producer, act)
        b = Builder(graph)
        tensors = graph.tensors()
        for name, (scale, zp) in params.items():
            _insert_qdq(b, tensors[name], scale, zp, graph)
        for node, index, axis in plan.weights.values():
            _dq_weight(b, node, index, axis, recipe.weight_qmax, self._input_scale(node), self.opts["per-channel"])
        embeddings = quantize_embeddings(graph, b, 4096, exclude) if self.opts["embeddings"] else 0
        return params, {"quantized": len(plan.nodes), "embeddings": embeddings, "weights": len(plan.weights),
                        "tensors": len(params), "relu_folded": len(plan.folds),
                        "fp32_compute_left": len(plan.skipped)}

    @staticmethod
    def _input_scale(node: gs.Node) -> np.float32:
        """The scale of the DequantizeLinear that now feeds the node's activation input."""
        dq = node.inputs[0].inputs[0]
        return np.float32(dq.inputs[1].values)
