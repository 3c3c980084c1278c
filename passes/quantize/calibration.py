"""Observing activation ranges over calibration data (read by ``infoptc.calibration_data``).

``observe`` runs the model once over the samples with the observed tensors as extra outputs and
streams them into ``Observer`` summaries; ``cached_observers`` keeps those summaries in a file
keyed by the model's and the data's hashes, so a rerun with another method or option does not
run the model again. ``channel_stats`` gives per-channel means and peaks (bias correction,
SmoothQuant).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from infoptc.calibration_data import CalibrationData, model_inputs  # noqa: F401  (re-exported)
from infoptc.errors import MissingDependencyError, UsageError
from infoptc.ir import write_atomic
from infoptc.progress import stage

from .observers import BINS, Observer

# ----------------------------------------------------------------------------- observing


def ort_session(model: onnx.ModelProto, threads: int = 0, optimized: bool = False):
    """An ONNX Runtime CPU session that keeps every tensor as the model computes it, or with
    ``optimized`` as a user runs it (QDQ fused into the int8 kernels, whose rounding differs)."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
        raise MissingDependencyError("calibration needs onnxruntime") from e
    opts = ort.SessionOptions()
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the tensors ``names`` (float32, shape left open)."""
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    have = {o.name for o in extra.graph.output}
    for name in names:
        if name not in have:
            extra.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            have.add(name)
    return extra


def observe(model: onnx.ModelProto, tensors: list[str], data: CalibrationData) -> dict[str, Observer]:
    """One observer per tensor, fed by running ``model`` over every sample of ``data``."""
    session = ort_session(with_outputs(model, tensors))
    observers = {name: Observer() for name in tensors}
    with stage(f"calibrating: observing {len(tensors)} tensors") as step:
        for i, feed in enumerate(data, 1):
            step.update(f"calibrating: observing {len(tensors)} tensors, sample {i}")
            values = session.run(tensors, feed)
            for name, value in zip(tensors, values):
                observers[name].update(value)
    return observers


def model_digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def cached_observers(model: onnx.ModelProto, tensors: list[str], data: CalibrationData,
                     cache: str | os.PathLike | None) -> tuple[dict[str, Observer], bool, str | None]:
    """``observe``, through the cache file when one is named. Returns (observers, cache hit, the
    cache key of this model and data, None without a cache)."""
    if not cache:
        return observe(model, tensors, data), False, None
    key = f"{model_digest(model)}:{data.digest()}:{data.limit}"
    kept = _OBSERVED.get((str(cache), key))
    if kept is not None and all(name in kept for name in tensors):
        return {name: kept[name] for name in tensors}, True, key
    entries = _read_cache(cache)
    entry = entries.get(key)
    if isinstance(entry, dict) and all(name in entry for name in tensors):
        observers, hit = {name: _from_json(entry[name]) for name in entry}, True
    else:
        observers, hit = observe(model, tensors, data), False
        entries[key] = {name: _to_json(obs) for name, obs in observers.items()}
        write_atomic(Path(cache), json.dumps(entries, sort_keys=True).encode())
    _OBSERVED.clear()  # one model's at a time: what quantize-auto's many rewrites of one model ask for
    _OBSERVED[(str(cache), key)] = observers
    return {name: observers[name] for name in tensors}, hit, key


# The observers of the last cache entry used, by (cache file, key): reading and parsing the cache
# file again, and searching the ranges again, for each of quantize-auto's assignments costs more
# than the rewrite itself on a transformer.
_OBSERVED: dict[tuple[str, str], dict[str, Observer]] = {}


def _read_cache(cache: str | os.PathLike) -> dict:
    path = Path(cache)
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is recomputed and rewritten, never trusted
    return entries if isinstance(entries, dict) else {}


def cached_decision(cache: str | os.PathLike, key: str) -> dict | None:
    """A decision stored under ``key`` (the speed check's, so that a rerun with the cache writes
    the same model without timing anything)."""
    value = _read_cache(cache).get("decisions", {}).get(key)
    return value if isinstance(value, dict) else None


def store_decision(cache: str | os.PathLike, key: str, value: dict) -> None:
    entries = _read_cache(cache)
    decisions = entries.get("decisions") if isinstance(entries.get("decisions"), dict) else {}
    decisions[key] = value
    entries["decisions"] = decisions
    write_atomic(Path(cache), json.dumps(entries, sort_keys=True).encode())


def _to_json(obs: Observer) -> dict:
    return {"lo": obs.lo, "hi": obs.hi, "edge_lo": obs.edge_lo, "edge_hi": obs.edge_hi, "count": obs.count,
            "hist": None if obs.hist is None else obs.hist.tolist()}


def _from_json(d: dict) -> Observer:
    obs = Observer()
    obs.lo, obs.hi, obs.edge_lo, obs.edge_hi, obs.count = d["lo"], d["hi"], d["edge_lo"], d["edge_hi"], d["count"]
    obs.hist = None if d["hist"] is None else np.asarray(d["hist"], dtype=np.float64).reshape(BINS)
    return obs


def channel_stats(model: onnx.ModelProto, tensors: Mapping[str, int], data: CalibrationData
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per channel of each tensor (``name -> channel axis``): (mean, max |x|) over ``data``."""
    names = list(tensors)
    session = ort_session(with_outputs(model, names))
    sums: dict[str, np.ndarray] = {}
    peaks: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    with stage(f"calibrating: statistics of {len(names)} tensors per channel") as step:
        for i, feed in enumerate(data, 1):
            step.update(f"calibrating: statistics of {len(names)} tensors per channel, sample {i}")
            for name, value in zip(names, session.run(names, feed)):
                v = np.moveaxis(np.asarray(value, dtype=np.float64), tensors[name], -1)
                v = v.reshape(-1, v.shape[-1])
                sums[name] = sums.get(name, 0) + v.sum(axis=0)
                peaks[name] = np.maximum(peaks.get(name, 0), np.abs(v).max(axis=0))
                counts[name] = counts.get(name, 0) + v.shape[0]
    return {n: (sums[n] / counts[n], peaks[n]) for n in names}


def calibration_source(ctx_options: Mapping, opts: Mapping, pass_name: str):
    """The calibration data a pass was given: the driver's (Python iterables included) first,
    then the pass's own ``calibration`` option; a usage error when there is none."""
    source = ctx_options["calibration"] if "calibration" in ctx_options else opts.get("calibration", "")
    if isinstance(source, str) and not source:
        raise UsageError(f"{pass_name} needs calibration data (--calibration FILE.npz or a folder of .npz)")
    return source
