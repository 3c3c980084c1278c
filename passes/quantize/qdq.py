"""Writing int8 into the graph: QuantizeLinear/DequantizeLinear pairs for activations, int8
weights and int32 biases behind DequantizeLinear, int8 embedding tables."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.rewrite import Namer

from .common import const_float, excluded

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


def insert_qdq(b: Builder, t: gs.Variable, scale: np.float32, zp: int, graph: gs.Graph,
               reads_int8: Callable[[gs.Node], bool] | None = None) -> None:
    """Route ``t`` through one QuantizeLinear and a DequantizeLinear per consumer (ONNX Runtime
    groups a DQ with one consumer only: a DQ shared by a Conv and an Add leaves the Add in fp32).
    With ``reads_int8``, only the consumers it accepts read a DQ; the others keep reading the fp32
    value (an fp32 op gains nothing from the rounding, a residual stream only loses precision).
    The first DQ's output keeps the name ``t`` (graph outputs and the report find it there), except
    for graph inputs, which keep theirs."""
    s = b.const(f"{t.name}_scale", np.array(scale, dtype=np.float32))
    z = b.const(f"{t.name}_zero_point", np.array(zp, dtype=np.uint8))
    q = gs.Variable(b.name(f"{t.name}_quantized"), dtype=np.uint8, shape=t.shape)
    consumers = list(t.outputs)
    fp32_readers = [c for c in consumers if reads_int8 is not None and not reads_int8(c)]
    consumers = [c for c in consumers if c not in fp32_readers]
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
        _rewire(fp32_readers, t, raw)
    for k, consumer in enumerate(consumers):
        if firsts and k == 0 and not is_output:
            continue  # the first consumer reads ``t`` itself
        dq = gs.Variable(b.name(f"{t.name}_dequantized"), dtype=np.float32, shape=t.shape)
        b.node("DequantizeLinear", f"{t.name}_DequantizeLinear", [q, s, z], dq)
        _rewire([consumer], t, dq)


def _rewire(consumers: list[gs.Node], old: gs.Tensor, new: gs.Tensor) -> None:
    for consumer in consumers:
        for i, inp in enumerate(consumer.inputs):
            if inp is old:
                consumer.inputs[i] = new


def dq_weight(b: Builder, node: gs.Node, index: int, axis: int, qmax: int, x_scale: np.float32,
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


EMBEDDING_MIN_ELEMENTS = 4096


def embedding_table(node: gs.Node, min_elements: int = EMBEDDING_MIN_ELEMENTS) -> np.ndarray | None:
    """The fp32 table of a Gather that reads rows of a constant 2-D table of ``min_elements`` or
    more (an embedding), else None."""
    if node.op != "Gather" or int(node.attrs.get("axis", 0)) != 0:
        return None
    table = const_float(node.inputs[0])
    return table if table is not None and table.ndim == 2 and table.size >= min_elements else None


def quantize_embeddings(graph: gs.Graph, b: Builder, min_elements: int, exclude: set[str]) -> int:
    """Store large embedding tables in int8, one scale per row (weight-only: the gathered rows are
    scaled back to fp32, a few KB per call instead of the whole table):

        Gather(table, ids)  ->  Mul(Cast(Gather(table_s8, ids), float), Gather(row_scale, ids))

    Returns how many tables were replaced."""
    count = 0
    for node in list(graph.nodes):
        table = embedding_table(node, min_elements)
        if table is None or excluded(node, exclude):
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
