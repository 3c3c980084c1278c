"""quantize-int8: calibrated static int8 in the QDQ form ONNX Runtime fuses into int8 kernels.

    Conv(x, w, b)       ->  DQ(Q(x)) -> Conv(DQ(w_s8, s_w), DQ(b_s32, s_x*s_w)) -> Q -> DQ
    Relu(Conv(...))     ->  the Relu is dropped: the Q after the Conv, whose range starts at 0, clips
    MaxPool / Reshape / Flatten / Transpose on an int8 tensor stay int8 with the same scale

Activations are uint8 with a calibrated asymmetric range, weights int8 symmetric per output
channel, biases int32 (ONNX Runtime's x86 kernels: QLinearConv, QLinearMatMul, QGemm,
QLinearAdd, QLinearGlobalAveragePool). Ops without an int8 kernel stay fp32 between a DQ and a Q.
The plan (which ops, which tensors) is ``plan.py``, the rewriting ``qdq.py``; ranges come from
running the model over the calibration data (``calibration.py``).
The pass records a per-tensor report (scale, zero point, SQNR against fp32 on the calibration
data, worst first) in ``ctx.reports["quantize-int8"]`` and its choices in the model's metadata.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.errors import UsageError
from infoptc.ir import from_graph, to_graph
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass

from infoptc.verify import sqnr_db

from . import calibration, speed
from .common import CALIBRATION_OPTIONS, COMMON_OPTIONS, parse_exclude, refuse_quantized
from .observers import METHODS, quant_params
from .plan import Plan, fold, plan_static, stem_convs
from .qdq import EMBEDDING_MIN_ELEMENTS, Builder, dq_weight, insert_qdq, quantize_embeddings
from .recipe import recipe_for

log = logging.getLogger("infoptc")


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
        **CALIBRATION_OPTIONS,
        "method": Option("mse", "how activation ranges are chosen (mse: least expected squared error)", choices=METHODS),
        "percentile": Option(99.999, "the percentile kept by method=percentile"),
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
        # the check times ONNX Runtime's int8 kernels: for the llvm target, which compiles the QDQ
        # graph to its own (backends/tvm/int8.py), ORT's speed decides nothing
        speed_check = self.opts["speed-check"] and ctx.target != "llvm"
        if speed_check:
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
        observers, hit, cache_key = calibration.cached_observers(fp32, observed, data, self.opts["cache"] or None)
        # a model output or a Softmax output keeps its whole range whatever the method: clipping
        # the largest probabilities (or anything the user reads) flattens exactly what matters
        whole = {t.name for t in graph.outputs} | {n.outputs[0].name for n in graph.nodes if n.op == "Softmax"}
        ranges = {name: observers[name].range("minmax" if name in whole else self.opts["method"],
                                              self.opts["percentile"]) for name in observed}

        timing, chosen = None, "full"
        if speed_check:
            # with a cache file the decision is kept there too: a rerun writes the same bytes
            decision_key = cache_key and "|".join(
                [cache_key, self.name, recipe.isa, ",".join(coverages), json.dumps(self.opts, sort_keys=True)])
            timing = calibration.cached_decision(self.opts["cache"], decision_key) if decision_key else None
            if timing is None:
                timing = self._time(fp32, coverages, ranges, recipe, exclude, next(iter(data))).as_dict()
                if decision_key:
                    calibration.store_decision(self.opts["cache"], decision_key, timing)
            if timing["chosen"] is None:
                log.warning("quantize-int8: int8 is not faster than fp32 on this host (fp32 %.3f ms, best int8 "
                            "%.3f ms); the model stays fp32 (speed-check=false / --no-speed-check quantizes anyway)",
                            timing["fp32_ms"], min(timing["candidates_ms"].values()))
                ctx.reports[self.name] = {"recipe": recipe.as_dict(), "speed": timing, "tensors": []}
                return PassResult(False, {"quantized": 0, "kept_fp32_slower": 1})
            chosen = timing["chosen"]
            plan = plans[chosen]

        producers = {o.name: node.op for node in graph.nodes for o in node.outputs}
        params, counters = self._apply(graph, plan, ranges, recipe, exclude)
        counters["calibration_cached"] = int(hit)
        ctx.metadata["infoptc.quantization"] = json.dumps(
            {"pass": self.name, "recipe": recipe.as_dict(), "method": self.opts["method"],
             "samples": self.opts["samples"] or "all", "coverage": chosen}, sort_keys=True)
        report = {"recipe": recipe.as_dict(), "skipped": plan.skipped, "tensors": []}
        if timing is not None:
            report["speed"] = timing
        if self.opts["report-samples"]:
            graph.cleanup().toposort()
            report["tensors"] = layer_report(fp32, from_graph(graph), list(params), params, producers, data,
                                             self.opts["report-samples"])
        ctx.reports[self.name] = report
        return PassResult(True, counters)

    def _time(self, fp32, coverages: dict, ranges: dict, recipe, exclude: set[str], feed: dict) -> speed.Timing:
        """fp32 against each coverage's int8 model, on this host."""
        candidates = {}
        for k, (e, extra) in coverages.items():
            trial = to_graph(fp32)
            self._apply(trial, plan_static(trial, exclude | extra, self.opts["matmul-activations"], e), ranges,
                        recipe, exclude)
            trial.cleanup().toposort()
            candidates[k] = from_graph(trial)
        return speed.compare(fp32, candidates, feed)

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
            fold(graph, producer, act)
        b = Builder(graph)
        tensors = graph.tensors()
        # an fp32 op reading a tensor quantized for its int8 siblings (a LayerNorm output's residual
        # Add, a layer left fp32) keeps the fp32 value, unless an int8 op made the tensor (ORT
        # fuses that op with its Q only when nothing else reads its output) or a folded Relu
        # lives in its range
        int8 = {id(n) for n in plan.nodes}
        reads_int8 = lambda node: id(node) in int8
        for name, (scale, zp) in params.items():
            t = tensors[name]
            keep_fp32 = name not in plan.clip and not (t.inputs and id(t.inputs[0]) in int8)
            insert_qdq(b, t, scale, zp, graph, reads_int8 if keep_fp32 else None)
        for node, index, axis in plan.weights.values():
            dq_weight(b, node, index, axis, recipe.weight_qmax, self._input_scale(node), self.opts["per-channel"])
        embeddings = quantize_embeddings(graph, b, EMBEDDING_MIN_ELEMENTS, exclude) if self.opts["embeddings"] else 0
        return params, {"quantized": len(plan.nodes), "embeddings": embeddings, "weights": len(plan.weights),
                        "tensors": len(params), "relu_folded": len(plan.folds),
                        "fp32_compute_left": len(plan.skipped)}

    @staticmethod
    def _input_scale(node: gs.Node) -> np.float32:
        """The scale of the DequantizeLinear that now feeds the node's activation input."""
        dq = node.inputs[0].inputs[0]
        return np.float32(dq.inputs[1].values)
