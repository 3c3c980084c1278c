"""fold-constants: evaluate nodes whose inputs are all constants and store their outputs.

Every node of a standard-domain op whose inputs are all constants is evaluated once with ONNX's
reference evaluator (one cached evaluator per op, attributes and input types) and its outputs
become initializers; ``Constant`` nodes become initializers directly, and ``Shape``/``Size`` of a
tensor whose shape is fully static become constants. Never folded:

* non-deterministic ops (RandomNormal, Bernoulli, Dropout, ...) and ops outside the standard
  domain, whose semantics we cannot know;
* nodes with subgraphs (If/Loop/Scan);
* ``DequantizeLinear``: quantized models keep weights in their quantized form for the runtime;
* initializers that are also graph inputs: a user may override them at run time
  (``fold-input-initializers=true`` turns them into plain initializers first);
* outputs above ``size-limit`` bytes, unless the node only consumes constants that die with it
  (then folding cannot grow the model), or unless every use of the outputs is a parameter
  input (a Conv/Gemm/MatMul weight, a normalization scale, an embedding table), which every
  runtime materializes at load anyway: those fold up to ``weight-size-limit``.
  ConstantOfShape/Expand/Tile/Range sizes are predicted before evaluating, so activations-sized
  masks and broadcasts never blow a model up; such nodes count as ``skipped_too_large``.

Contract: ``reassociating``: the reference evaluator computes floating-point ops with numpy,
which can differ from the runtime's kernels in the last bits (exp, erf, reductions). With
``exact-only=true`` the pass folds only what every evaluator computes bit for bit (integer and
boolean arithmetic, data movement of any dtype, Constant nodes) and its contract is ``exact``.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, parse_size, register_pass
from infoptc.rewrite import (
    Detacher, Namer, constant_value, graphs_of, is_standard, node_subgraphs, numpy_dtype, overridable,
    replace_with_constants,
)

# Ops whose output is not a function of their inputs (Dropout is random in training mode;
# eliminate-noops removes it at inference).
NONDETERMINISTIC_OPS = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli", "Dropout",
})

# Inputs up to this many bytes in all: a folded node's result is remembered for equal inputs.
MEMO_INPUT_BYTES = 1024

# Folding these would undo what the model author meant to keep (quantized weights).
KEEP_OPS = frozenset({"DequantizeLinear"})

# Ops that make or read sequences and optionals: their values are not tensors, and a
# constant initializer can only hold a tensor.
NON_TENSOR_OPS = frozenset({
    "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt",
    "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence",
    "Optional", "OptionalGetElement", "OptionalHasElement",
})

# Ops that only move or select elements: bit-exact in any evaluator, whatever the dtype.
DATA_MOVEMENT_OPS = frozenset({
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split",
    "Slice", "Gather", "GatherElements", "GatherND", "Expand", "Tile", "Where", "Shape", "Size",
    "ConstantOfShape", "Pad", "DepthToSpace", "SpaceToDepth", "Compress", "ReverseSequence",
})


# Inputs that hold a model's parameters (op -> input indices): weights, biases, normalization
# scales, embedding tables. A constant there is materialized by every runtime when it loads the
# model (ONNX Runtime prepacks it, TVM binds it), so folding it into an initializer moves work
# from load time to compile time without changing what the runtime holds in memory.
WEIGHT_INPUTS: dict[str, frozenset[int]] = {
    "Conv": frozenset({1, 2}), "ConvTranspose": frozenset({1, 2}), "Gemm": frozenset({1, 2}),
    "MatMul": frozenset({0, 1}), "BatchNormalization": frozenset({1, 2, 3, 4}),
    "InstanceNormalization": frozenset({1, 2}), "LayerNormalization": frozenset({1, 2}),
    "GroupNormalization": frozenset({1, 2}), "Gather": frozenset({0}), "PRelu": frozenset({1}),
    "LSTM": frozenset({1, 2, 3}), "GRU": frozenset({1, 2, 3}), "RNN": frozenset({1, 2, 3}),
}

# Ops that only reshape or retype a weight on its way to the op that uses it.
WEIGHT_PASSTHROUGH_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"})


# ----------------------------------------------------------------------------- tensor facts


def static_shape(t: gs.Tensor) -> tuple[int, ...] | None:
    shape = t.shape
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def tensor_nbytes(t: gs.Tensor) -> int:
    if isinstance(t, gs.Constant):
        values = t._values  # LazyValues know their size without loading
        return int(getattr(values, "nbytes", 0))
    return 0


# ----------------------------------------------------------------------------- evaluation


class _Evaluator:
    """One-node models run by onnx.reference, one evaluator per distinct node signature."""

    def __init__(self, opset: int):
        self.opset = opset
        self.cache: dict[tuple, object] = {}
        # Exporters repeat the same small constant arithmetic in every layer: equal inputs give
        # equal outputs (only deterministic ops are folded), so those are evaluated once.
        self.results: dict[tuple, list[np.ndarray | None]] = {}

    def run(self, node: gs.Node, inputs: list[np.ndarray | None]) -> list[np.ndarray | None]:
        from onnx.reference import ReferenceEvaluator
        from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

        attrs = OnnxExporter.export_attributes(node.attrs)
        out_mask = tuple(bool(o.name) for o in node.outputs)
        key = (node.op, tuple(a.SerializeToString() for a in attrs),
               tuple(None if v is None else v.dtype.str for v in inputs), out_mask)
        evaluator = self.cache.get(key)
        if evaluator is None:
            in_names = [f"i{k}" if v is not None else "" for k, v in enumerate(inputs)]
            out_names = [f"o{k}" if used else "" for k, used in enumerate(out_mask)]
            proto = onnx.helper.make_node(node.op, in_names, out_names)
            proto.attribute.extend(attrs)
            graph = onnx.helper.make_graph(
                [proto], "fold",
                [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None)
                 for n, v in zip(in_names, inputs) if v is not None],
                [onnx.helper.make_value_info(n, onnx.TypeProto()) for n in out_names if n])
            model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", self.opset)])
            evaluator = self.cache[key] = ReferenceEvaluator(model)
        small = sum(v.nbytes for v in inputs if v is not None) <= MEMO_INPUT_BYTES
        memo = (key, tuple(None if v is None else (v.shape, v.tobytes()) for v in inputs)) if small else None
        if small and memo in self.results:
            return [None if v is None else np.array(v, copy=True, order="K") for v in self.results[memo]]
        feeds = {f"i{k}": v for k, v in enumerate(inputs) if v is not None}
        results = iter(evaluator.run(None, feeds))
        outputs = [np.asarray(next(results)) if used else None for used in out_mask]
        if small:
            self.results[memo] = [None if v is None else np.array(v, copy=True, order="K") for v in outputs]
        return outputs


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if isinstance(attrs.get("value"), gs.Constant):
        return np.asarray(attrs["value"].values) if numpy_dtype(attrs["value"]) is not None else None
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None  # strings, sparse tensors: left alone


def _static_shape_value(node: gs.Node) -> np.ndarray | None:
    """``Shape``/``Size`` of a tensor whose shape inference found every dimension."""
    shape = static_shape(node.inputs[0])
    if shape is None:
        return None
    if node.op == "Size":
        return np.array(math.prod(shape), dtype=np.int64)
    rank = len(shape)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return np.array(shape[start:end], dtype=np.int64)


def _itemsize(t: gs.Tensor, default: int = 4) -> int:
    dtype = numpy_dtype(t)
    return dtype.itemsize if dtype is not None else default


def predicted_bytes(node: gs.Node, inputs: list[np.ndarray | None]) -> int | None:
    """Size of the outputs before evaluating: exact for the ops that can blow a model up,
    otherwise from inferred output shapes; None when unknown."""
    try:
        if node.op == "ConstantOfShape":
            value = node.attrs.get("value")
            itemsize = np.asarray(value.values).itemsize if isinstance(value, gs.Constant) else 4
            return math.prod(int(d) for d in inputs[0].reshape(-1)) * itemsize
        if node.op == "Expand":
            shape = np.broadcast_shapes(inputs[0].shape, tuple(int(d) for d in inputs[1].reshape(-1)))
            return math.prod(shape) * inputs[0].itemsize
        if node.op == "Tile":
            reps = [int(r) for r in inputs[1].reshape(-1)]
            return inputs[0].nbytes * math.prod(reps)
        if node.op == "Range":
            start, limit, delta = (float(v) for v in inputs[:3])
            return max(math.ceil((limit - start) / delta), 0) * inputs[0].itemsize if delta else None
    except (ValueError, TypeError, IndexError, AttributeError, OverflowError):
        return None  # malformed: let the evaluator report it
    total = 0
    for o in node.outputs:
        if not o.name:
            continue
        shape = static_shape(o)
        if shape is None:
            return None
        total += math.prod(shape) * _itemsize(o)
    return total


def feeds_only_weights(t: gs.Tensor, graph_outputs: set[int], depth: int = 4) -> bool:
    """Whether every use of ``t`` is a parameter input (WEIGHT_INPUTS), directly or through a
    short chain of reshapes and casts."""
    if not t.outputs or id(t) in graph_outputs:
        return False
    for consumer in t.outputs:
        if not is_standard(consumer):
            return False
        if consumer.op in WEIGHT_PASSTHROUGH_OPS and depth > 0 and consumer.inputs and consumer.inputs[0] is t:
            if all(feeds_only_weights(o, graph_outputs, depth - 1) for o in consumer.outputs):
                continue
            return False
        slots = WEIGHT_INPUTS.get(consumer.op, frozenset())
        if not any(i in slots for i, inp in enumerate(consumer.inputs) if inp is t):
            return False
        if any(inp is t and i not in slots for i, inp in enumerate(consumer.inputs)):
            return False
    return True


def _is_exact(node: gs.Node, inputs: list[np.ndarray | None]) -> bool:
    """Bit-exact in any evaluator: data movement, or integer/boolean values only."""
    if node.op in DATA_MOVEMENT_OPS:
        return True
    in_kinds = {v.dtype.kind for v in inputs if v is not None}
    out_kinds = {d.kind for d in (numpy_dtype(o) for o in node.outputs if o.name) if d is not None}
    if len(out_kinds) != sum(1 for o in node.outputs if o.name):
        return False  # an output of unknown dtype
    return (in_kinds | out_kinds) <= set("biu")


# ----------------------------------------------------------------------------- the pass


@register_pass
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "evaluate nodes whose inputs are all constants and store their outputs as initializers"
    contract = Contract.REASSOCIATING
    reports_changes = True
    options = {
        "size-limit": Option("1MB", "largest folded output (bytes) that may grow the model", parse=parse_size),
        "weight-size-limit": Option("1GB", "largest folded output (bytes) when it only feeds parameter inputs "
                                    "(Conv/Gemm/MatMul weights, normalization scales, embedding tables)",
                                    parse=parse_size),
        "fold-input-initializers": Option(False, "treat initializers listed as graph inputs as constants"),
        "exact-only": Option(False, "fold only bit-exact nodes (integer, boolean, data movement); contract exact"),
    }

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts["exact-only"]:
            self.contract = Contract.EXACT

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counters = Counter({"folded": 0, "constant_nodes": 0, "skipped_too_large": 0,
                            "skipped_input_initializers": 0, "skipped_unevaluable": 0})
        changed = False
        graphs = graphs_of(graph, ctx)
        if self.opts["fold-input-initializers"]:
            for g in graphs:
                kept = [t for t in g.inputs if not isinstance(t, gs.Constant)]
                counters["released_input_initializers"] += len(g.inputs) - len(kept)
                changed |= len(kept) != len(g.inputs)
                g.inputs = kept
        locked = overridable(graphs)
        evaluator = _Evaluator(ctx.opset or graph.opset)
        namer, detacher = Namer(graphs), Detacher()
        for g in graphs:
            added: dict[int, list[gs.Node]] = {}
            graph_outputs = {id(t) for t in g.outputs}
            for node in list(g.nodes):
                new_nodes = self._fold(g, node, graph_outputs, locked, evaluator, (namer, detacher), counters)
                if new_nodes:
                    added[id(node)] = new_nodes
            if added:  # keep the node order topological: new Constant nodes sit where theirs was
                g.nodes = [m for n in g.nodes for m in ([n] + added.get(id(n), []))]
        detacher.flush()
        changed |= counters["folded"] + counters["constant_nodes"] > 0
        return PassResult(changed=changed, counters=dict(counters))

    def _fold(self, graph: gs.Graph, node: gs.Node, graph_outputs: set[int], locked: set[int],
              evaluator: _Evaluator, naming: tuple[Namer, Detacher], counters: Counter) -> list[gs.Node] | None:
        outputs, op = node.outputs, node.op
        if not outputs or not is_standard(node) or op in NONDETERMINISTIC_OPS or op in KEEP_OPS or op in NON_TENSOR_OPS:
            return None
        outputs_used = False
        for o in outputs:  # (loops, not any(): this runs for every node)
            if getattr(o, "type", "tensor_type") != "tensor_type":
                return None
            outputs_used = outputs_used or bool(o.outputs) or id(o) in graph_outputs
        if not outputs_used or (node.attrs and node_subgraphs(node)):
            return None
        if node.op == "Constant":
            if any(id(o) in graph_outputs for o in node.outputs):
                return None  # already as folded as a graph output can be
            value = _constant_node_value(node)
            if value is None:
                return None
            counters["constant_nodes"] += 1
            return replace_with_constants(graph, node, [value], *naming)
        if node.op in ("Shape", "Size") and node.inputs and not isinstance(node.inputs[0], gs.Constant):
            value = _static_shape_value(node)
            if value is None:
                return None
            counters["folded"] += 1
            return replace_with_constants(graph, node, [value], *naming)

        inputs: list[np.ndarray | None] = []
        for t in node.inputs:
            if not t.name:
                inputs.append(None)  # an omitted optional input
                continue
            value = constant_value(t, locked)
            if value is None:
                if id(t) in locked and isinstance(t, gs.Constant):
                    counters["skipped_input_initializers"] += 1
                return None
            inputs.append(value)
        if not any(v is not None for v in inputs):
            return None  # a source op we do not know how to fold
        if self.opts["exact-only"] and not _is_exact(node, inputs):
            return None

        limit = parse_size(self.opts["size-limit"])
        # Constants used by this node alone die with it: folding into that much cannot grow the model.
        exclusive = {id(t): t for t in node.inputs if isinstance(t, gs.Constant) and id(t) not in graph_outputs
                     and all(c is node for c in t.outputs)}
        freed = sum(tensor_nbytes(t) for t in exclusive.values())
        budget = max(limit, freed)
        predicted = predicted_bytes(node, inputs)
        if (predicted is None or predicted > budget) and all(
                feeds_only_weights(o, graph_outputs) for o in outputs if o.name):
            budget = max(budget, parse_size(self.opts["weight-size-limit"]))
        if predicted is not None and predicted > budget:
            counters["skipped_too_large"] += 1
            return None
        try:
            with np.errstate(all="ignore"):
                values = evaluator.run(node, inputs)
        except Exception:  # an op or dtype the reference evaluator cannot run: leave the node
            counters["skipped_unevaluable"] += 1
            return None
        for out, value in zip(node.outputs, values):
            if value is None:
                continue
            expected = numpy_dtype(out) if out.dtype is not None else None
            if value.dtype.kind not in "biuf" or (expected is not None and value.dtype != expected):
                counters["skipped_unevaluable"] += 1
                return None
            declared = out.shape
            if declared is not None and (len(declared) != value.ndim or any(
                    isinstance(d, int) and d != v for d, v in zip(declared, value.shape))):
                counters["skipped_unevaluable"] += 1  # disagrees with shape inference: trust neither
                return None
        if sum(v.nbytes for v in values if v is not None) > budget:
            counters["skipped_too_large"] += 1
            return None
        counters["folded"] += 1
        return replace_with_constants(graph, node, values, *naming)
