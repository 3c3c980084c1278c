"""make-batch-dynamic: a fixed batch dimension of 1 becomes symbolic, when the graph allows it.

    input x: [1, 3, 224, 224]                 ->  x: [batch, 3, 224, 224]
    Reshape(t, [1, 512])    (t: [batch, ...])  ->  Reshape(t, [0, 512])     (0: copy t's dimension)
    Reshape(t, [1, -1, 64]) (allowzero=1)      ->  refused: neither 0 nor a second -1 can stand for it
    Concat(cls[1,1,D], x[batch,N,D], axis=1)   ->  Concat(Expand(cls, [Shape(x)[0], 1, 1]), x)

Every input must lead with 1 (a model with one batch-less input is refused); every output must
lead with the batch after ONNX shape inference, or with an unknown dim (inference stops at
com.microsoft ops: run the pass before the -O fusions into them), never with a known other one (a
Flatten or Reshape that folds the batch into another axis is refused with the output named); and
the result must compute at batch 2 what the original computes for each sample alone (run on ONNX
Runtime, random inputs; ``check=false`` skips it, and then unknown leading dims are refused too).
At batch 1 the graph is the original with other Reshape constants and Expands that copy: the
outputs are bit for bit the same (ORT's graph optimizations off, as the harness compares).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from infoptc.errors import CompileError
from infoptc.ir import from_graph, to_graph
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass

CHECK_BATCH = 2
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-5  # batch-n kernels may block the rows differently than batch 1


def _leading(vi: onnx.ValueInfoProto):
    dims = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else None
    if not dims:
        return None
    d = dims[0]
    return d.dim_value if d.HasField("dim_value") else (d.dim_param or None)


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            found[n.output[0]] = n.attribute[0].t
    return found


def make_batch_dynamic(model: onnx.ModelProto, symbol: str = "batch", check: bool = True
                       ) -> tuple[onnx.ModelProto | None, str, int]:
    """(the model with a symbolic batch, what changed, Reshape constants fixed) or (None, why it
    cannot be done, 0)."""
    inputs = [vi for vi in model.graph.input if vi.name not in {t.name for t in model.graph.initializer}]
    leads = {vi.name: _leading(vi) for vi in inputs}
    if not inputs:
        return None, "the model has no inputs", 0
    if all(isinstance(v, str) for v in leads.values()):
        return None, "the batch dimension is symbolic already", 0
    wrong = [f"{n} ({'no rank' if v is None else v})" for n, v in leads.items() if v != 1]
    if wrong:
        return None, f"every input must lead with a fixed batch of 1; not: {', '.join(wrong)}", 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.name in leads:
            dim = vi.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = symbol
    for vi in out.graph.output:  # the old declared shapes would contradict inference
        if vi.type.tensor_type.HasField("shape") and vi.type.tensor_type.shape.dim:
            dim = vi.type.tensor_type.shape.dim[0]
            dim.Clear()
    del out.graph.value_info[:]
    fixed = 0
    expanded = 0
    for _ in range(len(out.graph.node) + 1):  # each round fixes what inference reaches
        inferred = onnx.shape_inference.infer_shapes(out, data_prop=True)
        shapes = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
        consts = _constants(out)
        changed = False
        nodes = []
        for n in out.graph.node:
            if n.op_type == "Concat":
                added = _expand_concat_inputs(n, shapes, consts, symbol, out, expanded)
                nodes += added
                expanded += len(added) // 4
                changed |= bool(added)
            nodes.append(n)
            if n.op_type != "Reshape" or len(n.input) < 2 or n.input[1] not in consts:
                continue
            target = onnx.numpy_helper.to_array(consts[n.input[1]])
            data = shapes.get(n.input[0])
            if target.ndim != 1 or not target.size or target[0] != 1 or data is None or _leading(data) != symbol:
                continue
            allowzero = any(a.name == "allowzero" and a.i for a in n.attribute)
            new = target.copy()
            if not allowzero:
                new[0] = 0
            elif -1 not in target:
                new[0] = -1
            else:
                return None, f"Reshape {n.name or n.output[0]}: allowzero=1 with a -1 already; the batch cannot be kept", 0
            name = f"{n.input[1]}_batch_{fixed}"
            out.graph.initializer.append(onnx.numpy_helper.from_array(new.astype(target.dtype), name))
            n.input[1] = name
            fixed += 1
            changed = True
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        if not changed:
            break
    inferred = onnx.shape_inference.infer_shapes(out, data_prop=True)
    # an unknown leading dim (inference stops at ops it does not know, e.g. com.microsoft ones)
    # is left to the batch-2 run to prove; a known one that is not the batch is refused
    bad = [f"{vi.name} (leading dimension {_leading(vi) or 'unknown'})" for vi in inferred.graph.output
           if _leading(vi) != symbol and (isinstance(_leading(vi), int) or not check)]
    if bad:
        return None, ("output(s) do not carry the batch at axis 0 after inference: " + ", ".join(bad)
                      + " (a Reshape/Flatten folds it into another axis, or a batch-1 constant is concatenated)"), 0
    for vi, inf in zip(out.graph.output, inferred.graph.output):
        vi.type.CopyFrom(inf.type)
        if _leading(vi) != symbol:  # proven by the batch-2 run below
            vi.type.tensor_type.shape.dim[0].Clear()
            vi.type.tensor_type.shape.dim[0].dim_param = symbol
    if check:
        reason = batch_mismatch(model, out, CHECK_BATCH)
        if reason:
            return None, reason, 0
    return (out, f"{len(leads)} input(s) now lead with {symbol!r}; {fixed} Reshape constant(s) fixed; "
                 f"{expanded} batch-1 Concat input(s) expanded to the batch", fixed + expanded)


def _expand_concat_inputs(node: onnx.NodeProto, shapes: dict, consts: dict, symbol: str, model: onnx.ModelProto,
                          count: int) -> list[onnx.NodeProto]:
    """A Concat along axis != 0 of batched tensors and batch-1 ones (a ViT's class token): each
    batch-1 input is expanded to the batch of a batched one, Expand(t, [Shape(b)[0], 1, ...]).
    Returns the nodes to insert before the Concat (four per input), which now reads their outputs."""

    def dims(name):
        if name in consts:
            return list(consts[name].dims)
        vi = shapes.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]

    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    all_dims = [dims(name) for name in node.input]
    ranks = {len(d) for d in all_dims if d is not None}
    if len(ranks) != 1 or not next(iter(ranks)) or axis % next(iter(ranks)) == 0:
        return []
    batched = [name for name, d in zip(node.input, all_dims) if d and d[0] == symbol]
    ones = [k for k, d in enumerate(all_dims) if d and d[0] == 1]
    if not batched or not ones:
        return []
    rank = next(iter(ranks))
    tag = f"{node.name or node.output[0]}_batch_{count}"
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([0], np.int64), f"{tag}_start"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), f"{tag}_end"),
        onnx.numpy_helper.from_array(np.ones(rank - 1, np.int64), f"{tag}_ones")])
    added = []
    for j, k in enumerate(ones):
        base = f"{tag}_{j}"
        added += [onnx.helper.make_node("Shape", [batched[0]], [f"{base}_shape"], name=f"{base}_shape"),
                  onnx.helper.make_node("Slice", [f"{base}_shape", f"{tag}_start", f"{tag}_end"], [f"{base}_n"],
                                        name=f"{base}_n"),
                  onnx.helper.make_node("Concat", [f"{base}_n", f"{tag}_ones"], [f"{base}_to"], name=f"{base}_to",
                                        axis=0),
                  onnx.helper.make_node("Expand", [node.input[k], f"{base}_to"], [f"{base}_expanded"],
                                        name=f"{base}_expand")]
        node.input[k] = f"{base}_expanded"
    return added


def batch_mismatch(original: onnx.ModelProto, batched: onnx.ModelProto, n: int, seed: int = 0) -> str | None:
    """Why ``batched`` at batch ``n`` differs from ``original`` run on each of the n samples, or None."""
    from infoptc.verify import OrtRunner, random_inputs

    samples = [random_inputs(original, seed=seed + i) for i in range(n)]
    try:
        got = OrtRunner(batched).run({k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
    except Exception as e:  # noqa: BLE001 - ORT refusing the batch is the answer
        return f"ONNX Runtime cannot run batch {n}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    ref_runner = OrtRunner(original)
    refs = [ref_runner.run(s) for s in samples]
    for name, value in got.items():
        want = np.concatenate([r[name] for r in refs])
        if value.shape != want.shape or not np.allclose(value, want, rtol=CHECK_RTOL, atol=CHECK_ATOL):
            err = float(np.max(np.abs(value - want))) if value.shape == want.shape else "shape"
            return f"at batch {n}, output {name} differs from {n} batch-1 runs ({err}): the graph mixes samples"
    return None


@register_pass
class MakeBatchDynamic(Pass):
    name = "make-batch-dynamic"
    summary = "a fixed batch dimension of 1 becomes symbolic (Reshape constants that hard-code it fixed)"
    contract = Contract.EXACT
    options = {
        "symbol": Option("batch", "the name of the symbolic batch dimension"),
        "check": Option(True, "prove batch 2 equals two batch-1 runs of the original on ONNX Runtime"),
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        model = from_graph(graph)
        done, why, fixed = make_batch_dynamic(model, self.opts["symbol"], self.opts["check"])
        if done is None:
            if why == "the batch dimension is symbolic already":
                return PassResult(False, {"rewrites": 0})
            raise CompileError(f"make-batch-dynamic: {why}")
        new = to_graph(done)
        graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
        return PassResult(True, {"inputs": len(graph.inputs), "rewrites": fixed})
