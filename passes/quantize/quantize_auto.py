"""quantize-auto: int8 where the accuracy budget allows it, fp32 where it does not, measured.

The search, after NNCF's accuracy-aware quantization:

1. Quantize every layer (``quantize-int8``) and score it with the metric on the calibration
   data. Within the budget: done.
2. Otherwise rank the layers by what giving each one back its fp32 precision recovers (every
   other layer int8, this one fp32), then revert them in that order, in chunks that double
   while they help (1, 2, 4, ... layers), keeping a chunk only when it raises the score (a step
   back otherwise, and its layers are tried one at a time), until the budget is met; the chunk
   that meets it is bisected down to the fewest of its layers that still do.
3. Time fp32 and the assignments tried that meet the budget side by side on this host (those on
   the size/score Pareto front), and keep the fastest: an assignment slower than fp32 is no gain,
   and then the model stays fp32 with a warning.

No assignment with any int8 layer that meets the budget: a ``VerificationError`` naming the best
one found (``force=true`` keeps that best one instead). The layers go back to fp32, the precision
ONNX Runtime's CPU kernels run fastest after int8. ``ctx.reports["quantize-auto"]`` holds every
assignment tried (fp32 layers, score, size, latency where timed, Pareto membership) and the chosen
one; the final model is written by ``quantize-int8`` itself, with its per-tensor report.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.errors import VerificationError
from infoptc.ir import from_graph
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass

from . import calibration, speed
from .common import parse_exclude
from .metrics import DEFAULT_BUDGET, METRICS
from .quantize_int8 import QuantizeInt8
from .sensitivity import Evaluator, int8_options, layers, quantize_except, range_cache

log = logging.getLogger("infoptc")

TIMED = 6  # at most this many assignments are timed beside fp32


def _metric(value: Any) -> Any:
    if callable(value) or value in METRICS:
        return value
    raise ValueError(f"unknown metric; choose one of {', '.join(METRICS)}")


# the int8 options the search passes through; it times the assignments itself, and the report
# is made once for the final model
_INT8_OPTIONS = {k: v for k, v in QuantizeInt8.options.items() if k not in ("speed-check", "calibration", "samples")}


@dataclass
class Trial:
    keep_fp32: frozenset
    score: float
    size: int
    meets: bool
    step: str
    latency_ms: float | None = None
    pareto: bool = False

    def as_dict(self) -> dict:
        return {"fp32_layers": sorted(self.keep_fp32), "score": _finite(self.score), "size_bytes": self.size,
                "meets_budget": self.meets, "step": self.step, "latency_ms": self.latency_ms, "pareto": self.pareto}


def _finite(x: float) -> float | None:
    return round(float(x), 6) if np.isfinite(x) else None


@register_pass
class QuantizeAuto(Pass):
    name = "quantize-auto"
    summary = "int8 where an accuracy budget allows it (measured per layer), fp32 elsewhere; keeps the fastest"
    contract = Contract.LOSSY
    reports_changes = True
    options = {
        "calibration": Option("", "calibration data: an .npz of stacked samples or a folder of .npz files"),
        "samples": Option(0, "calibration samples to quantize and score with (0: all)"),
        "metric": Option("sqnr", "sqnr | cosine | top1-agreement | accuracy (labels in the data), or from Python "
                                 "a callable metric(outputs, reference) -> float", parse=_metric),
        "budget": Option(-1.0, "sqnr: the lowest dB allowed; the others: the largest drop from fp32's score "
                               "(negative: the metric's default, " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_BUDGET.items()) + ")"),
        "max-steps": Option(64, "most reverts tried after the ranking"),
        "force": Option(False, "when no int8 assignment meets the budget, keep the best one found instead of failing"),
        "speed-check": Option(True, "time the assignments within the budget against fp32 and keep the fastest "
                                    "(false: the one with the fewest fp32 layers, untimed; byte-identical reruns)"),
        **_INT8_OPTIONS,
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        metric = self.opts["metric"]
        budget = self.opts["budget"]
        if budget < 0:
            budget = DEFAULT_BUDGET.get(metric if isinstance(metric, str) else "", 0.01)
        fp32 = from_graph(graph)
        names = layers(fp32, self.opts["embeddings"], self.opts["elementwise"])
        if not names:
            log.warning("quantize-auto: nothing worth quantizing (no Conv, Gemm or MatMul with constant fp32 "
                        "weights); the model stays fp32")
            return PassResult(False, {"quantized": 0})
        source = calibration.calibration_source(ctx.options, self.opts, self.name)
        evaluator = Evaluator(fp32, source, metric, self.opts["samples"])
        int8 = {k: self.opts[k] for k in _INT8_OPTIONS}
        always_fp32 = parse_exclude(int8.pop("exclude"))
        report_samples = int8.pop("report-samples")
        names = [n for n in names if n not in always_fp32]
        trials: list[Trial] = []
        with range_cache(int8.pop("cache")) as cache:
            def build(keep: frozenset):
                return quantize_except(fp32, evaluator.feeds, keep | always_fp32, cache, **int8)

            def attempt(keep: frozenset, step: str) -> Trial:
                model = build(keep)
                score = evaluator.score(model)
                trial = Trial(keep, score, model.ByteSize(), evaluator.meets(score, budget), step)
                trials.append(trial)
                return trial

            current = attempt(frozenset(), "all int8")
            if not current.meets:
                # what giving each layer back recovers, alone: the order of the reverts
                recovers = {n: evaluator.score(build(frozenset({n}))) for n in names}
                current = self._revert(current, sorted(names, key=lambda n: (-recovers[n], n)), attempt,
                                       set(layers(fp32, embeddings=False, elementwise=False)) - always_fp32)
            meeting = [t for t in trials if t.meets]
            if not meeting:
                best = max(trials, key=lambda t: t.score)
                message = (f"quantize-auto: no int8 assignment meets {evaluator.metric.budget_text(budget, evaluator.reference_score)}"
                           f": the best of {len(trials)} tried scores {best.score:.4g} with {len(best.keep_fp32)} of "
                           f"{len(names)} layers fp32")
                if not self.opts["force"]:
                    raise VerificationError(message + " (force=true / --force keeps it)")
                log.warning("%s; kept as asked (force)", message)
                meeting = [best]
            if self.opts["speed-check"]:
                chosen, fp32_ms = self._fastest(fp32, meeting, build, evaluator.feeds[0])
            else:
                chosen, fp32_ms = min(meeting, key=lambda t: (len(t.keep_fp32), -t.score)), None
            ctx.reports[self.name] = {
                "metric": evaluator.metric.name, "budget": budget, "fp32_score": _finite(evaluator.reference_score),
                "layer_count": len(names), "fp32_ms": fp32_ms,
                "chosen": None if chosen is None else chosen.as_dict(), "trials": [t.as_dict() for t in trials]}
            if chosen is None:
                log.warning("quantize-auto: every assignment within the budget is slower than fp32 on this host "
                            "(fp32 %.3f ms); the model stays fp32", fp32_ms)
                return PassResult(False, {"quantized": 0, "kept_fp32_slower": 1, "tried": len(trials)})
            final = QuantizeInt8(**int8_options(chosen.keep_fp32 | always_fp32, **int8), cache=cache,
                                 speed_check=False, report_samples=report_samples)
            # the samples scored (reports and metadata still go to the caller's context)
            result = final.run(graph, dataclasses.replace(ctx, options={**ctx.options, "calibration": evaluator.feeds}))
        result.counters.update({"tried": len(trials), "layers_fp32": len(chosen.keep_fp32)})
        return result

    def _revert(self, current: Trial, order: list[str], attempt, compute: set[str]) -> Trial:
        """Give layers back their fp32 in ``order``, in chunks that double while they help (1, 2,
        4, ... layers: a model that needs many reverts gets there in logarithmically many
        trials); a chunk that does not raise the score is stepped back and its layers are tried
        again one at a time (a single layer that does not help is skipped); the chunk that meets
        the budget is bisected to the fewest layers that do. Stops at the budget, after
        ``max-steps`` trials, or before reverting the last int8 layer of ``compute`` (the
        Conv/Gemm/MatMuls: without one, quantize-int8 quantizes nothing)."""
        steps, size, i = 0, 1, 0
        while i < len(order) and steps < self.opts["max-steps"]:
            chunk = order[i : i + size]
            if not compute - current.keep_fp32 - set(chunk):  # the last compute layer stays int8
                kept = next(n for n in reversed(chunk) if n in compute)
                order = [n for n in order if n != kept]
                chunk = [n for n in chunk if n != kept]
                if not chunk:
                    continue
            trial = attempt(current.keep_fp32 | set(chunk), _revert_step(chunk))
            steps += 1
            if trial.score <= current.score:
                trial.step += " (no gain: stepped back)"
                # a chunk's layers get their own tries; a single layer that does not help is skipped
                i, size = i + (1 if len(chunk) == 1 else 0), 1
                continue
            i += len(chunk)
            if trial.meets:
                lo, hi, best = 0, len(chunk), trial  # chunk[:hi] meets, chunk[:lo] did not
                while hi - lo > 1 and steps < self.opts["max-steps"]:
                    mid = (lo + hi) // 2
                    t = attempt(current.keep_fp32 | set(chunk[:mid]), _revert_step(chunk[:mid]) + " (bisecting)")
                    steps += 1
                    lo, hi, best = (lo, mid, t) if t.meets else (mid, hi, best)
                return best
            current, size = trial, size * 2
        return current

    @staticmethod
    def _fastest(fp32, meeting: list[Trial], build, feed: dict) -> tuple[Trial | None, float]:
        """Time fp32 and the Pareto-optimal (size, score) assignments within the budget, side by
        side; the fastest and fp32's time (None for the fastest when fp32 is)."""
        front = _pareto(meeting, key=lambda t: (t.size, -t.score))
        # the fewest fp32 layers first (the smallest model): it is the default when times tie
        front.sort(key=lambda t: (len(t.keep_fp32), -t.score))
        timed = front[:TIMED]
        for t in timed:
            t.pareto = True
        timing = speed.compare(fp32, {i: build(t.keep_fp32) for i, t in enumerate(timed)}, feed)
        for i, t in enumerate(timed):
            t.latency_ms = round(timing.candidates_ms[i], 4)
        fastest = min(timed, key=lambda t: (t.latency_ms, len(t.keep_fp32)))
        if fastest.latency_ms > speed.INT8_MARGIN * timing.fp32_ms:
            return None, timing.fp32_ms
        return fastest, timing.fp32_ms


def _revert_step(chunk: list[str]) -> str:
    return f"revert {chunk[0]}" if len(chunk) == 1 else f"revert {len(chunk)}: {chunk[0]} ... {chunk[-1]}"


def _pareto(trials: list[Trial], key) -> list[Trial]:
    """The trials no other trial beats in every coordinate of ``key`` (smaller is better)."""
    keys = [key(t) for t in trials]
    return [t for t, k in zip(trials, keys)
            if not any(all(a <= b for a, b in zip(o, k)) and o != k for o in keys)]
