"""Is int8 faster here? Time candidate models against the fp32 one on this host's ONNX Runtime.

int8 pays on a CPU only where its kernels beat fp32's: depthwise convolutions, table-based
Sigmoid and tiny models can lose to fp32 on one CPU and win on another. The quantizers measure
instead of guessing: the fp32 model and each candidate run in interleaved rounds on one
calibration sample, and the fastest is taken, with margins that keep close calls stable: the
first candidate (the fullest int8 coverage) is kept unless another is ``PREFER`` faster, and int8
is taken only when it is at least 3% faster than fp32 (``INT8_MARGIN``): a tie keeps fp32.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import onnx

PREFER = 0.95  # another candidate must take at most 95% of the first's time to replace it
INT8_MARGIN = 0.97  # int8 must take at most 97% of fp32's time: a tie keeps fp32 (and its accuracy)
BUDGET_S = 3.0  # measuring time for all models together
SETTLE_S, WAKE, BLOCK = 0.05, 3, 10  # as benchmarks/quantize.py: ORT's spinners go quiet within the pause


@dataclass
class Timing:
    fp32_ms: float
    candidates_ms: dict  # candidate key -> median ms
    best: object  # the chosen candidate's key, or None for fp32

    def summary(self) -> str:
        parts = [f"fp32 {self.fp32_ms:.3f} ms"] + [f"int8[{k}] {v:.3f} ms" for k, v in self.candidates_ms.items()]
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {"fp32_ms": round(self.fp32_ms, 4), "candidates_ms": {str(k): round(v, 4) for k, v in self.candidates_ms.items()},
                "chosen": None if self.best is None else str(self.best)}


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # every logical CPU, as a server runs it (ORT's own default counts physical cores only, and
    # one thread or two changes which form wins: EfficientNet-B0 int8 beat fp32 on one of this
    # VM's two threads and lost on both)
    opts.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def compare(fp32: onnx.ModelProto, candidates: dict, feed: dict) -> Timing:
    """Median latency of ``fp32`` and of each candidate model (``key -> model``), interleaved."""
    from infoptc.bench import run_interleaved

    keys = list(candidates)
    sessions = [_session(fp32)] + [_session(candidates[k]) for k in keys]
    runners = [lambda s=s: s.run(None, feed) for s in sessions]
    for run in runners:  # first runs: allocation and kernel selection, not timed
        run()
    t0 = time.perf_counter()
    for run in runners:
        run()
    once = max(time.perf_counter() - t0, 1e-6)
    # in turns (a pause, WAKE untimed runs, BLOCK timed ones): ONNX Runtime's idle worker threads
    # spin for a while after a run, and interleaved run by run each session's spinners steal the
    # cores of the next (EfficientNet-B0: 7 ms alone, 23 ms interleaved with four other sessions)
    rounds = int(min(8, max(3, BUDGET_S / (once * (BLOCK + WAKE)))))
    samples = run_interleaved(runners, iterations=rounds, settle=SETTLE_S, block=BLOCK, wake=WAKE)
    medians = [statistics.median(x) * 1e3 for x in samples]
    fp32_ms, cand = medians[0], dict(zip(keys, medians[1:]))
    best = keys[0]
    for k in keys[1:]:
        if cand[k] <= PREFER * cand[best]:
            best = k
    return Timing(fp32_ms, cand, best if cand[best] <= INT8_MARGIN * fp32_ms else None)


SEQUENCE = 128  # the length a symbolic non-batch dimension is timed at (a typical transformer input)


def sample_feed(model: onnx.ModelProto) -> dict:
    """A feed to time ``model`` on when there is no calibration sample: symbolic dimensions are 1
    in the first (batch) position and ``SEQUENCE`` elsewhere; values valid for the model."""
    from infoptc.verify import random_inputs, tensor_specs

    dims: dict[str, int] = {}
    for spec in tensor_specs(model, "input"):
        for i, d in enumerate(spec.shape or ()):
            if isinstance(d, str):
                dims.setdefault(d, 1 if i == 0 else SEQUENCE)
    return random_inputs(model, seed=0, dims=dims)
