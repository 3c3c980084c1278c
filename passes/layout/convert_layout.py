"""convert-layout: move layout Transposes to the edges of the graph and cancel them.

A model converted from NHWC (tf2onnx, TFLite, Keras) wraps every Conv and pooling op in a pair
``Transpose(NHWC->NCHW) -> Conv -> Transpose(NCHW->NHWC)``; between two convolutions the inner
pair cancels once the Transposes meet. This pass sinks each Transpose down through chains of
layout-agnostic ops, with their axes remapped:

    N(Transpose(x, p), c)  ->  Transpose(N(x, c'), p')

for elementwise ops and activations (constants broadcast and permuted: ``c' = c`` moved by the
inverse of ``p``), Concat/Split/Softmax (axis ``p[axis]``), Pad (pads), Slice (axes), Resize
(scales, sizes, roi) and reductions (axes; ``p'`` drops the reduced axes without keepdims).
A Transpose goes down when all its readers are ops it can sink through (each takes a copy); a
sinking step removes the Transposes on a node's inputs and adds one per output, and meeting
Transposes are then merged or removed by fuse-transposes. The rewrite is applied to a copy, and kept only when it leaves
fewer Transposes, or as many that move fewer elements (one sunk below a reduction). Elementwise ops, Concat, Split, Pad, Slice and Resize give bit-identical
outputs; a reduction or Softmax over other axes of the same values adds them in another order
(ONNX Runtime vectorizes along the innermost axis), so the contract is reassociating.

ONNX's Conv and pools are NCHW only, so the pass cannot run a convolution in NHWC: an NCHW model
keeps the layout (ONNX Runtime's CPU kernels have no fp32 NHWC Conv and reorder to their own
blocked layout; TVM's llvm target converts conv2d to NHWC itself, target option cpu_layout).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, get_pass, register_pass
from infoptc.passes.fuse.fuse_transposes import SCALAR_BINARY, UNARY
from infoptc.rewrite import cleanup, toposort

BROADCAST = tuple(sorted(set(SCALAR_BINARY) | {"Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal", "Greater",
                                               "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod"}))
ACTIVATIONS = tuple(sorted(set(UNARY) | {"Clip", "Dropout", "Softmax", "LogSoftmax", "Hardmax"}))
REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
SINKABLE = frozenset(BROADCAST + ACTIVATIONS + REDUCTIONS + ("Concat", "Split", "Pad", "Slice", "Resize"))


def _perm_of(node: gs.Node, rank: int | None) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    return None if rank is None else list(range(rank))[::-1]


def _transpose_input(t: gs.Tensor) -> tuple[gs.Node, list[int]] | None:
    """The Transpose that writes ``t`` and its perm, when ``t`` is a Transpose's output."""
    if len(t.inputs) != 1 or t.inputs[0].op != "Transpose" or (t.inputs[0].domain or "") not in ("", "ai.onnx"):
        return None
    node = t.inputs[0]
    rank = len(t.shape) if t.shape is not None else None
    perm = _perm_of(node, rank)
    return None if perm is None else (node, perm)


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _const(t: gs.Tensor) -> np.ndarray | None:
    return t.values if isinstance(t, gs.Constant) else None


class _Sinker:
    """Sinks the Transposes of one graph (a copy); ``moved`` counts the steps."""

    def __init__(self, graph: gs.Graph, opset: int):
        self.graph, self.opset, self.moved = graph, opset, 0
        self.fresh = 0

    def name(self, base: str) -> str:
        self.fresh += 1
        return f"{base}__layout{self.fresh}"

    def run(self, limit: int) -> int:
        for done in range(limit):
            if not self.step():
                return done
        return limit

    def step(self) -> bool:
        for node in list(self.graph.nodes):
            if node.op in SINKABLE and (node.domain or "") in ("", "ai.onnx") and self.sink(node):
                self.moved += 1
                return True
        return False

    def sink(self, node: gs.Node) -> bool:
        data = self._data_positions(node)
        if not data:
            return False
        perm = None
        sources: dict[int, gs.Tensor] = {}
        for k in data:
            t = node.inputs[k]
            if _const(t) is not None:
                continue
            found = _transpose_input(t)
            if found is None or (perm is not None and found[1] != perm):
                return False
            perm = found[1]
            if t in self.graph.outputs or not all(c is node or c.op in SINKABLE for c in t.outputs):
                # Other readers: sinking adds a Transpose unless every reader takes one in turn
                # (the whole rewrite is dropped if it ends with more).
                return False
            sources[k] = found[0].inputs[0]
        if perm is None or perm == sorted(perm):
            return False
        if any(_const(node.inputs[k]).ndim > len(perm) for k in data if k not in sources):
            return False
        out_perm = self._rewrite_attrs(node, perm)
        if out_perm is None:
            return False
        inv = _inverse(perm)
        for k in data:
            if k in sources:
                node.inputs[k] = sources[k]
            else:
                c = _const(node.inputs[k])
                moved = np.transpose(c.reshape((1,) * (len(perm) - c.ndim) + c.shape), inv)
                node.inputs[k] = gs.Constant(self.name(node.inputs[k].name), np.ascontiguousarray(moved))
        if out_perm == sorted(out_perm):
            return True  # the reduction removed the permuted axes: the output is as before
        for k, out in enumerate(list(node.outputs)):
            shape = None if out.shape is None else [out.shape[i] for i in _inverse(out_perm)]
            inner = gs.Variable(self.name(out.name), dtype=out.dtype, shape=shape)
            node.outputs[k] = inner
            self.graph.nodes.append(gs.Node(op="Transpose", name=self.name(node.name + "/Transpose"),
                                            attrs={"perm": out_perm}, inputs=[inner], outputs=[out]))
        return True

    def _data_positions(self, node: gs.Node) -> list[int]:
        """Inputs that carry the layout: all for broadcasting ops and Concat, else the first."""
        if node.op in BROADCAST or node.op == "Concat":
            return [k for k, t in enumerate(node.inputs) if t.name]
        if node.op == "Clip":
            if any(_const(t) is None or _const(t).size != 1 for t in node.inputs[1:] if t.name):
                return []
        elif node.op == "Dropout" and len(node.outputs) > 1:
            return []
        return [0]

    def _rewrite_attrs(self, node: gs.Node, perm: list[int]) -> list[int] | None:
        """Remap ``node``'s axes for data in the source layout; the perm its output takes, or None
        when it cannot be remapped (the node is left untouched then)."""
        rank, op = len(perm), node.op
        if op in ("Concat", "Split", "Softmax", "LogSoftmax", "Hardmax"):
            if op in ("Softmax", "LogSoftmax", "Hardmax") and self.opset < 13:
                return None  # before opset 13 the axis flattens everything after it
            axis = int(node.attrs.get("axis", 1 if op == "Concat" else -1 if op != "Split" else 0)) % rank
            if op == "Split" and len(node.inputs) > 1 and _const(node.inputs[1]) is None and node.inputs[1].name:
                return None
            node.attrs["axis"] = perm[axis]
            return perm
        if op in REDUCTIONS:
            return self._reduction(node, perm)
        if op == "Pad":
            return self._remap_inputs(node, {1: "pairs"}, perm, forbid=(3,))
        if op == "Slice":
            return self._slice(node, perm)
        if op == "Resize":
            if node.attrs.get("axes") is not None:
                return None
            return self._remap_inputs(node, {1: "pairs", 2: "per_axis", 3: "per_axis"}, perm)
        return perm  # elementwise: the output has the input's layout

    def _remap_inputs(self, node: gs.Node, kinds: dict[int, str], perm: list[int], forbid=()) -> list[int] | None:
        rank = len(perm)
        if any(k < len(node.inputs) and node.inputs[k].name for k in forbid):
            return None
        new = {}
        for k, kind in kinds.items():
            if k >= len(node.inputs) or not node.inputs[k].name:
                continue
            v = _const(node.inputs[k])
            if v is None:
                return None
            if kind == "pairs" and v.size == 2 * rank:
                moved = np.empty_like(v)
                for i in range(rank):
                    moved[perm[i]], moved[rank + perm[i]] = v[i], v[rank + i]
            elif kind == "per_axis" and v.size == rank:
                moved = np.empty_like(v)
                for i in range(rank):
                    moved[perm[i]] = v[i]
            elif v.size == 0:
                continue
            else:
                return None
            new[k] = gs.Constant(self.name(node.inputs[k].name), moved)
        for k, c in new.items():
            node.inputs[k] = c
        return perm

    def _slice(self, node: gs.Node, perm: list[int]) -> list[int] | None:
        starts = _const(node.inputs[1])
        if starts is None:
            return None
        if len(node.inputs) > 3 and node.inputs[3].name:
            axes = _const(node.inputs[3])
            if axes is None:
                return None
        else:
            axes = np.arange(starts.size, dtype=np.int64)
        moved = np.array([perm[int(a) % len(perm)] for a in axes.reshape(-1)], dtype=axes.dtype)
        constant = gs.Constant(self.name(node.name + "/axes"), moved)
        if len(node.inputs) > 3:
            node.inputs[3] = constant
        else:
            node.inputs.append(constant)
        return perm

    def _reduction(self, node: gs.Node, perm: list[int]) -> list[int] | None:
        rank = len(perm)
        in_input = len(node.inputs) > 1 and node.inputs[1].name
        if in_input:
            axes = _const(node.inputs[1])
            if axes is None:
                return None
            axes = [int(a) % rank for a in axes.reshape(-1)]
        elif node.attrs.get("axes") is not None:
            axes = [int(a) % rank for a in node.attrs["axes"]]
        else:
            return None  # all axes (or noop_with_empty_axes): leave it
        moved = [perm[a] for a in axes]
        if in_input:
            node.inputs[1] = gs.Constant(self.name(node.inputs[1].name), np.array(moved, dtype=np.int64))
        else:
            node.attrs["axes"] = moved
        if int(node.attrs.get("keepdims", 1)):
            return perm
        kept_out = [i for i in range(rank) if i not in axes]  # output dims, in the transposed data's order
        kept_src = sorted(perm[i] for i in kept_out)  # output dims of the reduction of the source
        return [kept_src.index(perm[i]) for i in kept_out]


def count_transposes(graph: gs.Graph) -> int:
    return sum(n.op == "Transpose" for n in graph.nodes)


def _transpose_cost(graph: gs.Graph) -> tuple[int, int]:
    """How many Transposes, and how many elements they move (where shapes are known)."""
    moved = 0
    for n in graph.nodes:
        shape = n.outputs[0].shape if n.op == "Transpose" else None
        if shape is not None and all(isinstance(d, int) for d in shape):
            moved += int(np.prod(shape, dtype=np.int64))
    return count_transposes(graph), moved


@register_pass
class ConvertLayout(Pass):
    name = "convert-layout"
    summary = "sink layout Transposes through layout-agnostic ops (axes remapped) so that pairs cancel"
    contract = Contract.REASSOCIATING
    options = {"max-steps": Option(10000, "most sinking steps")}

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = _transpose_cost(graph)
        if not before[0]:
            return PassResult(False, {"transposes_removed": 0, "sunk": 0})
        work = graph.copy()
        sinker = _Sinker(work, ctx.opset)
        # Merging meeting Transposes frees others to sink (a Transpose read by two that cancel it and
        # by an Add can sink through the Add once the two are gone): alternate until nothing moves.
        fuse, scratch = get_pass("fuse-transposes")(), PassContext(opset=ctx.opset, target=ctx.target)
        while sinker.run(self.opts["max-steps"] - sinker.moved):
            cleanup(work)
            toposort(work)
            fuse.run(work, scratch)
            cleanup(work)
            toposort(work)
            scratch.analyses.clear()
        after = _transpose_cost(work)
        if after >= before:  # kept only with fewer Transposes, or as many moving fewer elements
            return PassResult(False, {"transposes_removed": 0, "sunk": 0})
        graph.nodes, graph.inputs, graph.outputs = work.nodes, work.inputs, work.outputs
        return PassResult(True, {"transposes_removed": before[0] - after[0], "sunk": sinker.moved})
