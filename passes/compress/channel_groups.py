"""Channel dependency analysis: which channels of which tensors must be removed together.

A *space* is a set of channels created by one producer: the output channels of a Conv,
ConvTranspose, Gemm or MatMul with constant weights. Every tensor whose channel axis is tracked
has a *layout*: its channel axis and the spaces laid along it, as segments (a Concat lays several
spaces end to end, a Split takes a range of them, a Flatten into a Gemm expands each channel into
``inner`` consecutive features). Ops that keep channels apart (activations, pooling,
BatchNormalization, elementwise ops with per-channel or scalar constants, Transpose, depthwise
convolutions) pass the layout through and record the constants they hold per channel; a
residual Add or Mul of two tracked tensors *unites* their spaces (channel i of one is channel i
of the other: they lose the same channels). A group is a united set of spaces. Attention: a
Reshape that splits a projection's channels into [heads, head_dim] (its target constant, or a
Concat of pieces as exporters build it) makes the axis count heads (``per`` = head_dim channels
a position) and the space shrink by whole heads (``unit``); the MatMuls of Q with K^T and of the
probabilities with V unite the three projections head by head, and the Reshape that merges the
heads back feeds the output projection.

Every edit that removing channels of a group implies is recorded as an action: slice the
producer's weights along their output axis, the consumers' weights along their input axis (at
the segment's offset, ``inner`` features per channel), each per-channel constant, and fix Split
sizes, Reshape targets, depthwise ``group`` attributes and the tensors' recorded shapes.

Anything the analysis cannot prove safe blocks the spaces involved, with a reason: a graph
output or a model input, an op it does not model (Shape, Slice or Gather across channels,
subgraphs...), a normalization across channels (LayerNormalization, Softmax over the channel
axis: this is what keeps a transformer's residual width whole), a MatMul of two activations
other than per head, or a Reshape that splits or merges channels otherwise (a fused QKV
projection reshaped to [.., 3, heads, head_dim], as timm's ViT exports it, is left whole).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.rewrite import node_subgraphs


@dataclass(frozen=True)
class Seg:
    space: int
    start: int
    length: int
    inner: int = 1
    per: int = 1  # channels per position along the axis: a head axis holds head_dim channels each


@dataclass(frozen=True)
class Layout:
    axis: int  # non-negative
    rank: int
    segs: tuple[Seg, ...]

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segs)

    def moved(self, axis: int, rank: int | None = None) -> "Layout":
        return Layout(axis, self.rank if rank is None else rank, self.segs)


@dataclass
class Action:
    """One edit implied by removing channels: ``kind`` is ``slice`` (constant input ``index`` of
    ``node`` along ``axis``), ``grouped-in`` (a grouped Conv's weight, input channels per group),
    ``group`` (a depthwise Conv's group count), ``split`` (Split sizes from ``layouts``),
    ``reshape`` (a Reshape target's channel entry at ``axis``) or ``shape`` (a tensor's shape)."""

    kind: str
    node: gs.Node | None
    layout: Layout
    index: int = 1
    axis: int = 0
    role: str = "param"  # slice: out (a producer's weights), in (a consumer's), param (per-channel constant)
    layouts: tuple = ()
    tensor: gs.Tensor | None = None
    groups: int = 1


@dataclass
class Group:
    """Spaces united by the analysis: they lose the same channels."""

    root: int
    size: int
    blocks: int = 1  # grouped convolutions: each of ``blocks`` equal parts keeps as many channels
    unit: int = 1  # attention heads: channels go ``unit`` (head_dim) at a time, whole heads
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.reasons and self.size >= 2 and bool(self.producers)

    def as_dict(self) -> dict:
        return {"group": self.root, "channels": self.size, "blocks": self.blocks, "unit": self.unit,
                "producers": self.producers,
                "consumers": self.consumers, "members": self.members, "prunable": self.prunable,
                "reasons": self.reasons}


PASS_THROUGH = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Erf", "HardSigmoid",
                "HardSwish", "Softplus", "Softsign", "Mish", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
                "Identity", "Dropout", "Cast", "Clip", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
                "ThresholdedRelu", "Shrink"}
PRODUCERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "PRelu"}
REDUCES = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSumExp", "ReduceSumSquare"}


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of a constant input (an initializer or a Constant node's output), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if t.inputs and t.inputs[0].op == "Constant" and isinstance(t.inputs[0].attrs.get("value"), gs.Constant):
        return np.asarray(t.inputs[0].attrs["value"].values)
    return None


def _shape(t: gs.Tensor) -> list | None:
    return list(t.shape) if t.shape is not None else None


def _static(shape: list | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


class Analysis:
    """Walks the graph once (in order) and builds the groups; ``groups`` is the result."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.parent: list[int] = []
        self.sizes: list[int] = []
        self.blocks: list[int] = []
        self.units: list[int] = []
        self.reasons: list[list[str]] = []
        self.producers: list[list[str]] = []
        self.layouts: dict[str, Layout] = {}
        self.actions: list[Action] = []
        self.consumers: dict[int, list[str]] = {}
        self.members: dict[int, list[str]] = {}
        for node in graph.nodes:
            self._visit(node)
        for t in graph.outputs:
            self._block(self.layouts.get(t.name), f"reaches the graph output {t.name!r}")
        self.groups = self._collect()

    # ------------------------------------------------------------- spaces
    def _new_space(self, size: int, producer: str) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        self.blocks.append(1)
        self.units.append(1)
        self.reasons.append([])
        self.producers.append([producer])
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def _union(self, a: int, b: int, why: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.sizes[ra] != self.sizes[rb]:
            self._block_space(ra, why + ": channel counts differ")
            self._block_space(rb, why + ": channel counts differ")
            return
        lo, hi = min(ra, rb), max(ra, rb)  # the older space is the root: deterministic numbering
        self.parent[hi] = lo
        if self.blocks[hi] != self.blocks[lo]:
            if 1 not in (self.blocks[hi], self.blocks[lo]):
                self.reasons[lo].append(f"{why}: grouped convolutions with different group counts")
            self.blocks[lo] = max(self.blocks[hi], self.blocks[lo])
        if self.units[hi] != self.units[lo]:
            if 1 not in (self.units[hi], self.units[lo]):
                self.reasons[lo].append(f"{why}: attention heads of different sizes")
            self.units[lo] = max(self.units[hi], self.units[lo])
        self.reasons[lo] += self.reasons[hi]
        self.producers[lo] += self.producers[hi]

    def _block_space(self, s: int, reason: str) -> None:
        r = self.find(s)
        if reason not in self.reasons[r]:
            self.reasons[r].append(reason)

    def _block(self, layout: Layout | None, reason: str) -> None:
        if layout is not None:
            for seg in layout.segs:
                self._block_space(seg.space, reason)

    def _unite(self, a: Layout, b: Layout, why: str) -> bool:
        """Make two layouts lose the same channels; False (both blocked) when they cannot."""
        if a.segs == b.segs:
            return True
        full = lambda l: all(s.start == 0 and s.length == self.sizes[self.find(s.space)] for s in l.segs)  # noqa: E731
        if (len(a.segs) == len(b.segs) and full(a) and full(b)
                and all(x.length == y.length and x.inner == y.inner and x.per == y.per for x, y in zip(a.segs, b.segs))):
            for x, y in zip(a.segs, b.segs):
                self._union(x.space, y.space, why)
            return True
        self._block(a, f"{why}: channel ranges do not line up")
        self._block(b, f"{why}: channel ranges do not line up")
        return False

    def _record(self, action: Action, what: str) -> None:
        self.actions.append(action)
        kind = self.consumers if action.role == "in" else self.members
        for seg in action.layout.segs:
            kind.setdefault(seg.space, []).append(what)

    # ------------------------------------------------------------- nodes
    def _in(self, node: gs.Node, i: int = 0) -> Layout | None:
        if len(node.inputs) <= i or not node.inputs[i].name:
            return None
        return self.layouts.get(node.inputs[i].name)

    def _out(self, node: gs.Node, layout: Layout | None, i: int = 0) -> None:
        if layout is not None and len(node.outputs) > i:
            t = node.outputs[i]
            self.layouts[t.name] = layout
            self.actions.append(Action("shape", None, layout, tensor=t))

    def _block_inputs(self, node: gs.Node, reason: str) -> None:
        for t in node.inputs:
            self._block(self.layouts.get(t.name), reason)
        for sub in node_subgraphs(node):  # subgraphs may read outer tensors without listing them
            for inner in sub.nodes:
                for t in inner.inputs:
                    self._block(self.layouts.get(t.name), reason)

    def _visit(self, node: gs.Node) -> None:
        op = node.op
        what = f"{op} {node.name}"
        tracked = [i for i, t in enumerate(node.inputs) if t.name in self.layouts]
        handler = getattr(self, "_op_" + op, None) if node.domain in ("", "ai.onnx", None) else None
        if handler is not None and not tracked and op not in PRODUCERS | {"LayerNormalization"}:
            handler = None
        if handler is None:
            if op in PASS_THROUGH and len(node.outputs) >= 1 and tracked == [0]:
                self._out(node, self._in(node))
                return
            if op in POOLS and tracked == [0] and len(node.outputs) == 1:
                layout = self._in(node)
                if layout.axis == 1:
                    self._out(node, layout)
                    return
            if op in BINARY and tracked:
                if self._binary(node, what):
                    return
            if op in REDUCES and tracked == [0]:
                if self._reduce(node):
                    return
            if tracked or node_subgraphs(node):
                self._block_inputs(node, f"read by {what}, which the analysis does not model")
            return
        handler(node, what)

    def _weight_layer(self, node: gs.Node, what: str, w_index: int, out_axis: int, in_axis: int | None,
                      layout_in: Layout | None, out_rank: int, out_channel_axis: int,
                      bias: tuple[int, int] | None) -> None:
        """A producer/consumer: slice its weight's input axis by the input's layout, and make its
        output channels a new space (weight out_axis, bias (input index, axis))."""
        w = const_value(node.inputs[w_index])
        if layout_in is not None and in_axis is not None:
            self._record(Action("slice", node, layout_in, w_index, in_axis, role="in"), what)
        space = self._new_space(int(w.shape[out_axis]), what)
        out = Layout(out_channel_axis, out_rank, (Seg(space, 0, int(w.shape[out_axis])),))
        self.actions.append(Action("slice", node, out, w_index, out_axis, role="out"))
        if bias is not None:
            self.actions.append(Action("slice", node, out, bias[0], bias[1], role="param"))
        self._out(node, out)

    def _op_Conv(self, node: gs.Node, what: str) -> None:
        w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        has_bias = len(node.inputs) > 2 and node.inputs[2].name
        bias_ok = not has_bias or const_value(node.inputs[2]) is not None
        layout = self._in(node)
        if w is None or not bias_ok or (layout is not None and layout.axis != 1):
            self._block_inputs(node, f"read by {what}, whose weights are not constant")
            return
        group = int(node.attrs.get("group", 1))
        bias = (2, 0) if has_bias else None
        rank = w.ndim
        if group == 1:
            self._weight_layer(node, what, 1, 0, 1, layout, rank, 1, bias)
            return
        cin = w.shape[1] * group
        if group == cin and w.shape[0] == group:  # depthwise, one filter per channel: pass-through
            if layout is None:
                self._weight_layer(node, what, 1, 0, None, None, rank, 1, bias)
                self._block(self.layouts[node.outputs[0].name], f"{what} is depthwise over a model input")
                return
            self._record(Action("slice", node, layout, 1, 0, role="param"), what)
            if has_bias:
                self.actions.append(Action("slice", node, layout, 2, 0, role="param"))
            self.actions.append(Action("group", node, layout))
            self._out(node, layout)
            return
        # grouped: channels are removed alike from each of the groups, on both sides
        if w.shape[0] % group:
            self._block_inputs(node, f"read by {what}: output channels not divisible by its groups")
            return
        if layout is not None:
            if len(layout.segs) != 1 or layout.segs[0].length != self.sizes[self.find(layout.segs[0].space)]:
                self._block(layout, f"read by grouped {what} through a Concat or Split")
            else:
                root = self.find(layout.segs[0].space)
                if self.blocks[root] not in (1, group):
                    self._block_space(root, f"read by grouped {what} with {group} groups, and by others")
                self.blocks[root] = group
                self._record(Action("grouped-in", node, layout, role="in", groups=group), what)
        self._weight_layer(node, what, 1, 0, None, None, rank, 1, bias)
        self.blocks[self.find(self.layouts[node.outputs[0].name].segs[0].space)] = group

    def _op_ConvTranspose(self, node: gs.Node, what: str) -> None:
        w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        has_bias = len(node.inputs) > 2 and node.inputs[2].name
        layout = self._in(node)
        if (w is None or int(node.attrs.get("group", 1)) != 1 or (has_bias and const_value(node.inputs[2]) is None)
                or (layout is not None and layout.axis != 1) or "output_shape" in node.attrs):
            self._block_inputs(node, f"read by {what} (grouped, or weights not constant)")
            return
        self._weight_layer(node, what, 1, 1, 0, layout, w.ndim, 1, (2, 0) if has_bias else None)

    def _op_Gemm(self, node: gs.Node, what: str) -> None:
        w = const_value(node.inputs[1])
        layout = self._in(node)
        c = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        has_c = len(node.inputs) > 2 and node.inputs[2].name
        if (w is None or node.attrs.get("transA", 0) or (layout is not None and layout.axis != 1)
                or (has_c and c is None) or self._in(node, 2) is not None):
            self._block_inputs(node, f"read by {what} (transposed input or weights not constant)")
            return
        trans_b = int(node.attrs.get("transB", 0))
        n = w.shape[0 if trans_b else 1]
        bias = None
        if has_c and c.ndim >= 1 and c.shape[-1] == n and n > 1:
            bias = (2, c.ndim - 1)
        elif has_c and c.size != 1 and not (c.ndim >= 1 and c.shape[-1] == 1):
            self._block_inputs(node, f"read by {what}, whose bias is not per output channel")
            return
        self._weight_layer(node, what, 1, 0 if trans_b else 1, 1 if trans_b else 0, layout, 2, 1, bias)

    def _op_MatMul(self, node: gs.Node, what: str) -> None:
        w = const_value(node.inputs[1])
        layout = self._in(node)
        out_shape = _shape(node.outputs[0])
        other = self._in(node, 1)
        if (layout is not None and other is not None and layout.rank == other.rank and layout.axis == other.axis
                and layout.axis < layout.rank - 2 and all(s.per > 1 for s in layout.segs + other.segs)):
            if self._unite(layout, other, f"{what} (attention, per head)"):  # the same heads on both sides
                self._out(node, layout)
            return
        if other is not None or w is None or w.ndim != 2 or out_shape is None:
            self._block_inputs(node, f"read by {what}, a product of two activations not split by heads, "
                                     "or with weights that are not a constant matrix")
            return
        if layout is not None and layout.axis != layout.rank - 1:
            self._block(layout, f"read by {what} along another axis than its channels")
            layout = None
        self._weight_layer(node, what, 1, 1, 0, layout, len(out_shape), len(out_shape) - 1, None)

    def _op_BatchNormalization(self, node: gs.Node, what: str) -> None:
        layout = self._in(node)
        params = [const_value(t) for t in node.inputs[1:5]]
        if layout is None or layout.axis != 1 or any(p is None for p in params) or len(node.outputs) > 1:
            self._block_inputs(node, f"read by {what} (training mode or parameters not constant)")
            return
        for i in range(1, 5):
            self._record(Action("slice", node, layout, i, 0, role="param"), what)
        self._out(node, layout)

    def _op_InstanceNormalization(self, node: gs.Node, what: str) -> None:
        layout = self._in(node)
        if layout is None or layout.axis != 1 or any(const_value(t) is None for t in node.inputs[1:3]):
            self._block_inputs(node, f"read by {what}")
            return
        for i in (1, 2):
            self._record(Action("slice", node, layout, i, 0, role="param"), what)
        self._out(node, layout)

    def _op_LayerNormalization(self, node: gs.Node, what: str) -> None:
        layout = self._in(node)
        axis = int(node.attrs.get("axis", -1))
        reason = f"{what} normalizes across these channels (a residual width)"
        if layout is not None and (axis if axis >= 0 else axis + layout.rank) <= layout.axis:
            self._block(layout, reason)
        else:
            self._block_inputs(node, f"read by {what}")
        shape = _shape(node.outputs[0])
        if shape and isinstance(shape[-1], int) and shape[-1] > 0 and axis in (-1, len(shape) - 1):
            # its output carries the residual stream on: a fresh space that says why it stays whole
            space = self._new_space(shape[-1], what)
            self._block_space(space, reason)
            self.layouts[node.outputs[0].name] = Layout(len(shape) - 1, len(shape), (Seg(space, 0, shape[-1]),))

    def _op_Softmax(self, node: gs.Node, what: str) -> None:
        layout = self._in(node)
        axis = int(node.attrs.get("axis", -1))
        if layout is not None and (axis if axis >= 0 else axis + layout.rank) != layout.axis:
            self._out(node, layout)
            return
        self._block(layout, f"{what} normalizes across these channels")

    def _op_Concat(self, node: gs.Node, what: str) -> None:
        layouts = [self.layouts.get(t.name) for t in node.inputs]
        axis = int(node.attrs["axis"])
        first = next(l for l in layouts if l is not None)
        axis = axis + first.rank if axis < 0 else axis
        if any(l is None for l in layouts) or any(l.axis != first.axis or l.rank != first.rank for l in layouts):
            self._block_inputs(node, f"{what} joins tensors whose channels are not all tracked")
            return
        if axis == first.axis and any(s.per > 1 for l in layouts for s in l.segs):
            self._block_inputs(node, f"{what} joins tensors along a head axis")
            return
        if axis == first.axis:
            segs = tuple(s for l in layouts for s in l.segs)
            self._out(node, Layout(first.axis, first.rank, segs))
            return
        if all(self._unite(first, l, what) for l in layouts[1:]):
            self._out(node, first)

    def _op_Split(self, node: gs.Node, what: str) -> None:
        layout = self._in(node)
        axis = int(node.attrs.get("axis", 0))
        if layout is None:
            self._block_inputs(node, f"read by {what}")
            return
        axis = axis + layout.rank if axis < 0 else axis
        if axis != layout.axis:
            for i in range(len(node.outputs)):
                self._out(node, layout, i)
            return
        sizes = node.attrs.get("split")
        if len(node.inputs) > 1 and node.inputs[1].name:
            sizes = const_value(node.inputs[1])
        if sizes is None:
            n = len(node.outputs)
            if layout.channels % n:
                self._block(layout, f"{what} splits unevenly")
                return
            sizes = [layout.channels // n] * n
        if any(s.inner != 1 or s.per != 1 for s in layout.segs):
            self._block(layout, f"{what} splits flattened channels or heads")
            return
        outs, start = [], 0
        for size in (int(s) for s in sizes):
            outs.append(Layout(layout.axis, layout.rank, _slice_segs(layout.segs, start, start + size)))
            start += size
        self._record(Action("split", node, layout, layouts=tuple(outs)), what)
        for i, out in enumerate(outs):
            self._out(node, out, i)

    def _flatten_to(self, node: gs.Node, what: str, layout: Layout) -> Layout | None:
        shape = _shape(node.inputs[0])
        if layout.axis != 1 or not _static(shape[2:] if shape else None) or any(s.per != 1 for s in layout.segs):
            self._block(layout, f"{what} flattens channels with unknown spatial size")
            return None
        inner = int(np.prod(shape[2:], dtype=np.int64))
        return Layout(1, 2, tuple(Seg(s.space, s.start, s.length, s.inner * inner) for s in layout.segs))

    def _op_Flatten(self, node: gs.Node, what: str) -> None:
        layout = self._in(node)
        if int(node.attrs.get("axis", 1)) != 1 or layout is None:
            self._block_inputs(node, f"read by {what} (flattens the channel axis with the batch)")
            return
        self._out(node, self._flatten_to(node, what, layout))

    def _op_Reshape(self, node: gs.Node, what: str) -> None:
        layout = self._in(node)
        shape_in, shape_out = _shape(node.inputs[0]), _shape(node.outputs[0])
        entries = _target_entries(node)
        if layout is None or entries is None or shape_in is None or shape_out is None:
            self._block_inputs(node, f"read by {what}, whose target shape is not known")
            return
        if self._heads(node, what, layout, shape_in, shape_out, entries):
            return
        target = const_value(node.inputs[1])
        if target is None or not _static(shape_in) or not _static(shape_out):
            self._block(layout, f"read by {what}, whose shapes are not known")
            return
        if (len(shape_out) == 2 and layout.axis == 1 and shape_out[0] == shape_in[0]
                and target[1] != 0 and all(s.per == 1 for s in layout.segs)):  # flatten into a Gemm
            out = self._flatten_to(node, what, layout)
            if out is not None:
                self._record(Action("reshape", node, out, axis=1), what)
                self._out(node, out)
            return
        if (layout.axis == len(shape_in) - 1 and shape_out[-1] == shape_in[-1] and target[-1] != 0
                and all(s.inner == 1 and s.per == 1 for s in layout.segs)):  # [B, S, D] <-> [B*S, D]
            out = layout.moved(len(shape_out) - 1, len(shape_out))
            self._record(Action("reshape", node, out, axis=len(shape_out) - 1), what)
            self._out(node, out)
            return
        self._block(layout, f"{what} splits or merges the channel axis in a way not modelled")

    def _heads(self, node: gs.Node, what: str, layout: Layout, shape_in: list, shape_out: list, entries) -> bool:
        """[.., D] -> [.., H, dh] (split into heads) or back (merge): whole heads go together."""
        segs = layout.segs
        if any(s.inner != 1 for s in segs):
            return False
        rank = layout.rank
        if (layout.axis == rank - 1 and len(entries) == rank + 1 and len(segs) == 1 and segs[0].per == 1
                and segs[0].start == 0 and segs[0].length == self.sizes[self.find(segs[0].space)]):
            (heads, h_at), (head_dim, _) = entries[-2], entries[-1]
            if heads is None or head_dim is None or heads * head_dim != segs[0].length or heads < 2:
                return False
            root = self.find(segs[0].space)
            if self.units[root] not in (1, head_dim):
                self._block_space(root, f"{what}: heads of another size than elsewhere")
            self.units[root] = head_dim
            out = Layout(rank - 1, rank + 1, (Seg(segs[0].space, 0, segs[0].length, 1, head_dim),))
            self._record(Action("reshape", h_at[0], out, index=h_at[1], axis=h_at[2]), what)
            self._out(node, out)
            return True
        if (all(s.per > 1 for s in segs) and len(entries) == rank - 1 and layout.axis == rank - 2
                and isinstance(shape_in[-1], int) and all(s.per == shape_in[-1] for s in segs)):
            width, w_at = entries[-1]
            if width is None or (width > 0 and width != sum(s.length for s in segs)):
                return False
            out = Layout(rank - 2, rank - 1, tuple(Seg(s.space, s.start, s.length) for s in segs))
            if width > 0:
                self._record(Action("reshape", w_at[0], out, index=w_at[1], axis=w_at[2]), what)
            self._out(node, out)
            return True
        return False

    def _op_Shape(self, node: gs.Node, what: str) -> None:
        """Reading dimensions is harmless where only other dimensions are gathered from it."""
        layout = self._in(node)
        uses = node.outputs[0].outputs
        ok = "start" not in node.attrs and "end" not in node.attrs and all(
            u.op == "Gather" and int(u.attrs.get("axis", 0)) == 0 and u.inputs[0] is node.outputs[0]
            and const_value(u.inputs[1]) is not None
            and layout.axis not in {int(i) % layout.rank for i in np.atleast_1d(const_value(u.inputs[1]))}
            for u in uses) and node.outputs[0].name not in {t.name for t in self.graph.outputs}
        if not ok:
            self._block(layout, f"its shape is read by {what}, which may use the channel count")

    def _op_Transpose(self, node: gs.Node, what: str) -> None:
        layout = self._in(node)
        perm = node.attrs.get("perm") or list(reversed(range(layout.rank)))
        self._out(node, layout.moved(list(perm).index(layout.axis)))

    def _op_Unsqueeze(self, node: gs.Node, what: str) -> None:
        self._squeeze(node, what, +1)

    def _op_Squeeze(self, node: gs.Node, what: str) -> None:
        self._squeeze(node, what, -1)

    def _squeeze(self, node: gs.Node, what: str, sign: int) -> None:
        layout = self._in(node)
        axes = node.attrs.get("axes")
        if len(node.inputs) > 1 and node.inputs[1].name:
            axes = const_value(node.inputs[1])
        if axes is None:
            self._block_inputs(node, f"read by {what} without constant axes")
            return
        rank = layout.rank + sign * len(axes)
        axes = sorted(int(a) + (rank if sign > 0 else layout.rank) if int(a) < 0 else int(a) for a in axes)
        if sign < 0:
            if layout.axis in axes:
                self._block(layout, f"{what} squeezes the channel axis")
                return
            self._out(node, layout.moved(layout.axis - sum(a < layout.axis for a in axes), rank))
            return
        axis = layout.axis
        for a in axes:
            if a <= axis:
                axis += 1
        self._out(node, layout.moved(axis, rank))

    def _reduce(self, node: gs.Node) -> bool:
        layout = self._in(node)
        axes = node.attrs.get("axes")
        if len(node.inputs) > 1 and node.inputs[1].name:
            axes = const_value(node.inputs[1])
        if axes is None:
            return False
        axes = sorted(int(a) + layout.rank if int(a) < 0 else int(a) for a in axes)
        if layout.axis in axes:
            return False
        keep = int(node.attrs.get("keepdims", 1))
        self._out(node, layout if keep else layout.moved(layout.axis - sum(a < layout.axis for a in axes),
                                                        layout.rank - len(axes)))
        return True

    def _binary(self, node: gs.Node, what: str) -> bool:
        """Elementwise with broadcasting: constants per channel are sliced, activations united."""
        out_shape = _shape(node.outputs[0])
        if out_shape is None:
            return False
        rank = len(out_shape)
        lead: Layout | None = None
        for t in node.inputs:
            layout = self.layouts.get(t.name)
            if layout is not None:
                layout = layout.moved(layout.axis + rank - layout.rank, rank)
                if lead is None:
                    lead = layout
                elif not self._unite(lead, layout, f"{what} (residual)"):
                    return True
        for i, t in enumerate(node.inputs):
            if t.name in self.layouts:
                continue
            shape = _shape(t)
            if shape is None:
                self._block(lead, f"{what} reads an operand of unknown shape")
                return True
            axis = lead.axis - (rank - len(shape))
            if axis < 0 or shape[axis] == 1:
                continue
            if const_value(t) is None:
                self._block(lead, f"{what} adds a tensor whose channels are not tracked (a residual stream, a model input)")
                return True
            self._record(Action("slice", node, lead.moved(axis, len(shape)), i, axis, role="param"), what)
        self._out(node, lead)
        return True

    # ------------------------------------------------------------- result
    def _collect(self) -> list[Group]:
        groups: dict[int, Group] = {}
        for s in range(len(self.parent)):
            r = self.find(s)
            g = groups.setdefault(r, Group(r, self.sizes[r], self.blocks[r], self.units[r],
                                           reasons=list(self.reasons[r])))
            if s == r:
                g.producers = list(self.producers[r])
            g.consumers += self.consumers.get(s, [])
            g.members += self.members.get(s, [])
        for action in self.actions:
            for r in {self.find(seg.space) for seg in action.layout.segs} | {
                    self.find(seg.space) for lay in action.layouts for seg in lay.segs}:
                groups[r].actions.append(action)
        for g in groups.values():
            g.consumers = sorted(set(g.consumers))
            g.members = sorted(set(g.members))
            if g.size < 2 and not g.reasons:
                g.reasons.append("a single channel")
        return [groups[r] for r in sorted(groups)]


def _target_entries(node: gs.Node) -> list | None:
    """A Reshape target's entries: ``(value or None, (holder node, input index, position))``,
    for a constant target or a Concat of 1-D pieces (the dynamic shapes exporters build)."""
    t = node.inputs[1]
    value = const_value(t)
    if value is not None:
        return [(int(v), (node, 1, i)) for i, v in enumerate(value)]
    if not t.inputs or t.inputs[0].op != "Concat" or len(t.outputs) != 1:
        return None
    concat = t.inputs[0]
    out = []
    for j, piece in enumerate(concat.inputs):
        v = const_value(piece)
        if v is not None:
            out += [(int(x), (concat, j, i)) for i, x in enumerate(np.atleast_1d(v))]
        elif piece.shape is not None and len(piece.shape) == 1 and isinstance(piece.shape[0], int):
            out += [(None, None)] * piece.shape[0]
        else:
            return None
    return out


def _slice_segs(segs: tuple[Seg, ...], lo: int, hi: int) -> tuple[Seg, ...]:
    out, pos = [], 0
    for s in segs:
        a, b = max(lo, pos), min(hi, pos + s.length)
        if a < b:
            out.append(Seg(s.space, s.start + a - pos, b - a, s.inner))
        pos += s.length
    return tuple(out)


def channel_groups(graph: gs.Graph) -> Analysis:
    """The analysis of ``graph`` (which it does not modify): ``.groups`` and ``.find``."""
    return Analysis(graph)


def kept_indices(layout: Layout, kept: dict[int, np.ndarray], find) -> np.ndarray:
    """Positions along a tensor's channel axis that survive, given the kept channels of each
    group (by root space; groups not in ``kept`` keep everything)."""
    idx, offset = [], 0
    for s in layout.segs:
        k = kept.get(find(s.space))
        local = np.arange(s.length) if k is None else k[(k >= s.start) & (k < s.start + s.length)] - s.start
        if s.per > 1:  # whole heads are kept: one position per head
            local = np.unique(local // s.per)
        idx.append((offset + local[:, None] * s.inner + np.arange(s.inner)[None, :]).reshape(-1))
        offset += s.length // s.per * s.inner
    return np.concatenate(idx).astype(np.int64) if idx else np.zeros(0, np.int64)


def layout_size(layout: Layout) -> int:
    return sum(s.length // s.per * s.inner for s in layout.segs)
