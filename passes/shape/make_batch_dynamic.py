"""make-batch-dynamic: a fixed batch dimension of 1 becomes symbolic, when the graph allows it.

    input x: [1, 3, 224, 224]                 ->  x: [batch, 3, 224, 224]
    Reshape(t, [1, 512])    (t: [batch, ...])  ->  Reshape(t, [0, 512])     (0: copy t's dimension)
    Reshape(t, [1, -1, 64]) (allowzero=1)      ->  refused: neither 0 nor a second -1 can stand for it

Every input must lead with 1 (a model with one batch-less input is refused), every output must
carry the batch at axis 0 after ONNX shape inference (a Flatten or Reshape that folds the batch
into another axis, or a Concat of a batch-1 constant with a batched tensor, is refused with the
output named), and the result must compute at batch 2 what the original computes for each sample
alone (run on ONNX Runtime, random inputs; ``check=false`` skips it). At batch 1 the graph is the
original with other Reshape constants: the outputs are bit for bit the same.
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
    for _ in range(len(out.graph.node) + 1):  # each round fixes the Reshapes inference reaches
        inferred = onnx.shape_inference.infer_shapes(out)
        shapes = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
        consts = _constants(out)
        changed = False
        for n in out.graph.node:
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
        if not changed:
            break
    inferred = onnx.shape_inference.infer_shapes(out)
    bad = [f"{vi.name} (leading dimension {_leading(vi) or 'unknown'})" for vi in inferred.graph.output
           if _leading(vi) != symbol]
    if bad:
        return None, ("output(s) do not carry the batch at axis 0 after inference: " + ", ".join(bad)
                      + " (a Reshape/Flatten folds it into another axis, or a batch-1 constant is concatenated)"), 0
    for vi, inf in zip(out.graph.output, inferred.graph.output):
        vi.type.CopyFrom(inf.type)
    if check:
        reason = batch_mismatch(model, out, CHECK_BATCH)
        if reason:
            return None, reason, 0
    return out, f"{len(leads)} input(s) now lead with {symbol!r}; {fixed} Reshape constant(s) fixed", fixed


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
                return PassResult(False, {"fixed_reshapes": 0})
            raise CompileError(f"make-batch-dynamic: {why}")
        new = to_graph(done)
        graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
        return PassResult(True, {"inputs": len(graph.inputs), "fixed_reshapes": fixed})
