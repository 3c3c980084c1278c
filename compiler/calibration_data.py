"""Calibration data: reading it and checking it against the model's inputs.

The quantizers (and later the compression passes) take data in one of three forms:

- an ``.npz`` with one array per model input, named after it, one row per sample along the
  first axis (``x`` of shape ``[N, 1, 3, 224, 224]`` for an input ``[1, 3, 224, 224]``; an array
  of the input's own rank is split along its batch axis instead);
- a folder of ``.npz`` files with one sample each, read one at a time in name order;
- from Python, any iterable of ``{input name: array}`` feed dicts.

An array named ``labels`` that is not a model input holds each sample's label (a class index, or
one per row of a batch) for the ``accuracy`` metric (``labels()``); it is never fed to the model.

Every sample is checked against the model's inputs (names, dtypes, fixed dimensions, finite
values) as it is read; a problem is a ``UsageError`` naming the input.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx

from .errors import UsageError


LABELS = "labels"


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
            if LABELS not in self.inputs:
                feed.pop(LABELS, None)
            yield self._check(feed, index)
            count += 1
        if count == 0:
            raise UsageError(f"{self.where}: zero samples")

    def labels(self) -> list[np.ndarray] | None:
        """Each sample's ``labels`` array (as many as the samples read), None when the data has none."""
        if LABELS in self.inputs:
            return None
        found = []
        for feed in self._raw():
            if self.limit and len(found) >= self.limit:
                break
            if LABELS not in feed:
                return None
            found.append(np.asarray(feed[LABELS]).reshape(-1))
        return found

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
