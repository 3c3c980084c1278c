"""fold-shapes: replace shape computations by constants once shapes are known.

Exporters build shapes at run time (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``) even
where most dimensions are fixed. This pass

1. refreshes shapes: ONNX shape inference with data propagation over the current graph, so
   dimensions bound with ``--input-shape`` (or made static by earlier folding) reach every tensor;
2. evaluates shape arithmetic symbolically: each small integer vector is a list of dimensions,
   each a number or a symbol (a named dimension such as ``batch``, or "dimension i of tensor t").
   ``Shape``, ``Size``, ``Gather``, ``Unsqueeze``, ``Squeeze``, ``Concat``, ``Slice``, ``Cast`` and
   ``Identity`` are understood; a vector whose entries are all numbers becomes a constant
   (fold-constants then folds what hangs off it: Range, Expand, Slice of buffers, ...);
3. where symbols remain, makes ``Reshape`` and ``Expand`` shapes constant anyway when each symbol
   is the very dimension the op would keep: ``Reshape(x, [dim0(x), dim1(x), 4, 64])`` becomes
   ``Reshape(x, [0, 0, 4, 64])`` (0 copies the input's dimension) and ``Expand(x, [.., dim(x)])``
   gets a 1 there. The shape subgraph then dies even for dynamic batch and sequence.

Two symbols are equal when they are the same dimension of the same tensor, or carry the same
name: ONNX gives one symbolic name one value throughout a model.
Contract: ``exact`` (only integer shape values are computed).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from infoptc.ir import iter_graphs
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from infoptc.rewrite import (
    Detacher, Namer, constant_value, graphs_of, is_standard, overridable, replace_with_constants, tensor_map,
)

Dim = int | tuple  # a number, or a symbol: ("name", "batch") / ("dim", id(tensor), axis)

SHAPE_OPS = frozenset({"Shape", "Size"})
SHAPE_CONSUMERS = frozenset({"Reshape", "Expand"})
MAX_VECTOR = 64  # longer integer constants are data, not shapes
INFERENCE_CONSTANT_LIMIT = 4096  # bytes; larger constants reach shape inference as typed inputs


class Vector:
    """A small integer tensor whose entries are known numbers or symbols; ``scalar`` for 0-d."""

    __slots__ = ("dims", "scalar")

    def __init__(self, dims: list[Dim], scalar: bool = False):
        self.dims = dims
        self.scalar = scalar

    @property
    def known(self) -> bool:
        return all(isinstance(d, int) for d in self.dims)


def dim_symbol(t: gs.Tensor, axis: int) -> Dim | None:
    shape = t.shape
    if shape is None or not 0 <= axis < len(shape):
        return None
    d = shape[axis]
    if isinstance(d, (int, np.integer)) and d >= 0:
        return int(d)
    if isinstance(d, str) and d:
        return ("name", d)
    return ("dim", id(t), axis)


def _tensor_dims(t: gs.Tensor) -> list[Dim] | None:
    if t.shape is None:
        return None
    return [dim_symbol(t, i) for i in range(len(t.shape))]


# ----------------------------------------------------------------------------- shape refresh


def refresh_shapes(graph: gs.Graph, graphs: list[gs.Graph]) -> int:
    """Run ONNX shape inference (with data propagation) on a light copy of ``graph`` and write
    every shape it learns back; returns how many tensors got a more precise shape."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    inputs, initializers = [], []
    for t in graph.inputs:
        if isinstance(t, gs.Constant):
            continue  # listed below as an initializer, which also keeps it an input
        inputs.append(OnnxExporter.export_value_info_proto(t, do_type_check=False))
    seen: set[str] = {t.name for t in inputs}
    for t in tensor_map(graph).values():
        if not isinstance(t, gs.Constant) or t.name in seen:
            continue
        seen.add(t.name)
        nbytes = int(getattr(t._values, "nbytes", 0))
        if nbytes <= INFERENCE_CONSTANT_LIMIT:
            initializers.append(OnnxExporter.export_tensor_proto(t))
        else:  # a weight: its type is enough, copying it would cost time and memory
            inputs.append(onnx.helper.make_tensor_value_info(t.name, _onnx_dtype(t), list(t.shape)))
    try:
        nodes = [OnnxExporter.export_node(n) for n in graph.nodes]
        outputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
        proto = onnx.helper.make_graph(nodes, graph.name or "g", inputs, outputs, initializers)
        model = onnx.helper.make_model(proto, opset_imports=_opsets(graph))
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference rejects the graph: keep the shapes we have
        return 0
    learned: dict[str, list] = {}
    for g in iter_graphs(inferred.graph):
        for vi in list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tt.HasField("shape"):
                learned[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in tt.shape.dim]
    improved = 0
    for g in graphs:
        for t in tensor_map(g).values():
            new = learned.get(t.name)
            if new is None or isinstance(t, gs.Constant):
                continue
            old = t.shape
            if old is None:
                t.shape = new
                improved += 1
            elif len(old) == len(new):
                # take numbers for symbols, and names for unknowns; keep the names we had
                merged = [n if (isinstance(n, int) and not _is_number(o)) or (not o and isinstance(n, str)) else o
                          for o, n in zip(old, new)]
                if merged != list(old):
                    t.shape = merged
                    improved += 1
    return improved


def _is_number(d) -> bool:
    return isinstance(d, (int, np.integer)) and d >= 0


def _onnx_dtype(t: gs.Constant) -> int:
    export = t.export_dtype
    return export if isinstance(export, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(export))


def _opsets(graph: gs.Graph) -> list:
    domains = getattr(graph, "import_domains", None)
    if domains:
        return list(domains)
    return [onnx.helper.make_opsetid("", graph.opset)]


# ----------------------------------------------------------------------------- symbolic values


class _Interpreter:
    """Symbolic values of the small integer tensors of a graph, computed in node order."""

    def __init__(self, locked: set[int]):
        self.locked = locked
        self.values: dict[int, Vector] = {}

    def value(self, t: gs.Tensor) -> Vector | None:
        if id(t) in self.values:
            return self.values[id(t)]
        if not isinstance(t, gs.Constant) or len(t.shape) > 1 or int(np.prod(t.shape)) > MAX_VECTOR:
            return None  # checked before loading: this may be a large weight
        const = constant_value(t, self.locked)
        if const is None or const.dtype.kind not in "iu" or const.ndim > 1 or const.size > MAX_VECTOR:
            return None
        vec = Vector([int(v) for v in const.reshape(-1)], scalar=const.ndim == 0)
        self.values[id(t)] = vec
        return vec

    def const_ints(self, t: gs.Tensor | None) -> list[int] | None:
        if t is None or not t.name:
            return None
        vec = self.value(t)
        return vec.dims if vec is not None and vec.known else None

    def visit(self, node: gs.Node) -> Vector | None:
        handler = getattr(self, f"_{node.op}", None)
        if handler is None or not is_standard(node) or not node.outputs:
            return None
        try:
            result = handler(node)
        except (IndexError, ValueError, TypeError, KeyError):
            return None
        if result is not None:
            self.values[id(node.outputs[0])] = result
        return result

    def _Shape(self, node):
        dims = _tensor_dims(node.inputs[0])
        if dims is None:
            return None
        rank = len(dims)
        start, end = node.attrs.get("start", 0), node.attrs.get("end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        return Vector(dims[start:end])

    def _Size(self, node):
        dims = _tensor_dims(node.inputs[0])
        if dims is None or not all(isinstance(d, int) for d in dims):
            return None
        return Vector([int(np.prod(dims, dtype=np.int64))], scalar=True)

    def _Identity(self, node):
        return self.value(node.inputs[0])

    def _Cast(self, node):
        src = self.value(node.inputs[0])
        to = node.attrs.get("to")
        if src is None or to not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            return None
        if to == onnx.TensorProto.INT32 and not all(isinstance(d, int) and abs(d) < 2**31 for d in src.dims):
            return None  # a symbol might not fit: keep it dynamic
        return Vector(list(src.dims), src.scalar)

    def _Gather(self, node):
        data, idx = self.value(node.inputs[0]), self.value(node.inputs[1])
        if data is None or data.scalar or idx is None or not idx.known or node.attrs.get("axis", 0) not in (0, -1):
            return None
        n = len(data.dims)
        if not all(-n <= i < n for i in idx.dims):
            return None
        return Vector([data.dims[i] for i in idx.dims], scalar=idx.scalar)

    def _Unsqueeze(self, node):
        src = self.value(node.inputs[0])
        axes = self.const_ints(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("axes")
        if src is None or axes is None or not src.scalar or list(axes) not in ([0], [-1]):
            return None
        return Vector(list(src.dims))

    def _Squeeze(self, node):
        src = self.value(node.inputs[0])
        axes = self.const_ints(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("axes")
        if src is None or src.scalar or len(src.dims) != 1 or axes not in (None, [0], [-1]):
            return None
        return Vector(list(src.dims), scalar=True)

    def _Concat(self, node):
        parts = [self.value(t) for t in node.inputs]
        if any(p is None or p.scalar for p in parts) or node.attrs.get("axis") not in (0, -1):
            return None
        return Vector([d for p in parts for d in p.dims])

    def _Slice(self, node):
        src = self.value(node.inputs[0])
        if src is None or src.scalar:
            return None
        if len(node.inputs) > 1:
            starts, ends = self.const_ints(node.inputs[1]), self.const_ints(node.inputs[2])
            axes = self.const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else [0]
            steps = self.const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else [1]
        else:
            starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
            axes, steps = node.attrs.get("axes", [0]), [1]
        if None in (starts, ends, axes, steps) or len(starts) != 1 or list(axes) not in ([0], [-1]) or steps[0] == 0:
            return None
        n = len(src.dims)
        # ONNX clamps like Python slicing for the values an int64 vector can hold.
        return Vector(src.dims[slice(*slice(starts[0], ends[0], steps[0]).indices(n))])


# ----------------------------------------------------------------------------- the pass


@register_pass
class FoldShapes(Pass):
    name = "fold-shapes"
    summary = "refresh shapes, fold Shape/Size arithmetic to constants, make Reshape/Expand shapes static"
    contract = Contract.EXACT
    reports_changes = True
    options = {
        "infer": Option(True, "refresh shapes with ONNX shape inference before folding"),
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counters = Counter({"shape_values": 0, "reshape_shapes": 0, "expand_shapes": 0, "refined_shapes": 0})
        graphs = graphs_of(graph, ctx)
        if not any(_worth_a_look(n) for g in graphs for n in g.nodes):
            return PassResult(False, dict(counters))
        if self.opts["infer"]:
            counters["refined_shapes"] = refresh_shapes(graph, graphs)
        interp = _Interpreter(overridable(graphs))
        namer, detacher = Namer(graphs), Detacher()
        for g in graphs:
            added: dict[int, list[gs.Node]] = {}
            graph_outputs = {id(t) for t in g.outputs}
            for node in list(g.nodes):
                result = interp.visit(node)
                if (result is not None and result.known and node.op != "Constant"
                        and len(node.outputs) == 1 and node.outputs[0].name
                        and (node.outputs[0].outputs or id(node.outputs[0]) in graph_outputs)):
                    value = self._materialize(node.outputs[0], result)
                    if value is not None:
                        new = replace_with_constants(g, node, [value], namer, detacher)
                        if new:
                            added[id(node)] = new
                        counters["shape_values"] += 1
                        continue
                if node.op == "Reshape" and is_standard(node):
                    counters["reshape_shapes"] += self._static_reshape(node, interp, namer)
                elif node.op == "Expand" and is_standard(node):
                    counters["expand_shapes"] += self._static_expand(node, interp, namer)
            if added:
                g.nodes = [m for n in g.nodes for m in ([n] + added.get(id(n), []))]
        detacher.flush()
        changed = counters["shape_values"] + counters["reshape_shapes"] + counters["expand_shapes"] > 0
        # refined shapes change only annotations; they matter to later passes, not to the graph
        return PassResult(changed=changed or counters["refined_shapes"] > 0, counters=dict(counters))

    @staticmethod
    def _materialize(out: gs.Tensor, vec: Vector) -> np.ndarray | None:
        dtype = np.dtype(out.dtype) if out.dtype is not None and not isinstance(out.dtype, int) else np.dtype(np.int64)
        if dtype.kind not in "iu":
            return None
        value = np.array(vec.dims, dtype=dtype)
        return value.reshape(()) if vec.scalar else value

    @staticmethod
    def _static_reshape(node: gs.Node, interp: _Interpreter, namer: Namer) -> int:
        """Reshape(x, [.. dim_i(x) ..]) -> Reshape(x, [.. 0 ..]): 0 copies the input's dim i."""
        if len(node.inputs) < 2 or node.attrs.get("allowzero", 0) or isinstance(node.inputs[1], gs.Constant):
            return 0
        vec = interp.values.get(id(node.inputs[1]))
        x = node.inputs[0]
        if vec is None or vec.scalar or vec.known or x.shape is None:
            return 0
        new = []
        for i, d in enumerate(vec.dims):
            if isinstance(d, int):
                new.append(d)
            elif i < len(x.shape) and dim_symbol(x, i) == d:
                new.append(0)
            else:
                return 0
        node.inputs[1] = gs.Constant(namer(f"{node.name or 'Reshape'}/shape"), np.array(new, dtype=np.int64))
        return 1

    @staticmethod
    def _static_expand(node: gs.Node, interp: _Interpreter, namer: Namer) -> int:
        """Expand(x, [.. dim_k(x) ..]) -> Expand(x, [.. 1 ..]): broadcasting keeps x's dim k."""
        if len(node.inputs) < 2 or isinstance(node.inputs[1], gs.Constant):
            return 0
        vec = interp.values.get(id(node.inputs[1]))
        x = node.inputs[0]
        if vec is None or vec.scalar or vec.known or x.shape is None:
            return 0
        offset = len(vec.dims) - len(x.shape)
        new = []
        for j, d in enumerate(vec.dims):
            k = j - offset
            if isinstance(d, int):
                new.append(d)
            elif k >= 0 and dim_symbol(x, k) == d:
                new.append(1)
            else:
                return 0
        node.inputs[1] = gs.Constant(namer(f"{node.name or 'Expand'}/shape"), np.array(new, dtype=np.int64))
        return 1


def _worth_a_look(node: gs.Node) -> bool:
    if node.op in SHAPE_OPS:
        return True
    return node.op in SHAPE_CONSUMERS and len(node.inputs) > 1 and not isinstance(node.inputs[1], gs.Constant)
