"""Calibration data: reading it, checking it against the model, and observing activation ranges.

Calibration data comes in one of three forms:

- an ``.npz`` with one array per model input, named after it, one row per sample along the
  first axis (``x`` of shape ``[N, 1, 3, 224, 224]`` for an input ``[1, 3, 224, 224]``; an array
  of the input's own rank is split along its batch axis instead);
- a folder of ``.npz`` files with one sample each, read one at a time in name order;
- from Python, any iterable of ``{input name: array}`` feed dicts.

``collect_ranges`` runs the model once over the samples with the observed tensors as extra
outputs and streams them into ``Observer`` summaries; a cache file keyed by the model's and the
data's hashes keeps those summaries, so a rerun with another method or option does not run the
model again.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from infoptc.errors import MissingDependencyError, UsageError
from infoptc.ir import write_atomic
from infoptc.progress import stage

from .observers import BINS, Observer

Feed = Mapping[str, np.ndarray]


class CalibrationData:
    """A re-iterable, validated stream of feeds for the model's inputs."""

    def __init__(self, source, inputs: Mapping[str, tuple[np.dtype, tuple | None]], limit: int = 0):
        self.source = source
        self.inputs = dict(inputs)  # name -> (dtype, shape with None for symbolic dims)
        self.limit = limit
        self.where = str(source) if isinstance(source, (str, os.PathLike)) else "the calibration data"
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.exists():
                raise UsageError(f"calibration data {str(path)!r} does not exist")
            if path.is_dir():
                self._files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
                if not self._files:
                    raise UsageError(f"calibration folder {str(path)!r} holds no .npz files (zero samples)")
            elif path.is_file():
                self._files = None
            else:
                raise UsageError(f"calibration data {str(path)!r} is neither a file nor a folder")
        elif isinstance(source, Iterator):  # a one-shot iterator: keep what it yields for the second pass
            self.source = list(source)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        count = 0
        for index, feed in enumerate(self._raw()):
            if self.limit and count >= self.limit:
                return
            yield self._check(feed, index)
            count += 1
        if count == 0:
            raise UsageError(f"{self.where}: zero samples")

    def _raw(self) -> Iterator[dict[str, np.ndarray]]:
        if not isinstance(self.source, (str, os.PathLike)):
            for feed in self.source:
                if not isinstance(feed, Mapping):
                    raise UsageError(f"{self.where}: each sample must be a dict of input name -> array, "
                                     f"got {type(feed).__name__}")
                yield {k: np.asarray(v) for k, v in feed.items()}
            return
        if self._files is not None:
            for path in self._files:
                yield {k: self._with_batch(k, v) for k, v in _read_npz(path).items()}
            return
        arrays = _read_npz(Path(self.source))
        counts = {k: self._rows(k, v) for k, v in arrays.items()}
        known = [n for k, n in counts.items() if k in self.inputs]
        if known and len(set(known)) > 1:
            raise UsageError(f"{self.where}: inputs hold different sample counts "
                             + ", ".join(f"{k}={n}" for k, n in counts.items()))
        for i in range(known[0] if known else 1):
            yield {k: self._row(k, v, i) for k, v in arrays.items()}

    def _rank(self, name: str) -> int | None:
        spec = self.inputs.get(name)
        return None if spec is None or spec[1] is None else len(spec[1])

    def _rows(self, name: str, value: np.ndarray) -> int:
        rank = self._rank(name)
        if rank is not None and value.ndim not in (rank, rank + 1):
            raise UsageError(f"{self.where}: input {name!r} has rank {value.ndim}; expected {rank + 1} "
                             f"(samples stacked on a new first axis) or {rank}")
        return value.shape[0] if value.ndim else 1

    def _row(self, name: str, value: np.ndarray, i: int) -> np.ndarray:
        rank = self._rank(name)
        if rank is not None and value.ndim == rank:  # split along the model's own batch axis
            return value[i : i + 1]
        return value[i]

    def _with_batch(self, name: str, value: np.ndarray) -> np.ndarray:
        rank = self._rank(name)
        if rank is not None and value.ndim == rank + 1 and value.shape[0] == 1:
            return value[0]
        return value

    def _check(self, feed: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in feed]
        extra = [n for n in feed if n not in self.inputs]
        if missing:
            raise UsageError(f"{self.where}: sample {index} lacks input {missing[0]!r} "
                             f"(the model's inputs: {', '.join(self.inputs)})")
        if extra:
            raise UsageError(f"{self.where}: input {extra[0]!r} is not a model input "
                             f"(the model's inputs: {', '.join(self.inputs)})")
        for name, (dtype, shape) in self.inputs.items():
            value = feed[name]
            if value.dtype != dtype:
                raise UsageError(f"{self.where}: input {name!r} has dtype {value.dtype}, the model takes {dtype}")
            if shape is not None and (len(shape) != value.ndim or any(
                    isinstance(d, int) and d > 0 and d != v for d, v in zip(shape, value.shape))):
                want = "x".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in shape)
                raise UsageError(f"{self.where}: input {name!r} sample {index} has shape "
                                 f"{'x'.join(map(str, value.shape))}, the model takes {want}")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise UsageError(f"{self.where}: input {name!r} sample {index} holds NaN or Inf")
        return feed

    def digest(self) -> str:
        """A hash of every sample (names, dtypes, shapes and bytes), for the range cache's key."""
        h = hashlib.sha256()
        for feed in self:
            for name in sorted(feed):
                v = np.ascontiguousarray(feed[name])
                h.update(f"{name}|{v.dtype.str}|{v.shape}|".encode())
                h.update(v.tobytes())
        return h.hexdigest()


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"calibration file {str(path)!r} is not a readable .npz ({e})") from None


def model_inputs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, tuple | None]]:
    """The graph inputs a feed must give: name -> (numpy dtype, dims with None where symbolic)."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                      for d in tt.shape.dim) if tt.HasField("shape") else None
        out[vi.name] = (dtype, shape)
    return out


# ----------------------------------------------------------------------------- observing


def ort_session(model: onnx.ModelProto, threads: int = 0):
    """An ONNX Runtime CPU session that keeps every tensor as the model computes it."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
        raise MissingDependencyError("calibration needs onnxruntime") from e
    opts = ort.SessionOptions()
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
                     cache: str | os.PathLike | None) -> tuple[dict[str, Observer], bool]:
    """``observe``, through the cache file when one is named. Returns (observers, cache hit)."""
    if not cache:
        return observe(model, tensors, data), False
    key = f"{model_digest(model)}:{data.digest()}:{data.limit}"
    path = Path(cache)
    entries = {}
    if path.exists():
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}  # a damaged cache is recomputed and rewritten, never trusted
    entry = entries.get(key) if isinstance(entries, dict) else None
    if isinstance(entry, dict) and all(name in entry for name in tensors):
        return {name: _from_json(entry[name]) for name in tensors}, True
    observers = observe(model, tensors, data)
    entries = entries if isinstance(entries, dict) else {}
    entries[key] = {name: _to_json(obs) for name, obs in observers.items()}
    write_atomic(path, json.dumps(entries, sort_keys=True).encode())
    return observers, False


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
