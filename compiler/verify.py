"""Numerical equivalence: inputs for any model, ONNX Runtime execution, output comparison.

Tolerances come from the pipeline's numerical contract (see ``Contract``) and the dtype:
``exact`` passes must reproduce outputs bit for bit; ``reassociating`` ones within tight fp
tolerances; ``lossy`` ones are judged by a task metric, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx

from .errors import InvalidModelError, MissingDependencyError, VerificationError
from .pass_manager import Contract
from .targets import TensorSpec

# (atol, rtol) per dtype kind for reassociating transforms; ORT's own tests use ~1e-5 / 1e-4.
REASSOCIATING_TOLERANCE = {
    "float64": (1e-10, 1e-8),
    "float32": (1e-5, 1e-4),
    "float16": (1e-3, 1e-3),
    "bfloat16": (1e-2, 1e-2),
}

DEFAULT_DIM = 2  # value given to symbolic dims when generating inputs
LOG_LIKE_OPS = {"Log", "Sqrt", "Reciprocal", "Pow"}


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    @staticmethod
    def for_contract(contract: Contract, dtype: np.dtype | str) -> "Tolerance":
        dtype = np.dtype(dtype)
        if contract == Contract.EXACT or dtype.kind not in "fc":
            return Tolerance(0.0, 0.0)
        atol, rtol = REASSOCIATING_TOLERANCE.get(dtype.name, REASSOCIATING_TOLERANCE["float32"])
        return Tolerance(atol, rtol)


# ----------------------------------------------------------------------------- model facts


def _dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def tensor_specs(model: onnx.ModelProto, kind: str = "input") -> list[TensorSpec]:
    """Names, dtypes and shapes of the graph inputs (initializers excluded) or outputs."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    values = graph.input if kind == "input" else graph.output
    specs = []
    for vi in values:
        if kind == "input" and vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(TensorSpec(vi.name, _dtype_name(tt.elem_type), shape))
    return specs


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for x in node.input:
            users.setdefault(x, []).append(node)
    return users


def index_bound(model: onnx.ModelProto, name: str) -> int | None:
    """For an integer input used as Gather indices, the size of the gathered axis (the vocabulary)."""
    users = _consumers(model)
    inits = {t.name: t for t in model.graph.initializer}
    bounds = []
    frontier = [name]
    while frontier:
        x = frontier.pop()
        for node in users.get(x, []):
            if node.op_type == "Cast":
                frontier.extend(node.output)
            elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == x and node.input[0] in inits:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                dims = inits[node.input[0]].dims
                bounds.append(dims[axis])
    return min(bounds) if bounds else None


def random_inputs(
    model: onnx.ModelProto, seed: int = 0, dims: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """One valid input per graph input: symbolic dims from ``dims`` (default 2), Gather indices
    inside the vocabulary, other integers 0/1 (masks), floats standard normal (positive where
    they feed Log/Sqrt)."""
    rng = np.random.default_rng(seed)
    dims = dims or {}
    users = _consumers(model)
    feeds = {}
    for spec in tensor_specs(model, "input"):
        if spec.shape is None:
            raise InvalidModelError(f"input {spec.name!r} has no shape; give one with --input-shape")
        shape = tuple(d if isinstance(d, int) and d > 0 else dims.get(d, DEFAULT_DIM) if isinstance(d, str) else DEFAULT_DIM
                      for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind in "iu":
            high = index_bound(model, spec.name) or 2
            feeds[spec.name] = rng.integers(0, high, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype.kind == "f":
            x = rng.standard_normal(shape)
            if any(n.op_type in LOG_LIKE_OPS for n in users.get(spec.name, [])):
                x = np.abs(x) + 0.1
            feeds[spec.name] = x.astype(dtype)
        else:
            raise InvalidModelError(f"cannot generate inputs of dtype {spec.dtype} (input {spec.name!r})")
    return feeds


# ----------------------------------------------------------------------------- running


class OrtRunner:
    """An ONNX Runtime session over an in-memory model, checking the feeds it is given."""

    def __init__(self, model: onnx.ModelProto, *, threads: int | None = None, optimize: bool = True,
                 providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime is not installed (pip install onnxruntime)") from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.model = model
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), opts,
                                                providers=providers or self.default_providers())
        except Exception as e:
            raise InvalidModelError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0]}") from None
        self.input_specs = {s.name: s for s in tensor_specs(model, "input")}

    @staticmethod
    def default_providers() -> list[str]:
        import onnxruntime as ort

        available = ort.get_available_providers()
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.input_specs, inputs)
        names = [o.name for o in self.session.get_outputs()]
        try:
            values = self.session.run(names, inputs)
        except Exception as e:
            raise VerificationError(f"ONNX Runtime failed to run the model: {str(e).splitlines()[0]}") from None
        return dict(zip(names, values))


def check_feeds(specs: dict[str, TensorSpec], inputs: dict[str, np.ndarray]) -> None:
    """One-line errors for missing/unknown inputs and wrong dtypes or ranks."""
    from .errors import UsageError

    missing = [n for n in specs if n not in inputs]
    unknown = [n for n in inputs if n not in specs]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if unknown:
            parts.append(f"unknown input(s) {', '.join(map(repr, unknown))}")
        raise UsageError("; ".join(parts) + f" (the model takes {', '.join(map(repr, specs))})")
    for name, spec in specs.items():
        value = np.asarray(inputs[name])
        if value.dtype.name != spec.dtype:
            raise UsageError(f"input {name!r} has dtype {value.dtype.name}, the model expects {spec.dtype}")
        if spec.shape is not None:
            if value.ndim != len(spec.shape):
                raise UsageError(f"input {name!r} has shape {list(value.shape)}, the model expects rank {len(spec.shape)} {list(spec.shape)}")
            for got, want in zip(value.shape, spec.shape):
                if isinstance(want, int) and want > 0 and got != want:
                    raise UsageError(f"input {name!r} has shape {list(value.shape)}, the model expects {list(spec.shape)}")


def run_onnx(model: onnx.ModelProto, inputs: dict[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
    return OrtRunner(model, **kwargs).run(inputs)


# ----------------------------------------------------------------------------- comparing


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float
    worst_index: tuple
    expected: float
    actual: float
    tolerance: Tolerance
    ok: bool
    note: str = ""

    def describe(self) -> str:
        if self.note:
            return f"output {self.name!r}: {self.note}"
        return (f"output {self.name!r}: max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g} "
                f"(atol {self.tolerance.atol:g}, rtol {self.tolerance.rtol:g}); worst at {list(self.worst_index)}: "
                f"expected {self.expected!r}, got {self.actual!r}")


def compare_outputs(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                    contract: Contract = Contract.EXACT,
                    tolerances: dict[str, Tolerance] | None = None) -> list[OutputDiff]:
    """Compare output by output. NaNs must sit at the same places; ``exact`` means bitwise."""
    diffs = []
    for name, ref in expected.items():
        ref = np.asarray(ref)
        tol = (tolerances or {}).get(name) or Tolerance.for_contract(contract, ref.dtype)
        if name not in actual:
            diffs.append(OutputDiff(name, np.inf, np.inf, (), 0.0, 0.0, tol, False, note="missing from the candidate"))
            continue
        got = np.asarray(actual[name])
        if got.shape != ref.shape or got.dtype != ref.dtype:
            diffs.append(OutputDiff(name, np.inf, np.inf, (), 0.0, 0.0, tol, False,
                                    note=f"expected {ref.dtype}{list(ref.shape)}, got {got.dtype}{list(got.shape)}"))
            continue
        diffs.append(_diff(name, ref, got, tol))
    return diffs


def _diff(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> OutputDiff:
    if ref.size == 0:
        return OutputDiff(name, 0.0, 0.0, (), 0.0, 0.0, tol, True)
    if ref.dtype.kind not in "fc":
        bad = ref != got
        err = np.abs(ref.astype(np.float64) - got.astype(np.float64)) if ref.dtype.kind in "iub" else bad.astype(float)
        idx = np.unravel_index(int(np.argmax(err)), ref.shape)
        return OutputDiff(name, float(err.max()), float(bad.mean()), tuple(int(i) for i in idx),
                          _item(ref[idx]), _item(got[idx]), tol, not bad.any())
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    nan_mismatch = np.isnan(r) != np.isnan(g)
    both_nan = np.isnan(r) & np.isnan(g)
    same_inf = np.isinf(r) & (r == g)
    err = np.where(both_nan | same_inf, 0.0, np.abs(r - g))
    err = np.where(nan_mismatch, np.inf, err)
    rel = err / np.maximum(np.abs(r), np.finfo(np.float64).tiny)
    if tol.atol == 0 and tol.rtol == 0:
        ok = bool(np.array_equal(ref, got, equal_nan=True))
    else:
        ok = bool(np.all(err <= tol.atol + tol.rtol * np.abs(np.nan_to_num(r))))
    excess = err - (tol.atol + tol.rtol * np.abs(np.nan_to_num(r)))
    idx = np.unravel_index(int(np.nanargmax(excess)), ref.shape)
    return OutputDiff(name, float(err.max()), float(np.nanmax(rel)), tuple(int(i) for i in idx),
                      _item(ref[idx]), _item(got[idx]), tol, ok)


def _item(x) -> float:
    return x.item() if hasattr(x, "item") else x


def check_equivalent(reference: onnx.ModelProto, candidate: onnx.ModelProto, contract: Contract,
                     samples: int = 1, seed: int = 0, what: str = "candidate") -> list[OutputDiff]:
    """Run both models on ``samples`` generated inputs; raise ``VerificationError`` on a mismatch.

    Both run with ONNX Runtime's own graph optimizations off and one thread, so an ``exact``
    contract can be checked bit for bit.
    """
    ref_runner = OrtRunner(reference, threads=1, optimize=False)
    cand_runner = OrtRunner(candidate, threads=1, optimize=False)
    diffs: list[OutputDiff] = []
    for i in range(samples):
        feeds = random_inputs(reference, seed=seed + i)
        diffs = compare_outputs(ref_runner.run(feeds), cand_runner.run(feeds), contract)
        bad = [d for d in diffs if not d.ok]
        if bad:
            raise VerificationError(f"{what} differs from the original ({contract.value} contract, sample {i}): "
                                    + bad[0].describe())
    return diffs


def worst(diffs: Iterable[OutputDiff]) -> OutputDiff | None:
    return max(diffs, key=lambda d: d.max_abs, default=None)
