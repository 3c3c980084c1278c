"""How far a low-precision model is from its fp32 original: the metrics of sensitivity analysis and
of ``quantize-auto``'s accuracy budget.

A metric scores a model's outputs over the calibration samples against the fp32 model's outputs
on the same samples (``outputs`` and ``reference``: one ``{output name: array}`` dict per
sample). Higher is better for all of them. The budget is read in the metric's own terms:

- ``sqnr``: the worst output's signal-to-quantization-noise ratio in dB; the budget is a floor
  (``--accuracy-budget 30``: at least 30 dB).
- ``cosine``: the mean over samples of the cosine similarity of each output with the fp32 one
  (the worst output counts); the budget is the largest drop from 1.0 (0.001: cosine >= 0.999).
- ``top1-agreement``: the share of rows of the first output whose argmax (last axis) equals fp32's;
  the budget is the largest drop from 1.0.
- ``accuracy``: the share of rows whose argmax equals the label (the calibration data's
  ``labels`` array); the budget is the largest drop from the fp32 model's accuracy.

From Python, any callable ``metric(outputs, reference) -> float`` (higher is better) works as a
drop metric: its budget is the largest drop from ``metric(reference, reference)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from infoptc.errors import UsageError
from infoptc.verify import sqnr_db

Outputs = Sequence[dict]  # one {output name: array} per sample


def _floats(outputs: Outputs, name: str) -> np.ndarray:
    return np.concatenate([np.asarray(o[name], np.float64).ravel() for o in outputs])


def _float_names(reference: Outputs) -> list[str]:
    return [k for k, v in reference[0].items() if np.asarray(v).dtype.kind == "f"]


def sqnr(outputs: Outputs, reference: Outputs) -> float:
    return min(float(sqnr_db(_floats(reference, k), _floats(outputs, k))) for k in _float_names(reference))


def cosine(outputs: Outputs, reference: Outputs) -> float:
    worst = np.inf
    for k in _float_names(reference):
        sims = []
        for got, ref in zip(outputs, reference):
            a, b = np.asarray(got[k], np.float64).ravel(), np.asarray(ref[k], np.float64).ravel()
            norm = np.linalg.norm(a) * np.linalg.norm(b)
            sims.append(1.0 if norm == 0 and not a.any() and not b.any() else float(a @ b / norm) if norm else 0.0)
        worst = min(worst, float(np.mean(sims)))
    return worst


def _top1(outputs: Outputs) -> np.ndarray:
    first = next(iter(outputs[0]))
    return np.concatenate([np.asarray(o[first]).reshape(-1, np.asarray(o[first]).shape[-1]).argmax(-1)
                           for o in outputs])


def top1_agreement(outputs: Outputs, reference: Outputs) -> float:
    return float(np.mean(_top1(outputs) == _top1(reference)))


def accuracy(outputs: Outputs, labels: Sequence[np.ndarray]) -> float:
    predicted = _top1(outputs)
    truth = np.concatenate([np.asarray(lab).reshape(-1) for lab in labels]).astype(np.int64)
    if truth.size != predicted.size:
        raise UsageError(f"the calibration data's labels hold {truth.size} values for {predicted.size} predicted rows")
    return float(np.mean(predicted == truth))


@dataclass(frozen=True)
class Metric:
    """``score(outputs, reference, labels)``; ``floor``: the budget is the lowest score allowed
    (sqnr), otherwise the largest drop from the fp32 model's own score."""

    name: str
    score: Callable[[Outputs, Outputs, Sequence | None], float]
    floor: bool = False
    needs_labels: bool = False

    def reference_score(self, reference: Outputs, labels: Sequence | None) -> float:
        return np.inf if self.floor else self.score(reference, reference, labels)

    def meets(self, score: float, reference_score: float, budget: float) -> bool:
        return score >= budget if self.floor else reference_score - score <= budget + 1e-12

    def budget_text(self, budget: float, reference_score: float) -> str:
        if self.floor:
            return f"{self.name} >= {budget:g}"
        return f"{self.name} >= {reference_score - budget:.4g} (fp32 {reference_score:.4g} - {budget:g})"


METRICS: dict[str, Metric] = {
    "sqnr": Metric("sqnr", lambda out, ref, _: sqnr(out, ref), floor=True),
    "cosine": Metric("cosine", lambda out, ref, _: cosine(out, ref)),
    "top1-agreement": Metric("top1-agreement", lambda out, ref, _: top1_agreement(out, ref)),
    "accuracy": Metric("accuracy", lambda out, _, labels: accuracy(out, labels), needs_labels=True),
}


# the budget when none is given: what each metric's users would call "no visible loss"
DEFAULT_BUDGET = {"sqnr": 30.0, "cosine": 1e-3, "top1-agreement": 0.01, "accuracy": 0.01}


def resolve_metric(metric: str | Callable | Metric) -> Metric:
    """A metric by name, or a Python callable ``metric(outputs, reference) -> float`` (higher is better)."""
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        name = getattr(metric, "__name__", "custom")
        return Metric(name, lambda out, ref, _: float(metric(out, ref)))
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return METRICS[metric]
