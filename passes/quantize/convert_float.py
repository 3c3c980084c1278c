"""convert-float: fp32 -> fp16 or bf16 weights and compute, with numerically sensitive ops kept fp32.

Every node is given a precision, then the graph is rewritten once:

    MatMul/Gemm/Conv/ConvTranspose      low (fp16 or bf16): weights converted, compute in the low type
    Exp Log Pow Softmax reductions       fp32 by rule (``FP32_OPS``): their range or their sums need it;
    Range CumSum Instance/GroupNorm...   a decomposed LayerNorm keeps its statistics (ReduceMean, Pow) fp32
    LayerNormalization                   low input and output, statistics fp32 (its stash_type)
    elementwise and data movement        follow their inputs: low when some activation input is low
    shape arithmetic                     fp32: anything computed only from Shape/Size outputs (a
                                         Gather from a position table at such indices is data: low)
    integer and bool tensors, Resize's   untouched
      roi and scales, contrib ops

A node goes low only where the ONNX schema of its op at the model's opset allows the low type for
each of its float inputs and outputs (Conv has no bf16 before opset 22: for bf16 an older model is
first converted to opset 22). Casts are
inserted only where a low tensor meets an fp32 reader or the reverse, one per tensor and
direction; a Cast pair that cancels (fp16 -> fp32 -> fp16) is then removed and a Cast to fp32
followed by one to the low type becomes one Cast. Constants read by low nodes are converted
(clipped to the low type's finite range; the count is reported). Graph inputs and outputs
become low too, unless ``keep-io-types``. A model that already holds fp16 or bf16 tensors is
left as it is (converting twice would only add casts).

``convert_model(model, ...)`` does the same on a ModelProto, for Python callers (the precision
benchmark, mixed-precision searches: ``nodes`` names the compute nodes (MatMul, Gemm, Conv,
ConvTranspose) allowed to go low; the others stay fp32 and elementwise ops follow their inputs).
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from infoptc.errors import MissingDependencyError, UsageError
from infoptc.ir import from_graph, to_graph
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from infoptc.rewrite import Namer, replace_uses

from .common import excluded, parse_exclude, upgrade_opset
from .recipe import cpu_flags

log = logging.getLogger("infoptc")

LOW_TYPES = {"fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}
_SCHEMA_NAMES = {"fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}
_ONNX_TYPES = {np.dtype(np.float16): onnx.TensorProto.FLOAT16, np.dtype(ml_dtypes.bfloat16): onnx.TensorProto.BFLOAT16,
               np.dtype(np.float32): onnx.TensorProto.FLOAT}
F32 = np.dtype(np.float32)

# Ops that stay fp32 whatever their neighbours: exponentials and powers overflow fp16's range
# (65504), long sums lose the low bits of every term, normalization statistics are both.
FP32_OPS = {
    "Exp", "Log", "Pow", "Softmax", "LogSoftmax", "Softplus", "Softsign",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "CumSum", "Range", "InstanceNormalization", "GroupNormalization",
    "LpNormalization", "MeanVarianceNormalization", "RandomNormal", "RandomUniform", "RandomNormalLike",
    "RandomUniformLike", "Multinomial", "NonMaxSuppression", "RoiAlign", "TopK", "Einsum",
}
# LayerNormalization is not among them: its stash_type (default 1: float32) makes the runtime
# compute mean and variance in fp32 whatever the input type, so a low LayerNormalization keeps
# fp32 statistics without Casts around it. A decomposed LayerNorm keeps its ReduceMean/Pow fp32.
# Ops whose compute is the point of the conversion: low whatever precision their inputs come in.
ANCHORS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
# Readers that take any element type: a low tensor needs no Cast to reach them.
ANY_TYPE_READERS = {"Shape", "Size", "Cast", "CastLike"}
# Inputs kept fp32 even when the node goes low (Resize's coordinates: roi and scales).
KEEP_INPUTS = {"Resize": {1, 2, 3}, "Upsample": {1}}
SHAPE_SOURCES = {"Shape", "Size"}
BF16_CONV_OPSET = 22  # the first opset whose Conv, ConvTranspose, MaxPool, AveragePool admit bf16


def host_has_bf16(flags: set[str] | None = None) -> bool:
    """The host CPU computes in bf16 natively (x86 AVX512_BF16 or AMX-BF16; Arm BF16)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)


@functools.lru_cache(maxsize=None)
def _slots(op: str, opset: int, low: str) -> tuple[tuple, tuple] | None:
    """For an ONNX-domain op at ``opset``: (per input, per output) the formal's type variable when
    it admits both float and the low type, else None; None when the op has no schema."""
    try:
        schema = onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def var(formal) -> str | None:
        types = allowed.get(formal.type_str, set())
        return formal.type_str if "tensor(float)" in types and _SCHEMA_NAMES[low] in types else None

    return tuple(var(f) for f in schema.inputs), tuple(var(f) for f in schema.outputs)


def _formal(slots: tuple, i: int):
    return slots[min(i, len(slots) - 1)] if slots else None  # the last formal may be variadic


def _dtype(t: gs.Tensor) -> np.dtype | None:
    try:
        return None if t.dtype is None else np.dtype(t.dtype)
    except TypeError:
        return None


def _is_f32(t: gs.Tensor) -> bool:
    return bool(t.name) and _dtype(t) == F32


def already_low(graph: gs.Graph) -> list[str]:
    """Names of the fp16/bf16 tensors a graph holds (a model converted before)."""
    lows = set(LOW_TYPES.values())
    return sorted(name for name, t in graph.tensors().items() if _dtype(t) in lows)


# ONNX Runtime contrib ops (as infoptc's fusions emit them) whose first output has the type of
# their first input: ONNX type inference does not know them and stops there.
SAME_TYPE_CONTRIB = {"FusedConv", "FusedMatMul", "FastGelu", "Gelu", "BiasGelu", "QuickGelu", "MultiHeadAttention",
                     "Attention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
                     "SimplifiedLayerNormalization", "BiasAdd", "RotaryEmbedding"}


def fill_dtypes(graph: gs.Graph) -> None:
    """Give tensors whose dtype a pass before left unset the one ONNX type inference finds (through
    the contrib ops of ``SAME_TYPE_CONTRIB``)."""
    for _ in range(8):
        missing = {name: t for name, t in graph.tensors().items()
                   if isinstance(t, gs.Variable) and name and t.dtype is None}
        if not missing:
            return
        progress = False
        for node in graph.nodes:
            if node.op in SAME_TYPE_CONTRIB and node.inputs and node.outputs and node.outputs[0].name in missing \
                    and _dtype(node.inputs[0]) is not None:
                node.outputs[0].dtype = _dtype(node.inputs[0])
                progress = True
        try:
            g = onnx.shape_inference.infer_shapes(from_graph(graph)).graph
        except Exception:  # noqa: BLE001 - inference is a help here, not a requirement
            return
        types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.output, *g.input]}
        for name, t in missing.items():
            if t.dtype is None and types.get(name):
                t.dtype = onnx.helper.tensor_dtype_to_np_dtype(types[name])
                progress = True
        if not progress:
            return


def subgraph_reads(graph: gs.Graph) -> set[str]:
    """Names that subgraphs (If/Loop/Scan bodies) read from the outer scope: they keep their type,
    since no Cast can be placed inside a body from here."""
    names: set[str] = set()
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                inner = {t.name for n in value.nodes for t in n.outputs} | {t.name for t in value.inputs}
                names |= {t.name for n in value.nodes for t in n.inputs if t.name and t.name not in inner}
                names |= subgraph_reads(value) - inner
    return names


def plan_precision(graph: gs.Graph, low: str, keep_io_types: bool, exclude: set[str] = frozenset(),
                   nodes: set[str] | None = None) -> tuple[set[int], Counter]:
    """Which nodes compute in the low type (ids of graph.nodes), and why the others stay fp32."""
    opset = graph.opset
    pinned = subgraph_reads(graph)
    is_low: dict[str, bool] = {t.name: not keep_io_types and t.name not in pinned for t in graph.inputs if _is_f32(t)}
    shape_derived: set[str] = set()
    chosen: set[int] = set()
    why: Counter = Counter()
    for node in graph.nodes:
        acts = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
        reads_table = any(isinstance(t, gs.Constant) and _is_f32(t) and t.values.size > 64 for t in node.inputs)
        if node.op in SHAPE_SOURCES or (acts and all(t.name in shape_derived for t in acts) and not reads_table):
            shape_derived.update(o.name for o in node.outputs)
            if any(_is_f32(o) for o in node.outputs):
                why["shape_arithmetic"] += 1
            continue
        floats_in = [i for i, t in enumerate(node.inputs) if _is_f32(t)]
        floats_out = [o for o in node.outputs if _is_f32(o)]
        if not floats_in and not floats_out:
            continue  # an integer op, or one that only reads a float tensor's shape
        decision = _decide(node, opset, low, floats_in, exclude, nodes, acts, is_low)
        if decision is True and any(o.name in pinned for o in node.outputs):
            decision = "read_by_subgraph"
        if decision is True:
            chosen.add(id(node))
        elif decision:
            why[decision] += 1
        for o in floats_out:
            is_low[o.name] = decision is True
    return chosen, why


def _decide(node: gs.Node, opset: int, low: str, floats_in: list[int], exclude: set[str], nodes: set[str] | None,
            acts: list, is_low: dict) -> bool | str:
    """True: the node goes low; otherwise the reason it stays fp32 (empty: it follows fp32 inputs)."""
    if excluded(node, exclude) or (nodes is not None and node.op in ANCHORS and node.name not in nodes):
        return "excluded"
    if node.domain not in (None, "", "ai.onnx") or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
        return "contrib_or_subgraph"
    if node.op in FP32_OPS:
        return "sensitive_op"
    if any(isinstance(t, gs.Variable) and t.name and _dtype(t) is None for t in node.inputs):
        return "unknown_dtype"  # it may be float: a low node would need a Cast we cannot place
    slots = _slots(node.op, opset, low)
    if slots is None or node.op in ("Cast", "CastLike", "Constant", "ConstantOfShape"):
        return "no_low_kernel"
    ins, outs = slots
    keep = KEEP_INPUTS.get(node.op, set())
    converted = {_formal(ins, i) for i in floats_in if i not in keep}
    if None in converted:
        return "no_low_kernel"
    for k, o in enumerate(node.outputs):
        if _dtype(o) is None or (_is_f32(o) and _formal(outs, k) not in converted):
            return "no_low_kernel"
    if node.op in ANCHORS:
        return True
    float_acts = [t for t in acts if t.name in is_low]
    if not float_acts or any(is_low[t.name] for t in float_acts):
        return True
    return ""


class _Rewriter:
    """Retypes tensors and inserts the border Casts (one per tensor and direction)."""

    def __init__(self, graph: gs.Graph, low_dtype: np.dtype):
        self.graph, self.low = graph, low_dtype
        self.name = Namer([graph], eager=True)
        self.casts: dict[tuple[int, str], gs.Tensor] = {}
        self.counters = Counter()

    def as_type(self, t: gs.Tensor, dtype: np.dtype) -> gs.Tensor:
        key = (id(t), dtype.name)
        if key in self.casts:
            return self.casts[key]
        values = _constant_values(t)
        if values is not None:
            if dtype != F32:
                finite = float(ml_dtypes.finfo(dtype).max)
                clipped = np.clip(values, -finite, finite)
                self.counters["constants_clipped"] += int(np.count_nonzero((clipped != values) & np.isfinite(values)))
                values = clipped
            out = gs.Constant(self.name(f"{t.name}_{_short(dtype)}"), np.array(values.astype(dtype), order="C"))  # 0-d stays 0-d
            self.counters["constants_converted"] += 1
        else:
            out = gs.Variable(self.name(f"{t.name}_{_short(dtype)}"), dtype=dtype, shape=t.shape)
            self.graph.nodes.append(gs.Node("Cast", self.name(f"{t.name}_Cast"), {"to": _ONNX_TYPES[dtype]}, [t], [out]))
            self.counters["casts_inserted"] += 1
        self.casts[key] = out
        return out


def _constant_values(t: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer, or of a Constant node's output (-O0 keeps those)."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    producer = t.inputs[0] if len(t.inputs) == 1 else None
    if producer is not None and producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant):
        return np.asarray(producer.attrs["value"].values)
    return None


def _short(dtype: np.dtype) -> str:
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype.name]


def convert_graph(graph: gs.Graph, to: str = "fp16", keep_io_types: bool = False, exclude: set[str] = frozenset(),
                  nodes: set[str] | None = None) -> Counter:
    """Convert ``graph`` in place; returns the counters (``converted`` nodes, ``kept_fp32`` and
    why, casts inserted and removed, constants converted and clipped)."""
    low = LOW_TYPES[to]
    if already_low(graph):
        return Counter({"already_low": 1})
    fill_dtypes(graph)
    chosen, why = plan_precision(graph, to, keep_io_types, exclude, nodes)
    counters = Counter({"converted": len(chosen), **{f"kept_fp32_{k}": v for k, v in why.items()}})
    if not chosen:
        return counters
    rw = _Rewriter(graph, low)
    originally_f32 = {name for name, t in graph.tensors().items() if _is_f32(t)}
    opset = graph.opset
    for node in graph.nodes:
        if id(node) in chosen:
            for o in node.outputs:
                if o.name in originally_f32:
                    o.dtype = low
    if not keep_io_types:
        pinned = subgraph_reads(graph)
        for t in graph.inputs:
            if t.name in originally_f32 and t.name not in pinned:
                t.dtype = low
    for node in list(graph.nodes):
        slots = _slots(node.op, opset, to) if id(node) in chosen else None
        keep = KEEP_INPUTS.get(node.op, set())
        for i, t in enumerate(node.inputs):
            if t.name not in originally_f32:
                continue
            wants_low = slots is not None and i not in keep and _formal(slots[0], i) is not None
            if wants_low and _dtype(t) != low:
                node.inputs[i] = rw.as_type(t, low)
            elif not wants_low and _dtype(t) == low and node.op not in ANY_TYPE_READERS:
                node.inputs[i] = rw.as_type(t, F32)
    # graph outputs: fp32 with keep-io-types, the low type otherwise (a Cast under the output's name)
    want = F32 if keep_io_types else low
    for t in list(graph.outputs):
        if t.inputs and t.name in originally_f32 and _dtype(t) != want:  # (a graph input passed through keeps its type)
            inner = gs.Variable(rw.name(f"{t.name}_{_short(np.dtype(t.dtype))}"), dtype=t.dtype, shape=t.shape)
            producer = t.inputs[0]
            producer.outputs[producer.outputs.index(t)] = inner
            replace_uses(t, inner)
            t.dtype = want
            graph.nodes.append(gs.Node("Cast", rw.name(f"{t.name}_Cast"), {"to": _ONNX_TYPES[want]}, [inner], [t]))
            rw.counters["casts_inserted"] += 1
    counters.update(rw.counters)
    counters["casts_removed"] = fold_casts(graph)
    return counters


def fold_casts(graph: gs.Graph) -> int:
    """Cast(Cast(x, fp32), low) where x is already low -> x; Cast(Cast(x, fp32), low) -> Cast(x, low)
    for any other x (an integer, say). Returns how many Casts were bypassed."""
    removed = 0
    outputs = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op != "Cast" or not node.inputs or not node.inputs[0].inputs:
            continue
        first = node.inputs[0].inputs[0]
        mid = node.inputs[0]
        if first.op != "Cast" or _dtype(mid) != F32 or id(mid) in outputs:
            continue
        src, target = first.inputs[0], node.attrs.get("to")
        if _dtype(src) is not None and _ONNX_TYPES.get(_dtype(src)) == target:
            out = node.outputs[0]
            if id(out) in outputs:
                continue  # the graph output keeps its name: keep the Cast
            replace_uses(out, src)
            node.inputs.clear()
            node.outputs.clear()
            removed += 1
        elif target in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) and len(mid.outputs) == 1 \
                and _dtype(src) is not None and _dtype(src).kind in "iub":
            node.inputs[0] = src  # the integer converts to the low type directly
            removed += 1
    return removed


def convert_model(model: onnx.ModelProto, to: str = "fp16", keep_io_types: bool = False,
                  exclude: set[str] | str = frozenset(), nodes: set[str] | None = None) -> onnx.ModelProto:
    """``model`` with its float compute in ``to`` (fp16 or bf16), as the pass makes it; a new
    model, the input untouched. ``nodes``: only these compute nodes (MatMul/Gemm/Conv/ConvTranspose,
    by name) go low, the ops between follow their inputs; ``exclude``: names or op types left fp32."""
    from infoptc.ir import infer_shapes

    if nodes is not None and not nodes:  # an empty selection converts nothing
        return model.__class__.FromString(model.SerializeToString())
    graph = to_graph(infer_shapes(model))
    exclude = exclude if isinstance(exclude, str) else ";".join(sorted(exclude))
    ConvertFloat(to=to, keep_io_types=keep_io_types, exclude=exclude, nodes=";".join(sorted(nodes or ())),
                 report_samples=0).run(graph, PassContext(opset=graph.opset))
    graph.cleanup().toposort()
    return from_graph(graph, model)


def output_errors(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: list[dict]) -> list[dict]:
    """Per float output over ``feeds``: max abs error, max error relative to the output's largest
    magnitude, SQNR (dB) of ``candidate`` against ``reference`` (both on ONNX Runtime's CPU; the
    candidate's inputs are given in its own dtypes)."""
    from infoptc.verify import sqnr_db

    from .calibration import ort_session

    ref, cand = ort_session(reference), ort_session(candidate)
    types = {i.name: i.type.tensor_type.elem_type for i in candidate.graph.input}
    stats: dict[str, dict] = {}
    for feed in feeds:
        cfeed = {k: v.astype(onnx.helper.tensor_dtype_to_np_dtype(types[k])) if k in types and
                 np.asarray(v).dtype.kind == "f" else v for k, v in feed.items()}
        want = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, feed)))
        got = dict(zip([o.name for o in cand.get_outputs()], cand.run(None, cfeed)))
        for name, r in want.items():
            if np.asarray(r).dtype.kind != "f" or name not in got:
                continue
            r64, g64 = np.asarray(r, np.float64), np.asarray(got[name]).astype(np.float64)
            s = stats.setdefault(name, {"output": name, "max_abs": 0.0, "max_rel": 0.0, "sqnr_db": float("inf")})
            err = float(np.max(np.abs(r64 - g64))) if r64.size else 0.0
            s["max_abs"] = max(s["max_abs"], err)
            s["max_rel"] = max(s["max_rel"], err / max(float(np.max(np.abs(r64))) if r64.size else 0.0, 1e-30))
            s["sqnr_db"] = min(s["sqnr_db"], sqnr_db(r64, g64))
    for s in stats.values():
        s["max_abs"], s["max_rel"] = float(f"{s['max_abs']:.4g}"), float(f"{s['max_rel']:.4g}")
        s["sqnr_db"] = None if s["sqnr_db"] == float("inf") else round(s["sqnr_db"], 2)
    return list(stats.values())


@register_pass
class ConvertFloat(Pass):
    name = "convert-float"
    summary = "fp32 -> fp16/bf16 weights and compute; exponentials, reductions, normalization statistics stay fp32"
    contract = Contract.LOSSY
    reports_changes = True
    options = {
        "to": Option("fp16", "the low type", choices=tuple(LOW_TYPES)),
        "keep-io-types": Option(False, "keep the model's float inputs and outputs fp32 (Casts at the borders)"),
        "exclude": Option("", "node names or op types left fp32, separated by ';'"),
        "nodes": Option("", "only these MatMul/Gemm/Conv/ConvTranspose go low, by name (';'-separated; empty: all); "
                            "elementwise ops follow their inputs"),
        "report-samples": Option(1, "samples the per-output error report runs on ONNX Runtime (0: none)"),
        "upgrade-opset": Option(True, "bf16: convert an older model to opset 22, where Conv, ConvTranspose and "
                                      "the pools first admit bf16"),
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        to = self.opts["to"]
        if to == "bf16" and ctx.target == "llvm" and not host_has_bf16():
            raise MissingDependencyError(
                "--quantize bf16 for the llvm target needs a CPU with bf16 arithmetic (avx512_bf16 or amx_bf16 "
                "on x86, bf16 on Arm); this host has none: use fp16, or --target onnx to write the bf16 model")
        present = already_low(graph)
        if present:
            log.warning("convert-float: the model already holds %s tensors (%s...); left as it is",
                        "fp16/bf16", present[0])
            ctx.reports[self.name] = {"to": to, "already_low": True, "outputs": []}
            return PassResult(False, {"already_low": 1})
        reference = from_graph(graph) if self.opts["report-samples"] else None
        upgraded = 0
        if to == "bf16" and self.opts["upgrade-opset"] and graph.opset < BF16_CONV_OPSET:
            try:
                upgrade_opset(graph, BF16_CONV_OPSET, "bf16 convolutions and pools")
                upgraded = 1
            except UsageError as e:  # those ops then stay fp32, as at the model's own opset
                log.warning("convert-float: %s; Conv and pools stay fp32", e)
        nodes = set(parse_exclude(self.opts["nodes"])) or None
        counters = convert_graph(graph, to, self.opts["keep-io-types"], parse_exclude(self.opts["exclude"]), nodes)
        counters["opset_upgraded"] = upgraded
        if not counters["converted"]:
            log.warning("convert-float: no node can compute in %s; the model stays fp32", to)
            return PassResult(bool(upgraded), dict(counters))
        graph.cleanup().toposort()
        report: dict = {"to": to, "keep_io_types": self.opts["keep-io-types"],
                        "kept_fp32": {k[len("kept_fp32_"):]: v for k, v in counters.items() if k.startswith("kept_fp32_")},
                        "outputs": []}
        if reference is not None:
            report.update(self._errors(reference, from_graph(graph), ctx))
        ctx.reports[self.name] = report
        ctx.metadata["infoptc.quantization"] = json.dumps(
            {"pass": self.name, "to": to, "keep_io_types": self.opts["keep-io-types"]}, sort_keys=True)
        return PassResult(True, dict(counters))

    def _errors(self, reference: onnx.ModelProto, candidate: onnx.ModelProto, ctx: PassContext) -> dict:
        """Max abs / relative error per output on the calibration samples (or a generated one)."""
        from . import speed
        from .calibration import CalibrationData, model_inputs

        source = ctx.options.get("calibration")
        count = self.opts["report-samples"]
        feeds = (list(CalibrationData(source, model_inputs(reference), count)) if source
                 else [speed.sample_feed(reference)])
        try:
            return {"outputs": output_errors(reference, candidate, feeds[:count]), "samples": len(feeds[:count])}
        except Exception as e:  # ORT's CPU has no kernel for some op in this type (bf16: nearly all)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return {"outputs": [], "not_measured": f"ONNX Runtime (CPU) cannot run the converted model: {first[:200]}"}
