"""Which layers can go to int8: per-layer sensitivity, measured on the calibration data.

A layer is a Conv, Gemm or MatMul that ``quantize-int8`` would quantize, an embedding table (a
Gather) it would store in int8, or, as one layer, all its int8 elementwise Mul/Sigmoid ops. Two models are scored
per layer with a metric (``metrics.py``) against the fp32 model:

- *alone*: only this layer int8, every other one fp32 (how much error the layer brings by itself);
- *left out*: every other layer int8, this one fp32 (how much giving this layer back recovers).

``analyze`` returns them sorted worst first (lowest *alone* score). The ``Evaluator`` and
``quantize_except`` are also what ``quantize-auto`` searches with. Every model is quantized by
the ``quantize-int8`` pass itself (speed check off), with the ranges observed once and kept in a
calibration cache file, so a layer set costs one rewrite and one scoring run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import onnx
from infoptc.calibration_data import CalibrationData, model_inputs
from infoptc.errors import UsageError
from infoptc.ir import from_graph, to_graph
from infoptc.pass_manager import PassContext
from infoptc.progress import stage

from . import calibration
from .metrics import Metric, resolve_metric
from .plan import plan_static
from .qdq import embedding_table

LAYER_OPS = ("Conv", "Gemm", "MatMul")


class Evaluator:
    """Runs models over the calibration samples and scores them against the fp32 model."""

    def __init__(self, fp32: onnx.ModelProto, source: Any, metric: str | Callable | Metric, samples: int = 0):
        self.metric = resolve_metric(metric)
        data = CalibrationData(source, model_inputs(fp32), samples)
        self.feeds = list(data)
        self.labels = data.labels()
        if self.metric.needs_labels and self.labels is None:
            raise UsageError(f"the {self.metric.name} metric needs the labels: add an array named 'labels' to "
                             "the calibration data (one class index per sample, or per row of a batch)")
        self.reference = self.outputs(fp32)
        self.reference_score = self.metric.reference_score(self.reference, self.labels)

    def outputs(self, model: onnx.ModelProto) -> list[dict]:
        # scored as it will run (int8 kernels), on one thread: the same scores, the same choices, every run
        session = calibration.ort_session(model, threads=1, optimized=True)
        names = [o.name for o in session.get_outputs()]
        return [dict(zip(names, session.run(None, feed))) for feed in self.feeds]

    def score(self, model: onnx.ModelProto) -> float:
        return float(self.metric.score(self.outputs(model), self.reference, self.labels))

    def meets(self, score: float, budget: float) -> bool:
        return self.metric.meets(score, self.reference_score, budget)


# The elementwise Mul/Sigmoid ops quantize-int8 runs in int8 between int8 tensors (SiLU,
# squeeze-excitation gates) count as one layer of this name: its option ``elementwise``.
ELEMENTWISE = "(elementwise Mul/Sigmoid)"


def layers(model: onnx.ModelProto, embeddings: bool = True, elementwise: bool = True) -> list[str]:
    """The names of the compute nodes ``quantize-int8`` quantizes, in graph order, then (with
    ``embeddings``) of the Gathers whose tables it stores in int8, and (with ``elementwise``)
    ``ELEMENTWISE`` when the model has int8 elementwise ops."""
    graph = to_graph(model)
    plan = plan_static(graph, set(), True, True)
    names = [n.name for n in plan.nodes if n.op in LAYER_OPS]
    if embeddings:
        names += [n.name for n in graph.nodes if embedding_table(n) is not None]
    if elementwise and len(plan.nodes) > len(plan_static(graph, set(), True, False).nodes):
        names.append(ELEMENTWISE)
    return names


def int8_options(keep_fp32: Iterable[str], **options: Any) -> dict[str, Any]:
    """quantize-int8's options that leave the layers ``keep_fp32`` in fp32."""
    keep = set(keep_fp32)
    if ELEMENTWISE in keep:
        options["elementwise"] = False
    return {**options, "exclude": tuple(sorted(keep - {ELEMENTWISE}))}


def quantize_except(fp32: onnx.ModelProto, source: Any, keep_fp32: Iterator[str], cache: str,
                    **options: Any) -> onnx.ModelProto:
    """``fp32`` through ``quantize-int8`` with the layers ``keep_fp32`` left fp32 (speed check and
    per-tensor report off; ranges from ``cache``)."""
    from .quantize_int8 import QuantizeInt8

    graph = to_graph(fp32)
    options = {"report-samples": 0, "speed-check": False, **options, "cache": cache}
    QuantizeInt8(**int8_options(keep_fp32, **options)).run(graph, PassContext(
        opset=graph.opset, options={"calibration": source}))
    graph.cleanup().toposort()
    return from_graph(graph, fp32)


@contextlib.contextmanager
def range_cache(cache: str = "") -> Iterator[str]:
    """The calibration cache file to use: the given one, or a temporary one removed afterwards."""
    if cache:
        yield cache
        return
    with tempfile.TemporaryDirectory(prefix="infoptc-ranges-") as tmp:
        yield os.path.join(tmp, "ranges.json")


@dataclass
class Sensitivity:
    metric: str
    fp32_score: float
    all_int8_score: float
    rows: list[dict] = field(default_factory=list)  # layer, op, alone, left_out; worst first

    def as_dict(self) -> dict:
        return {"metric": self.metric, "fp32": self.fp32_score, "all_int8": self.all_int8_score, "layers": self.rows}


def analyze(model: onnx.ModelProto, source: Any, metric: str | Callable | Metric = "sqnr", samples: int = 0,
            cache: str = "", leave_out: bool = True, **options: Any) -> Sensitivity:
    """Score every layer alone in int8 and (with ``leave_out``) every layer left out of an
    otherwise int8 model; ``options`` go to ``quantize-int8`` (method, per-channel, isa...)."""
    names = layers(model, options.get("embeddings", True), options.get("elementwise", True))
    if not names:
        raise UsageError("the model has no layer quantize-int8 quantizes (Conv, Gemm or MatMul with constant "
                         "fp32 weights)")
    evaluator = Evaluator(model, source, metric, samples)
    ops = {n.name: n.op_type for n in model.graph.node} | {ELEMENTWISE: "Mul/Sigmoid"}
    data = evaluator.feeds
    with range_cache(cache) as path:
        quantize = lambda keep: evaluator.score(quantize_except(model, data, keep, path, **options))
        with stage("sensitivity: every layer in int8"):
            full = quantize(())
        rows = []
        with stage(f"sensitivity: {len(names)} layers") as step:
            for i, name in enumerate(names, 1):
                step.update(f"sensitivity: layer {i}/{len(names)} {name}")
                row = {"layer": name, "op": ops.get(name, "?"), "alone": quantize(set(names) - {name})}
                if leave_out:
                    row["left_out"] = quantize({name})
                rows.append(row)
    rows.sort(key=lambda r: (r["alone"], r["layer"]))
    return Sensitivity(evaluator.metric.name, evaluator.reference_score, full, rows)
