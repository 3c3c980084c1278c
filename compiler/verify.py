"""Numerical equivalence: inputs for any model, ONNX Runtime execution, output comparison.

Tolerances come from the pipeline's numerical contract (see ``Contract``) and the dtype:
``exact`` passes must reproduce outputs bit for bit; ``reassociating`` ones within tight fp
tolerances; ``lossy`` ones are judged by a task metric, not here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import ir
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
    def for_contract(contract: Contract, dtype: np.dtype | str) -> Tolerance:
        """Zero (bit for bit) for ``exact`` and for non-float dtypes; the dtype's row of
        ``REASSOCIATING_TOLERANCE`` otherwise. ``lossy`` transforms are judged by a task metric
        (``infoptc.testing.assert_equivalent(metric=...)``); here they get the same tolerance
        as ``reassociating``, which is what a per-element check can promise at most."""
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
        is_float = name in REASSOCIATING_TOLERANCE or name in _EXTENDED_FLOATS or (
            name in _NUMPY_NAMES | {"complex64", "complex128"} and np.dtype(name).kind in "fc")
        if contract == Contract.EXACT or not is_float:
            return Tolerance(0.0, 0.0)
        atol, rtol = REASSOCIATING_TOLERANCE.get(name, REASSOCIATING_TOLERANCE["float32"])
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


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for x in node.input:
            users.setdefault(x, []).append(node)
    return users


# Ops whose first output holds the same values as their first input (only rearranged), so a
# constraint on what an op further down needs carries back through them to the graph input.
VALUE_PRESERVING_OPS = {"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Expand"}
# Ops whose first input must be positive for the output to be defined (Pow: a negative base
# with a fractional exponent is NaN).
POSITIVE_INPUT_OPS = LOG_LIKE_OPS


def _forward(users: dict[str, list[onnx.NodeProto]], name: str):
    """(node, input position) for every use of ``name``, looking through value-preserving ops."""
    seen, frontier = {name}, [name]
    while frontier:
        x = frontier.pop()
        for node in users.get(x, []):
            for pos, inp in enumerate(node.input):
                if inp != x:
                    continue
                yield node, pos
                if node.op_type in VALUE_PRESERVING_OPS and pos == 0 and node.output and node.output[0] not in seen:
                    seen.add(node.output[0])
                    frontier.append(node.output[0])


def _constant_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """Shapes of initializers and Constant-node outputs (the tables a Gather may index)."""
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                shapes[node.output[0]] = tuple(value.dims)
    return shapes


def index_bound(model: onnx.ModelProto, name: str) -> int | None:
    """For an integer input used as Gather indices, the size of the gathered axis (the vocabulary).

    Looks through Cast, Reshape and the like; ``None`` when no constant table is gathered from.
    """
    users = _consumers(model.graph)
    tables = _constant_shapes(model.graph)
    bounds = []
    for node, pos in _forward(users, name):
        if node.op_type in ("Gather", "GatherElements") and pos == 1 and node.input[0] in tables:
            dims = tables[node.input[0]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if dims and -len(dims) <= axis < len(dims):
                bounds.append(dims[axis])
    return min(bounds) if bounds else None


def needs_positive(model: onnx.ModelProto, name: str) -> bool:
    """Whether the float input ``name`` reaches an op that is undefined for negative values
    (Log, Sqrt, Reciprocal, the base of Pow), directly or through value-preserving ops."""
    return any(node.op_type in POSITIVE_INPUT_OPS and pos == 0
               for node, pos in _forward(_consumers(model.graph), name))


@dataclass(frozen=True)
class InputConstraint:
    """What values keep a model's ops defined for one input.

    ``kind``: ``"index"`` (integers in ``[0, high)``: Gather indices into a table of ``high``
    rows), ``"mask"`` (integers or bools in {0, 1}), ``"positive"`` (floats > 0), ``"any"``.
    """

    kind: str
    high: int = 2


def input_constraints(model: onnx.ModelProto) -> dict[str, InputConstraint]:
    """The constraint of every graph input (initializers excluded)."""
    out = {}
    for spec in tensor_specs(model, "input"):
        kind = np.dtype(spec.dtype).kind if spec.dtype in _NUMPY_NAMES else "?"
        if kind in "iu":
            bound = index_bound(model, spec.name)
            out[spec.name] = InputConstraint("index", bound) if bound else InputConstraint("mask")
        elif kind == "b":
            out[spec.name] = InputConstraint("mask")
        elif kind == "f" and needs_positive(model, spec.name):
            out[spec.name] = InputConstraint("positive")
        else:
            out[spec.name] = InputConstraint("any")
    return out


_NUMPY_NAMES = {np.dtype(t).name for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                           np.uint32, np.uint64, np.float16, np.float32, np.float64)}


def concrete_shape(spec: TensorSpec, dims: dict[str, int] | None = None, default: int = DEFAULT_DIM) -> tuple[int, ...]:
    """The shape of ``spec`` with symbolic dims taken from ``dims`` (else ``default``)."""
    if spec.shape is None:
        raise InvalidModelError(f"input {spec.name!r} has no shape; give one with --input-shape")
    dims = dims or {}
    return tuple(d if isinstance(d, int) and d > 0 else dims.get(d, default) if isinstance(d, str) else default
                 for d in spec.shape)


def random_inputs(
    model: onnx.ModelProto, seed: int = 0, dims: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """One valid input per graph input: symbolic dims from ``dims`` (default 2), Gather indices
    inside the vocabulary, other integers 0/1 (masks), floats standard normal (positive where
    they feed Log/Sqrt/Reciprocal/Pow)."""
    rng = np.random.default_rng(seed)
    constraints = input_constraints(model)
    feeds = {}
    for spec in tensor_specs(model, "input"):
        shape = concrete_shape(spec, dims)
        if spec.dtype not in _NUMPY_NAMES:
            raise InvalidModelError(f"cannot generate inputs of dtype {spec.dtype} (input {spec.name!r})")
        dtype = np.dtype(spec.dtype)
        rule = constraints[spec.name]
        if dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, rule.high, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            x = rng.standard_normal(shape)
            if rule.kind == "positive":
                x = np.abs(x) + 0.1
            feeds[spec.name] = x.astype(dtype)
    return feeds


# ----------------------------------------------------------------------------- running


class OrtRunner:
    """An ONNX Runtime session over an in-memory model, checking the feeds it is given.

    ``optimize=False`` is the setting for comparisons: no ORT graph optimizations and no weight
    prepacking. ORT prepacks constant MatMul/Conv weights into another kernel path, so with it
    folding ``Transpose(constant)`` into an initializer changes the last bit of a MatMul; without
    it a kernel computes the same way whether its input is a constant or a computed value.
    """

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
            opts.add_session_config_entry("session.disable_prepacking", "1")
        self.model = model
        self._folder = None  # holds a >2 GiB model's files while the session lives
        source = model.SerializeToString() if not ir.is_large(model) else self._spill(model)
        try:
            self.session = ort.InferenceSession(source, opts, providers=providers or self.default_providers())
        except Exception as e:
            raise InvalidModelError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0]}") from None
        self.input_specs = {s.name: s for s in tensor_specs(model, "input")}

    def _spill(self, model: onnx.ModelProto) -> str:
        """Protobuf cannot serialize >2 GiB: write the model with external data, load the path."""
        import tempfile

        self._folder = tempfile.TemporaryDirectory(prefix="infoptc-ort-")
        path = Path(self._folder.name) / "model.onnx"
        ir.save_model(model, path, external_data=True)
        return str(path)

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
    """One-line errors for missing/unknown inputs, wrong dtypes, ranks or fixed dims, and a
    symbolic dim that takes different values in different inputs."""
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
    symbols: dict[str, tuple[int, str]] = {}  # symbolic dim -> (value, first input that had it)
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
                if isinstance(want, str) and want:
                    first = symbols.setdefault(want, (got, name))
                    if first[0] != got:
                        raise UsageError(f"dimension {want!r} is {first[0]} in input {first[1]!r} but {got} in input "
                                         f"{name!r}; inputs must agree on each symbolic dimension")


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
        if self.tolerance.atol == 0 and self.tolerance.rtol == 0:
            bound = "bit for bit" + (" (values equal, bits differ)" if not self.ok and self.max_abs == 0 else "")
        else:
            bound = f"atol {self.tolerance.atol:g}, rtol {self.tolerance.rtol:g}"
        return (f"output {self.name!r}: max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g} "
                f"({bound}); worst at {list(self.worst_index)}: expected {self.expected!r}, got {self.actual!r}")


def compare_outputs(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                    contract: Contract = Contract.EXACT,
                    tolerances: dict[str, Tolerance] | None = None) -> list[OutputDiff]:
    """Compare output by output, in the order of ``expected``.

    A zero tolerance (the ``exact`` contract, and every integer, bool or string output) means
    bit for bit: -0.0 differs from 0.0, and NaNs must sit at the same places (their payload is
    not compared). Otherwise an element passes when ``|actual - expected| <= atol + rtol *
    |expected|``; NaNs must still sit at the same places and infinities must match exactly.
    """
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


# Float types numpy does not call "f" (ml_dtypes' bfloat16 and float8 variants, as ORT returns them).
_EXTENDED_FLOATS = {"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                    "float8_e8m0fnu", "float4_e2m1fn"}


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind in "fc" or dtype.name in _EXTENDED_FLOATS


def _same_bits(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Elementwise: identical bit patterns, or both NaN."""
    a, b = np.ascontiguousarray(ref), np.ascontiguousarray(got)
    if a.dtype.kind == "c":  # compare the real and imaginary halves
        part = a.real.dtype
        a, b = a.view(part).reshape(a.shape + (2,)), b.view(part).reshape(b.shape + (2,))
    uint = np.dtype(f"u{a.dtype.itemsize}")
    same = (a.view(uint) == b.view(uint)) | (np.isnan(a) & np.isnan(b))
    return same.all(axis=-1) if ref.dtype.kind == "c" else same


def _diff(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> OutputDiff:
    if ref.size == 0:
        return OutputDiff(name, 0.0, 0.0, (), 0.0, 0.0, tol, True)
    if not _is_float(ref.dtype):
        bad = np.asarray(ref != got)
        if ref.dtype.kind in "iub":
            err = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        else:
            err = bad.astype(np.float64)
        idx = _index(np.argmax(np.where(bad, err + 1, 0)), ref.shape)
        rel = err / np.where(ref.astype(np.float64) != 0, np.abs(ref.astype(np.float64)), 1) if ref.dtype.kind in "iub" else err
        return OutputDiff(name, float(err.max()), float(rel.max()), idx, _item(ref[idx]), _item(got[idx]), tol,
                          not bad.any())
    wide = np.complex128 if ref.dtype.kind == "c" else np.float64
    r, g = ref.astype(wide), got.astype(wide)
    with np.errstate(invalid="ignore", over="ignore"):
        nan_r, nan_g = np.isnan(r), np.isnan(g)
        err = np.abs(r - g)
        err = np.where(nan_r & nan_g, 0.0, err)
        err = np.where(np.isinf(r) & (r == g), 0.0, err)
        err = np.where((nan_r != nan_g) | np.isnan(err), np.inf, err)
        magnitude = np.abs(np.where(nan_r, 0, r))
        rel = np.where(magnitude > 0, err / np.where(magnitude > 0, magnitude, 1), np.where(err > 0, np.inf, 0.0))
        if tol.atol == 0 and tol.rtol == 0:
            bad = ~_same_bits(ref, got)
            excess = np.where(bad, err + 1, -1.0)  # any bit difference counts, the largest first
        else:
            limit = tol.atol + tol.rtol * np.where(np.isinf(magnitude), 0, magnitude)
            bad = err > limit
            excess = np.where(bad, np.where(np.isinf(err), np.inf, err - limit), -1.0)
    idx = _index(np.argmax(excess), ref.shape)
    return OutputDiff(name, float(err.max()), float(rel.max()), idx, _item(ref[idx]), _item(got[idx]), tol,
                      not bad.any())


def _index(flat: int | np.integer, shape: tuple) -> tuple:
    return tuple(int(i) for i in np.unravel_index(int(flat), shape))


def _item(x) -> float:
    return x.item() if hasattr(x, "item") else x


# A lossy transform (int8) is judged by the signal-to-noise ratio of each float output against the
# reference: 20 log10(|ref| / |ref - out|). int8 networks measured here land at 15-45 dB on their
# calibration data; below this an output has lost most of its information.
LOSSY_MIN_SQNR_DB = 10.0


def sqnr_db(expected: np.ndarray, actual: np.ndarray) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    noise = float(np.sum((expected - np.asarray(actual, dtype=np.float64)) ** 2))
    signal = float(np.sum(expected**2))
    return float("inf") if noise == 0 else 10.0 * float(np.log10(max(signal, 1e-30) / noise))


def check_equivalent(reference: onnx.ModelProto, candidate: onnx.ModelProto, contract: Contract,
                     samples: int = 1, seed: int = 0, what: str = "candidate",
                     feeds: list[dict[str, np.ndarray]] | None = None) -> list[OutputDiff]:
    """Run both models on ``feeds`` (default: ``samples`` generated inputs); raise
    ``VerificationError`` on a mismatch.

    Both run with ONNX Runtime's own graph optimizations off and one thread, so an ``exact``
    contract can be checked bit for bit. A ``lossy`` contract is judged by each float output's
    SQNR (at least ``LOSSY_MIN_SQNR_DB``), best on real data: pass the calibration samples.
    """
    ref_runner = OrtRunner(reference, threads=1, optimize=False)
    cand_runner = OrtRunner(candidate, threads=1, optimize=False)
    diffs: list[OutputDiff] = []
    inputs = feeds if feeds is not None else [random_inputs(reference, seed=seed + i) for i in range(samples)]
    for i, feed in enumerate(inputs):
        expected, actual = ref_runner.run(feed), cand_runner.run(feed)
        if contract == Contract.LOSSY:
            for name, ref in expected.items():
                if np.asarray(ref).dtype.kind == "f" and name in actual:
                    db = sqnr_db(ref, actual[name])
                    if db < LOSSY_MIN_SQNR_DB:
                        raise VerificationError(f"{what} lost too much of output {name!r} (lossy contract, sample "
                                                f"{i}): SQNR {db:.1f} dB, below {LOSSY_MIN_SQNR_DB:g} dB")
            continue
        diffs = compare_outputs(expected, actual, contract)
        bad = [d for d in diffs if not d.ok]
        if bad:
            raise VerificationError(f"{what} differs from the original ({contract.value} contract, sample {i}): "
                                    + bad[0].describe())
    return diffs


def worst(diffs: Iterable[OutputDiff]) -> OutputDiff | None:
    return max(diffs, key=lambda d: d.max_abs, default=None)
