"""Property-test helpers: hypothesis strategies for model inputs and for random ONNX graphs, and
``assert_equivalent``, which holds a compiled model to the original under ONNX Runtime.

    from hypothesis import given, settings
    from infoptc import Contract, testing

    @settings(max_examples=10, deadline=None)
    @given(inputs=testing.model_inputs(model))
    def test_my_pass_keeps_outputs(inputs):
        testing.assert_equivalent(model, optimized, Contract.REASSOCIATING, inputs)

The tolerance comes from the contract and each output's dtype (``verify.Tolerance``); ``lossy``
transforms bring their own metric. Needs hypothesis (the ``test`` extra).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import InvalidModelError, MissingDependencyError, UsageError, VerificationError
from .pass_manager import Contract
from .verify import (
    InputConstraint,
    OrtRunner,
    OutputDiff,
    Tolerance,
    compare_outputs,
    input_constraints,
    tensor_specs,
)

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError:  # pragma: no cover - the test extra is not installed
    raise MissingDependencyError("infoptc.testing needs hypothesis (pip install 'infoptc[test]')") from None

__all__ = [
    "GRAPH_OPS",
    "Equivalence",
    "EquivalenceError",
    "assert_equivalent",
    "max_abs_error",
    "model_inputs",
    "onnx_graphs",
    "planned_dims",
    "tensor_values",
    "top1_disagreement",
]

# ----------------------------------------------------------------------------- inputs

# Tensors up to this many elements are drawn element by element, so hypothesis shrinks a failing
# input to readable values; larger ones are drawn from a seed (they shrink to seed 0).
SMALL_TENSOR = 64
# Floats drawn element by element stay within +-FLOAT_BOUND: large enough to reach every branch
# of the usual activations, small enough that fp32 error stays far below the tolerances.
FLOAT_BOUND = 8.0
POSITIVE_MIN = 0.1  # smallest value given to an input that feeds Log/Sqrt/Reciprocal/Pow

_ANY = InputConstraint("any")


def tensor_values(dtype: str | np.dtype, shape: tuple[int, ...], constraint: InputConstraint = _ANY,
                  bound: float = FLOAT_BOUND) -> st.SearchStrategy[np.ndarray]:
    """Arrays of ``dtype`` and ``shape`` that satisfy ``constraint`` (see ``verify.input_constraints``)."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise InvalidModelError(f"cannot generate inputs of dtype {dtype}") from None
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    if dtype.kind not in "iubf":
        raise InvalidModelError(f"cannot generate inputs of dtype {dtype.name}")
    if size <= SMALL_TENSOR:
        return hnp.arrays(dtype, shape, elements=_elements(dtype, constraint, bound), fill=st.nothing())
    return st.integers(0, 2**32 - 1).map(lambda seed: _sampled(dtype, shape, constraint, seed))


def _elements(dtype: np.dtype, constraint: InputConstraint, bound: float) -> st.SearchStrategy:
    if dtype.kind == "b":
        return st.booleans()
    if dtype.kind in "iu":
        high = constraint.high if constraint.kind == "index" else 2
        return st.integers(0, max(high, 1) - 1)
    exact = lambda v: float(dtype.type(v))
    low = exact(POSITIVE_MIN) if constraint.kind == "positive" else exact(-bound)
    return st.floats(low, exact(bound), width=dtype.itemsize * 8, allow_nan=False, allow_infinity=False,
                     allow_subnormal=False)


def _sampled(dtype: np.dtype, shape: tuple[int, ...], constraint: InputConstraint, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        high = constraint.high if constraint.kind == "index" else 2
        return rng.integers(0, max(high, 1), size=shape).astype(dtype)
    x = rng.standard_normal(shape)
    if constraint.kind == "positive":
        x = np.abs(x) + POSITIVE_MIN
    return x.astype(dtype)


def model_inputs(model: onnx.ModelProto, dims: Mapping[str, int | st.SearchStrategy[int]] | None = None,
                 max_dim: int = 4, min_dim: int = 1) -> st.SearchStrategy[dict[str, np.ndarray]]:
    """Valid feeds for every graph input of ``model``.

    Each symbolic dim gets one value shared by every input that names it: ``dims[name]`` (an int
    or a strategy) when given, else an integer in ``[min_dim, max_dim]``; unnamed unknown dims
    are drawn independently. Values keep the ops defined (``verify.input_constraints``): integer
    inputs used as Gather indices stay inside the table, other integers and bools are 0/1 masks,
    floats feeding Log/Sqrt/Reciprocal/Pow are positive. A graph from ``onnx_graphs`` gets the
    dims it was built for (``planned_dims``) unless ``dims`` says otherwise.
    """
    specs = tensor_specs(model, "input")
    constraints = input_constraints(model)
    dims = {**planned_dims(model), **(dims or {})}
    for spec in specs:
        if spec.shape is None:
            raise InvalidModelError(f"input {spec.name!r} has no shape; cannot generate values for it")
    symbols = sorted({d for s in specs for d in s.shape if isinstance(d, str) and d})

    @st.composite
    def feeds(draw) -> dict[str, np.ndarray]:
        bound = {}
        for sym in symbols:
            given = dims.get(sym)
            if isinstance(given, st.SearchStrategy):
                bound[sym] = draw(given)
            else:
                bound[sym] = int(given) if given is not None else draw(st.integers(min_dim, max_dim))
        out = {}
        for spec in specs:
            shape = tuple(d if isinstance(d, int) and d > 0 else bound[d] if isinstance(d, str) and d
                          else draw(st.integers(min_dim, max_dim)) for d in spec.shape)
            out[spec.name] = draw(tensor_values(spec.dtype, shape, constraints[spec.name]))
        return out

    return feeds()


# ----------------------------------------------------------------------------- equivalence


class EquivalenceError(VerificationError, AssertionError):
    """A candidate's outputs differ from the original's beyond what the contract allows."""


Metric = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], float]


def max_abs_error(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> float:
    """The largest absolute difference over all outputs (a metric for ``lossy`` checks)."""
    return max((float(np.max(np.abs(np.asarray(expected[k], np.float64) - np.asarray(actual[k], np.float64))))
                for k in expected if np.asarray(expected[k]).size), default=0.0)


def top1_disagreement(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> float:
    """Fraction of rows whose argmax over the last axis differs, over all outputs (classifiers)."""
    rows = disagree = 0
    for k, ref in expected.items():
        ref, got = np.asarray(ref), np.asarray(actual[k])
        a, b = ref.argmax(axis=-1), got.argmax(axis=-1)
        rows += a.size
        disagree += int((a != b).sum())
    return disagree / rows if rows else 0.0


_RUNNERS: OrderedDict[str, OrtRunner] = OrderedDict()
_RUNNER_CACHE_SIZE = 8


def _runner(model: onnx.ModelProto) -> OrtRunner:
    """A deterministic ORT session (no graph optimizations, one thread), cached by model content."""
    key = hashlib.sha1(model.SerializeToString(deterministic=True)).hexdigest()
    if key in _RUNNERS:
        _RUNNERS.move_to_end(key)
        return _RUNNERS[key]
    runner = OrtRunner(model, threads=1, optimize=False)
    _RUNNERS[key] = runner
    while len(_RUNNERS) > _RUNNER_CACHE_SIZE:
        _RUNNERS.popitem(last=False)
    return runner


@dataclass
class Equivalence:
    """Compare ``candidate`` with ``original`` on any inputs, under a numerical contract.

    ``original`` is an ``onnx.ModelProto``; ``candidate`` a ``ModelProto`` or an infoptc
    ``Artifact``. ONNX models run in ONNX Runtime with its graph optimizations off and one
    thread on both sides, so an ``exact`` contract can be checked bit for bit. An artifact of
    another target runs through its own ``run``; a different runtime cannot reproduce ORT's
    rounding, so such a candidate is held to at least the ``reassociating`` tolerances.

    ``tolerances`` overrides the per-output tolerance; ``metric(expected, actual) -> float`` and
    ``budget`` judge ``lossy`` candidates (the check fails when the metric exceeds the budget).
    Sessions are built once; use one ``Equivalence`` for many inputs.
    """

    original: onnx.ModelProto
    candidate: Any
    contract: Contract | str = Contract.EXACT
    tolerances: dict[str, Tolerance] | None = None
    metric: Metric | None = None
    budget: float | None = None
    _runners: tuple = field(init=False, repr=False)

    def __post_init__(self):
        self.contract = Contract(self.contract)
        if self.contract == Contract.LOSSY and self.tolerances is None and (self.metric is None or self.budget is None):
            raise UsageError("a lossy contract is judged by a task metric: pass metric= and budget= "
                             "(or explicit per-output tolerances=)")
        if (self.metric is None) != (self.budget is None):
            raise UsageError("metric= and budget= go together")
        model = _as_model(self.candidate)
        if model is None and not callable(getattr(self.candidate, "run", None)):
            raise UsageError(f"cannot run a candidate of type {type(self.candidate).__name__}; "
                             "give an onnx.ModelProto or an infoptc Artifact")
        if model is None and self.contract == Contract.EXACT:
            self.contract = Contract.REASSOCIATING
        self._runners = (_runner(self.original), _runner(model) if model is not None else None)

    def outputs(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(expected, actual) outputs for ``inputs``."""
        ref_runner, cand_runner = self._runners
        expected = ref_runner.run(inputs)
        actual = cand_runner.run(inputs) if cand_runner is not None else self.candidate.run(dict(inputs))
        return expected, actual

    def check(self, inputs: dict[str, np.ndarray]) -> list[OutputDiff]:
        """The per-output diffs; raises ``EquivalenceError`` describing every failing output."""
        expected, actual = self.outputs(inputs)
        diffs: list[OutputDiff] = []
        if self.contract != Contract.LOSSY or self.tolerances is not None:
            diffs = compare_outputs(expected, actual, self.contract, self.tolerances)
            bad = [d for d in diffs if not d.ok]
            if bad:
                lines = "\n  ".join(d.describe() for d in bad)
                raise EquivalenceError(f"the candidate differs from the original ({self.contract.value} contract) "
                                       f"on {len(bad)} of {len(diffs)} output(s):\n  {lines}")
        if self.metric is not None:
            score = float(self.metric(expected, actual))
            if not score <= self.budget:
                name = getattr(self.metric, "__name__", "metric")
                raise EquivalenceError(f"{name} is {score:.4g}, over the budget {self.budget:g} "
                                       f"({self.contract.value} contract)")
        return diffs


def _as_model(candidate: Any) -> onnx.ModelProto | None:
    if isinstance(candidate, onnx.ModelProto):
        return candidate
    model = getattr(candidate, "model", None)
    if isinstance(model, onnx.ModelProto) and getattr(candidate, "target", "onnx") == "onnx":
        return model
    return None


def assert_equivalent(original: onnx.ModelProto, candidate: Any, contract: Contract | str = Contract.EXACT,
                      inputs: dict[str, np.ndarray] | None = None, *, tolerances: dict[str, Tolerance] | None = None,
                      metric: Metric | None = None, budget: float | None = None) -> list[OutputDiff]:
    """Raise ``EquivalenceError`` (an ``AssertionError``) unless ``candidate`` reproduces the
    outputs of ``original`` on ``inputs`` within ``contract`` (see ``Equivalence``).

    The message names each failing output, its worst element (index, expected, actual) and the
    max abs/rel error; under hypothesis the falsifying inputs are printed after shrinking.
    ``inputs`` defaults to ``verify.random_inputs(original)``. Sessions are cached by model
    content, so calling this in a property test does not rebuild them per example.
    """
    if inputs is None:
        from .verify import random_inputs

        inputs = random_inputs(original)
    return Equivalence(original, candidate, contract, tolerances, metric, budget).check(inputs)


# ----------------------------------------------------------------------------- random graphs

OPSET = 17
MAX_ELEMENTS = 2048  # no value of a generated graph is larger (keeps a fuzz example fast)
INT64_MAX = 2**63 - 1

UNARY_OPS = ("Relu", "Sigmoid", "Tanh", "Abs", "Neg", "Identity", "Erf", "Softsign", "LeakyRelu", "Elu",
             "HardSigmoid", "Exp", "Sqrt", "Log", "Reciprocal")
BINARY_OPS = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow")


@dataclass
class _Value:
    name: str
    shape: tuple[int, ...]
    dtype: int = TensorProto.FLOAT
    const: bool = False  # computed from constants only: folding can replace it
    positive: bool = False  # every element >= ~0.1: safe for Log/Sqrt/Div/Pow
    bounded: bool = False  # every element within [-1, 1]: safe for Exp
    pristine: bool = False  # a graph input, only moved around (safe to round to fp16)


class _Builder:
    """Grows one graph, op by op, keeping every shape known (so every node is valid)."""

    def __init__(self, draw, seed: int):
        self.draw = draw
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[_Value] = []
        self.values: list[_Value] = []  # non-constant float32 values, newest last
        self.used: set[str] = set()
        self.emitted: list[tuple[onnx.NodeProto, list[_Value]]] = []
        self.counter = 0

    # -- names, nodes, constants

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter}"

    def node(self, op: str, inputs: list[str], outputs: list[_Value] | int = 1, **attrs) -> list[str]:
        names = [v.name for v in outputs] if isinstance(outputs, list) else [self.name(op.lower()) for _ in range(outputs)]
        node = helper.make_node(op, inputs, names, name=self.name(f"n_{op}"), **attrs)
        self.nodes.append(node)
        self.used.update(x for x in inputs if x)
        if isinstance(outputs, list):
            self.emitted.append((node, outputs))
        return names

    def add(self, value: _Value) -> _Value:
        if not value.const:
            self.values.append(value)
        return value

    def constant(self, array: np.ndarray, prefix: str = "c") -> str:
        """An initializer or a Constant node holding ``array``."""
        name = self.name(prefix)
        if self.draw(st.booleans()):
            self.initializers.append(numpy_helper.from_array(array, name))
        else:
            self.node("Constant", [], [_Value(name, array.shape, const=True)], value=numpy_helper.from_array(array, name))
        return name

    def ints(self, values) -> str:
        return self.constant(np.asarray(list(values), dtype=np.int64), "i")

    def array(self, shape: tuple[int, ...], positive: bool = False, scale: float = 1.0) -> np.ndarray:
        if positive:
            return self.rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def const_input(self, shape: tuple[int, ...], positive: bool = False, scale: float = 1.0) -> _Value:
        """A float32 constant of ``shape``; sometimes computed by a constant subgraph (work for folding)."""
        shape = tuple(shape)
        kind = self.draw(st.sampled_from(["plain", "binary", "transpose", "reshape", "cast", "sqrt", "fill"]))
        out = _Value(self.name("k"), shape, const=True, positive=positive)
        if kind == "binary":
            op = self.draw(st.sampled_from(["Add", "Mul"] if positive else ["Add", "Sub", "Mul"]))
            half = scale if op == "Mul" else scale / 2
            a = self.constant(self.array(shape, positive, half))
            b = self.constant(self.array(shape[len(shape) // 2:], positive, 1.0 if op == "Mul" else half))
            self.node(op, [a, b], [out])
        elif kind == "transpose" and len(shape) >= 2:
            perm = self.draw(st.permutations(range(len(shape))))
            inverse = tuple(int(i) for i in np.argsort(perm))
            src = self.constant(self.array(tuple(shape[i] for i in inverse), positive, scale))
            self.node("Transpose", [src], [out], perm=list(perm))
        elif kind == "reshape" and len(shape) >= 1:
            src = self.constant(self.array((math.prod(shape),), positive, scale))
            self.node("Reshape", [src, self.ints(shape)], [out])
        elif kind == "cast":
            src = self.constant(self.array(shape, positive, scale).astype(np.float64))
            self.node("Cast", [src], [out], to=TensorProto.FLOAT)
        elif kind == "sqrt" and positive:
            src = self.constant(self.array(shape, True) ** 2)
            self.node("Sqrt", [src], [out])
        elif kind == "fill" and math.prod(shape) > 1:
            fill = np.asarray([self.array((1,), positive, scale)[0]], dtype=np.float32)
            self.node("ConstantOfShape", [self.ints(shape)], [out], value=numpy_helper.from_array(fill, "value"))
        else:
            return _Value(self.constant(self.array(shape, positive, scale)), shape, const=True, positive=positive)
        return out

    # -- picking values

    def pick(self, accept: Callable[[_Value], bool] = lambda v: True) -> _Value | None:
        """A value satisfying ``accept``, the newest first as hypothesis shrinks."""
        pool = [v for v in reversed(self.values) if accept(v)]
        return self.draw(st.sampled_from(pool)) if pool else None

    def new_input(self, shape: tuple[int, ...]) -> _Value:
        value = _Value(self.name("x"), tuple(shape), pristine=True)
        self.inputs.append(value)
        return self.add(value)

    def make_positive(self, v: _Value) -> _Value:
        """``v`` itself when positive, else ``Abs(v) + c`` with a positive constant ``c``."""
        if v.positive:
            return v
        a = self.op("Abs", [v], v.shape)
        return self.op("Add", [a, self.const_input((), positive=True)], v.shape, positive=True)

    def make_bounded(self, v: _Value) -> _Value:
        return v if v.bounded else self.op("Tanh", [v], v.shape, bounded=True)

    def op(self, op: str, inputs: list[_Value | str], shape: tuple[int, ...], attrs: dict | None = None,
           const: bool | None = None, **flags) -> _Value:
        """Emit ``op`` with one output of ``shape``. The output is constant when every value input
        is (plain names are constant helper inputs: shapes, axes, exponents)."""
        names = [x if isinstance(x, str) else x.name for x in inputs]
        if const is None:
            values = [x for x in inputs if isinstance(x, _Value)]
            const = bool(values) and all(x.const for x in values)
        out = _Value(self.name(op.lower()), tuple(shape), const=const, **flags)
        self.node(op, names, [out], **(attrs or {}))
        return self.add(out)


def _fits(shape) -> bool:
    return 0 < math.prod(shape) <= MAX_ELEMENTS and all(d > 0 for d in shape)


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# Every generator below takes the builder and emits one op (or a small idiom); it returns False
# when the graph so far offers nothing it can apply to.


def _gen_unary(b: _Builder) -> bool:
    x = b.pick()
    op = b.draw(st.sampled_from(UNARY_OPS))
    attrs: dict[str, Any] = {}
    flags: dict[str, bool] = {}
    if op in ("Sqrt", "Log", "Reciprocal"):
        x = b.make_positive(x)
        flags["positive"] = op == "Sqrt"
    elif op == "Exp":
        x = b.make_bounded(x)
        flags["positive"] = True
    elif op in ("Sigmoid", "Tanh", "Erf", "Softsign", "HardSigmoid"):
        flags["bounded"] = True
    elif op in ("Relu", "Abs", "Neg", "Identity"):
        flags["pristine"] = x.pristine
        flags["positive"] = x.positive and op != "Neg"
        flags["bounded"] = x.bounded
    if op == "LeakyRelu":
        attrs["alpha"] = b.draw(st.sampled_from([0.01, 0.2]))
    elif op == "Elu":
        attrs["alpha"] = b.draw(st.sampled_from([1.0, 0.5]))
    elif op == "HardSigmoid":
        attrs.update(alpha=0.2, beta=0.5)
    b.op(op, [x], x.shape, attrs, **flags)
    return True


def _gen_binary(b: _Builder) -> bool:
    x = b.pick()
    op = b.draw(st.sampled_from(BINARY_OPS))
    source = b.draw(st.sampled_from(["const", "value", "input"]))
    other: _Value | None = None
    if source == "value":
        other = b.pick(lambda v: v is not x and (s := _broadcast(x.shape, v.shape)) is not None and _fits(s))
    if other is None:
        # a shape that broadcasts against x: a suffix of its shape, some dims set to 1
        k = b.draw(st.integers(0, len(x.shape)))
        tail = [d if b.draw(st.booleans()) else 1 for d in x.shape[len(x.shape) - k:]]
        shape = tuple(tail)
        if source == "input" and op not in ("Div", "Pow") and shape:
            other = b.new_input(shape)
        else:
            other = b.const_input(shape, positive=op in ("Div", "Pow"), scale=0.5)
    if op == "Div":
        other = b.make_positive(other)
    if op == "Pow":  # a constant exponent; a fractional one needs a positive base
        exponent = b.draw(st.sampled_from([2.0, 3.0, 0.5, -1.0]))
        base = x if exponent in (2.0, 3.0) else b.make_positive(x)
        if exponent == -1.0:
            base = b.make_positive(base)
        b.op("Pow", [base, b.constant(np.asarray(exponent, np.float32))], x.shape,
             positive=exponent == 0.5 and base.positive)
        return True
    pair = [x, other] if op == "Div" or b.draw(st.booleans()) else [other, x]
    shape = _broadcast(x.shape, other.shape)
    positive = op in ("Add", "Max") and x.positive and other.positive
    b.op(op, pair, shape, positive=positive)
    return True


def _gen_matmul(b: _Builder) -> bool:
    x = b.pick()
    k = x.shape[-1] if x.shape else None
    if not k:
        return False
    n = b.draw(st.integers(1, 6))
    out = x.shape[:-1] + (n,)
    if not _fits(out):
        return False
    other = None
    if len(x.shape) >= 2 and b.draw(st.booleans()):
        other = b.pick(lambda v: len(v.shape) >= 2 and v.shape[-2] == k and v is not x
                       and _broadcast(x.shape[:-2], v.shape[:-2]) is not None
                       and _fits(_broadcast(x.shape[:-2], v.shape[:-2]) + (x.shape[-2], v.shape[-1])))
    if other is not None:
        out = _broadcast(x.shape[:-2], other.shape[:-2]) + (x.shape[-2], other.shape[-1])
    else:
        other = b.const_input((k, n), scale=1 / math.sqrt(k))
    b.op("MatMul", [x, other], out)
    return True


def _gen_gemm(b: _Builder) -> bool:
    x = b.pick(lambda v: len(v.shape) == 2)
    if x is None:
        return False
    trans_a, trans_b = b.draw(st.booleans()), b.draw(st.booleans())
    m, k = (x.shape[1], x.shape[0]) if trans_a else x.shape
    n = b.draw(st.integers(1, 6))
    if not _fits((m, n)):
        return False
    w = b.const_input((n, k) if trans_b else (k, n), scale=1 / math.sqrt(k))
    inputs = [x, w]
    c_shape = b.draw(st.sampled_from([None, (n,), (1, n), (m, n), (m, 1), ()]))
    if c_shape is not None:
        inputs.append(b.const_input(c_shape, scale=0.5))
    attrs = {"transA": int(trans_a), "transB": int(trans_b),
             "alpha": b.draw(st.sampled_from([1.0, 0.5])), "beta": b.draw(st.sampled_from([1.0, 2.0]))}
    b.op("Gemm", inputs, (m, n), attrs)
    return True


def _spatial(b: _Builder, size: int, pool: bool) -> tuple[int, int, int, int, int]:
    """(kernel, stride, dilation, pad_begin, pad_end) valid for an axis of ``size``."""
    k = b.draw(st.integers(1, 3))
    s = b.draw(st.integers(1, 2))
    d = 1 if pool else b.draw(st.integers(1, 2))
    pb = b.draw(st.integers(0, k - 1))
    pe = b.draw(st.integers(0, k - 1))
    while (k - 1) * d + 1 > size + pb + pe:
        if d > 1:
            d = 1
        else:
            k -= 1
            pb, pe = min(pb, k - 1), min(pe, k - 1)
    return k, s, d, pb, pe


def _gen_conv(b: _Builder) -> bool:
    x = b.pick(lambda v: len(v.shape) in (3, 4))
    if x is None:
        return False
    c = x.shape[1]
    group = b.draw(st.sampled_from([1, c] + _divisors(c)))
    m = c if group == c and b.draw(st.booleans()) else group * b.draw(st.integers(1, 3))
    axes = [_spatial(b, size, pool=False) for size in x.shape[2:]]
    auto_pad = b.draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER"]))
    if auto_pad == "NOTSET":
        spatial = [(n + pb + pe - ((k - 1) * d + 1)) // s + 1 for n, (k, s, d, pb, pe) in zip(x.shape[2:], axes)]
    else:
        spatial = [-(-n // s) for n, (k, s, d, pb, pe) in zip(x.shape[2:], axes)]
    out = (x.shape[0], m, *spatial)
    if not _fits(out):
        return False
    kernel = [a[0] for a in axes]
    fan_in = c // group * math.prod(kernel)
    inputs = [x, b.const_input((m, c // group, *kernel), scale=1 / math.sqrt(fan_in))]
    if b.draw(st.booleans()):
        inputs.append(b.const_input((m,), scale=0.5))
    attrs: dict[str, Any] = {"kernel_shape": kernel, "strides": [a[1] for a in axes], "group": group}
    if auto_pad == "NOTSET":
        attrs["pads"] = [a[3] for a in axes] + [a[4] for a in axes]
        attrs["dilations"] = [a[2] for a in axes]
    else:
        attrs["auto_pad"] = auto_pad
    b.op("Conv", inputs, out, attrs)
    return True


def _gen_pool(b: _Builder) -> bool:
    x = b.pick(lambda v: len(v.shape) in (3, 4))
    if x is None:
        return False
    op = b.draw(st.sampled_from(["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"]))
    if op.startswith("Global"):
        b.op(op, [x], x.shape[:2] + (1,) * (len(x.shape) - 2), positive=x.positive and op == "GlobalMaxPool")
        return True
    axes = [_spatial(b, size, pool=True) for size in x.shape[2:]]
    spatial = [(n + pb + pe - k) // s + 1 for n, (k, s, d, pb, pe) in zip(x.shape[2:], axes)]
    attrs: dict[str, Any] = {"kernel_shape": [a[0] for a in axes], "strides": [a[1] for a in axes],
                             "pads": [a[3] for a in axes] + [a[4] for a in axes]}
    if op == "AveragePool":
        attrs["count_include_pad"] = int(b.draw(st.booleans()))
    b.op(op, [x], x.shape[:2] + tuple(spatial), attrs)
    return True


def _gen_batchnorm(b: _Builder) -> bool:
    x = b.pick(lambda v: len(v.shape) >= 2)
    if x is None:
        return False
    c = x.shape[1]
    params = [b.const_input((c,)), b.const_input((c,), scale=0.5), b.const_input((c,), scale=0.5),
              b.const_input((c,), positive=True)]
    b.op("BatchNormalization", [x, *params], x.shape, {"epsilon": 1e-5})
    return True


def _factor_shape(b: _Builder, size: int, rank: int) -> tuple[int, ...]:
    dims = [1] * rank
    n, p = size, 2
    while n > 1:  # hand each prime factor to a drawn dimension
        while n % p:
            p += 1
        dims[b.draw(st.integers(0, rank - 1))] *= p
        n //= p
    return tuple(dims)


def _gen_reshape(b: _Builder) -> bool:
    x = b.pick()
    target = _factor_shape(b, math.prod(x.shape), b.draw(st.integers(1, 4)))
    spelled = list(target)
    for i, d in enumerate(target):
        if i < len(x.shape) and x.shape[i] == d and b.draw(st.booleans()):
            spelled[i] = 0  # "copy this dim from the input"
    if b.draw(st.booleans()):
        spelled[b.draw(st.integers(0, len(target) - 1))] = -1
    if spelled.count(-1) == 1 and math.prod(target) == 0:
        return False
    how = b.draw(st.sampled_from(["const", "shape-of"]))
    if how == "shape-of" and len(x.shape) >= 1 and target[0] == x.shape[0]:
        # the leading dim read from Shape(x) at run time: a shape computation folding must see through
        shape = b.node("Shape", [x.name], 1)[0]
        head = b.node("Slice", [shape, b.ints([0]), b.ints([1])], 1)[0]
        rest = b.ints(spelled[1:]) if len(spelled) > 1 else None
        shape_in = b.node("Concat", [head, rest], 1, axis=0)[0] if rest else head
    else:
        shape_in = b.ints(spelled)
    b.op("Reshape", [x, shape_in], target, pristine=x.pristine, positive=x.positive, bounded=x.bounded)
    return True


def _same_flags(x: _Value) -> dict[str, bool]:
    return {"pristine": x.pristine, "positive": x.positive, "bounded": x.bounded}


def _gen_transpose(b: _Builder) -> bool:
    x = b.pick(lambda v: len(v.shape) >= 2)
    if x is None:
        return False
    if b.draw(st.booleans()):
        perm, attrs = list(range(len(x.shape)))[::-1], {}  # no perm: reverse the axes
    else:
        perm = list(b.draw(st.permutations(range(len(x.shape)))))
        attrs = {"perm": perm}
    b.op("Transpose", [x], tuple(x.shape[i] for i in perm), attrs, **_same_flags(x))
    return True


def _gen_shape_op(b: _Builder) -> bool:
    """Flatten, Unsqueeze or Squeeze."""
    x = b.pick()
    op = b.draw(st.sampled_from(["Flatten", "Unsqueeze", "Squeeze"]))
    r = len(x.shape)
    if op == "Flatten":
        if r == 0:
            return False
        axis = b.draw(st.integers(-r, r)) if r else 0
        a = axis + r if axis < 0 else axis
        b.op("Flatten", [x], (math.prod(x.shape[:a]), math.prod(x.shape[a:])), {"axis": axis}, **_same_flags(x))
    elif op == "Unsqueeze":
        if r >= 5:
            return False
        pos = b.draw(st.integers(-(r + 1), r))
        out = list(x.shape)
        out.insert(pos + r + 1 if pos < 0 else pos, 1)
        b.op("Unsqueeze", [x, b.ints([pos])], tuple(out), **_same_flags(x))
    else:
        ones = [i for i, d in enumerate(x.shape) if d == 1]
        if not ones:
            return False
        axes = b.draw(st.lists(st.sampled_from(ones), min_size=1, max_size=len(ones), unique=True))
        b.op("Squeeze", [x, b.ints(sorted(axes))], tuple(d for i, d in enumerate(x.shape) if i not in axes),
             **_same_flags(x))
    return True


def _gen_concat(b: _Builder) -> bool:
    x = b.pick(lambda v: len(v.shape) >= 1)
    if x is None:
        return False
    r = len(x.shape)
    axis = b.draw(st.integers(0, r - 1))
    parts = [x]
    for _ in range(b.draw(st.integers(1, 2))):
        other = None
        if b.draw(st.booleans()):
            other = b.pick(lambda v: len(v.shape) == r and all(v.shape[i] == x.shape[i] for i in range(r) if i != axis))
        if other is None:
            shape = list(x.shape)
            shape[axis] = b.draw(st.integers(1, 3))
            other = b.const_input(tuple(shape))
        parts.append(other)
    b.draw(st.randoms(use_true_random=False)).shuffle(parts)
    out = list(x.shape)
    out[axis] = sum(p.shape[axis] for p in parts)
    if not _fits(out):
        return False
    b.op("Concat", parts, tuple(out), {"axis": axis - r if b.draw(st.booleans()) else axis})
    return True


def _gen_split(b: _Builder) -> bool:
    x = b.pick(lambda v: any(d >= 2 for d in v.shape))
    if x is None:
        return False
    r = len(x.shape)
    axis = b.draw(st.sampled_from([i for i, d in enumerate(x.shape) if d >= 2]))
    n = x.shape[axis]
    parts = b.draw(st.integers(2, min(3, n)))
    inputs = [x.name]
    if n % parts == 0 and b.draw(st.booleans()):
        sizes = [n // parts] * parts  # equal split: no 'split' input
    else:
        cuts = sorted(b.draw(st.lists(st.integers(1, n - 1), min_size=parts - 1, max_size=parts - 1, unique=True)))
        sizes = [e - s for s, e in zip([0, *cuts], [*cuts, n])]
        inputs.append(b.ints(sizes))
    outs = []
    for size in sizes:
        shape = list(x.shape)
        shape[axis] = size
        outs.append(_Value(b.name("split"), tuple(shape), **_same_flags(x)))
    b.node("Split", inputs, outs, axis=axis - r if b.draw(st.booleans()) else axis)
    for v in outs:
        b.add(v)
    return True


def _gen_slice(b: _Builder) -> bool:
    x = b.pick(lambda v: len(v.shape) >= 1)
    if x is None:
        return False
    r = len(x.shape)
    axes = b.draw(st.lists(st.integers(0, r - 1), min_size=1, max_size=r, unique=True))
    starts, ends, steps, out = [], [], [], list(x.shape)
    for a in axes:
        n = x.shape[a]
        step = b.draw(st.sampled_from([1, 1, 2, -1]))
        edge = [INT64_MAX, -INT64_MAX] if step > 0 else [-INT64_MAX, INT64_MAX]
        start = b.draw(st.integers(-n, n - 1))
        end = b.draw(st.one_of(st.integers(-n - 1, n + 1), st.sampled_from(edge)))
        length = len(range(*slice(start, end, step).indices(n)))
        if length == 0:  # keep every value non-empty: take the whole axis instead
            start, end, length = (0, INT64_MAX, len(range(0, n, step))) if step > 0 else (-1, -INT64_MAX, len(range(n - 1, -1, step)))
        starts.append(start)
        ends.append(end)
        steps.append(step)
        out[a] = length
    spelled_axes = [a - r if b.draw(st.booleans()) else a for a in axes]
    inputs = [x, b.ints(starts), b.ints(ends), b.ints(spelled_axes)]
    if any(s != 1 for s in steps) or b.draw(st.booleans()):
        inputs.append(b.ints(steps))
    b.op("Slice", inputs, tuple(out), **_same_flags(x))
    return True


def _gen_reduce(b: _Builder) -> bool:
    x = b.pick(lambda v: len(v.shape) >= 1)
    if x is None:
        return False
    op = b.draw(st.sampled_from(["ReduceSum", "ReduceMean", "ReduceMax"]))
    r = len(x.shape)
    axes = b.draw(st.lists(st.integers(0, r - 1), min_size=1, max_size=r, unique=True))
    keep = b.draw(st.booleans())
    out = tuple((1 if i in axes else d) for i, d in enumerate(x.shape) if keep or i not in axes)
    all_axes = sorted(axes) == list(range(r)) and b.draw(st.booleans())  # may spell "all" as no axes
    if op == "ReduceSum":  # opset 13: axes is an input
        inputs = [x] if all_axes else [x, b.ints(axes)]
        b.op(op, inputs, out, {"keepdims": int(keep)})
    else:  # opset 17: ReduceMean/ReduceMax take an axes attribute
        attrs = {"keepdims": int(keep)} if all_axes else {"keepdims": int(keep), "axes": axes}
        b.op(op, [x], out, attrs, bounded=x.bounded and op != "ReduceSum", positive=x.positive)
    return True


def _gen_softmax(b: _Builder) -> bool:
    x = b.pick(lambda v: len(v.shape) >= 1)
    if x is None:
        return False
    r = len(x.shape)
    b.op("Softmax", [x], x.shape, {"axis": b.draw(st.integers(-r, r - 1))}, bounded=True)
    return True


def _gen_layernorm(b: _Builder) -> bool:
    x = b.pick(lambda v: len(v.shape) >= 1)
    if x is None:
        return False
    r = len(x.shape)
    axis = b.draw(st.integers(-r, r - 1))
    norm_shape = x.shape[axis:]
    inputs = [x, b.const_input(norm_shape)]
    if b.draw(st.booleans()):
        inputs.append(b.const_input(norm_shape, scale=0.5))
    b.op("LayerNormalization", inputs, x.shape, {"axis": axis, "epsilon": 1e-5})
    return True


def _gen_cast(b: _Builder) -> bool:
    """A round trip through another float type (fp16 only for input data: rounding a computed
    value to fp16 would turn a legitimate 1-ulp reassociation into a visible difference)."""
    x = b.pick()
    choices = [TensorProto.DOUBLE, TensorProto.FLOAT] + ([TensorProto.FLOAT16] if x.pristine else [])
    to = b.draw(st.sampled_from(choices))
    mid = b.node("Cast", [x.name], 1, to=to)[0]
    flags = _same_flags(x) if to != TensorProto.FLOAT16 else {}
    b.op("Cast", [mid], x.shape, {"to": TensorProto.FLOAT}, const=x.const, **flags)
    return True


def _gen_clip(b: _Builder) -> bool:
    x = b.pick()
    lo, hi = sorted(b.draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 6.0]), min_size=2, max_size=2)))
    inputs = [x]
    which = b.draw(st.sampled_from(["both", "min", "max"]))
    inputs.append(b.constant(np.asarray(lo, np.float32)) if which in ("both", "min") else "")
    if which in ("both", "max"):
        inputs.append(b.constant(np.asarray(hi, np.float32)))
    b.op("Clip", inputs, x.shape)
    return True


def _gen_dropout(b: _Builder) -> bool:
    x = b.pick()
    inputs = [x]
    if b.draw(st.booleans()):
        inputs.append(b.constant(np.asarray(0.5, np.float32)))
    b.op("Dropout", inputs, x.shape, **_same_flags(x))
    return True


def _gen_repeat(b: _Builder) -> bool:
    """Emit a copy of an existing node (same op, inputs and attributes): work for CSE."""
    live = {id(v) for v in b.values}  # only nodes whose outputs are still offered (not the -inf Pad)
    candidates = [(n, outs) for n, outs in b.emitted if n.op_type != "Constant" and all(id(o) in live for o in outs)]
    if not candidates:
        return False
    node, outs = b.draw(st.sampled_from(candidates))
    copies = [replace(o, name=b.name("dup")) for o in outs]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    b.node(node.op_type, list(node.input), copies, **attrs)
    for v in copies:
        b.add(v)
    return True


# ---- idioms: the decomposed forms exporters emit, which the fusion passes look for


def _scalar(b: _Builder, value: float) -> str:
    return b.constant(np.asarray(value, np.float32))


def _gen_layernorm_decomposed(b: _Builder) -> bool:
    """d = x - mean(x); d / Sqrt(mean(d^2) + eps) * gamma + beta, over the last axis."""
    x = b.pick(lambda v: len(v.shape) >= 1)
    if x is None:
        return False
    n = x.shape[-1]
    # Normalizing a (nearly) constant row amplifies the rounding of its mean by 1/sqrt(eps): two
    # correct evaluation orders then differ by ~300 ulps. An irregular ramp along the axis keeps
    # every row's variance far above eps (cancelling it would take an input equal to -ramp).
    ramp = (np.linspace(-1.0, 1.0, n) * 1.37 + 0.011).astype(np.float32)
    x = b.op("Add", [x, b.constant(ramp)], x.shape)
    mean = b.op("ReduceMean", [x], x.shape[:-1] + (1,), {"axes": [-1], "keepdims": 1})
    d = b.op("Sub", [x, mean], x.shape)
    sq = b.op("Pow", [d, _scalar(b, 2.0)], x.shape) if b.draw(st.booleans()) else b.op("Mul", [d, d], x.shape)
    var = b.op("ReduceMean", [sq], x.shape[:-1] + (1,), {"axes": [-1], "keepdims": 1})
    den = b.op("Sqrt", [b.op("Add", [var, _scalar(b, 1e-5)], var.shape)], var.shape)
    if b.draw(st.booleans()):
        y = b.op("Div", [d, den], x.shape)
    else:
        y = b.op("Mul", [d, b.op("Reciprocal", [den], den.shape)], x.shape)
    if b.draw(st.booleans()):
        y = b.op("Mul", [y, b.const_input((n,))], x.shape)
        if b.draw(st.booleans()):
            b.op("Add", [y, b.const_input((n,), scale=0.5)], x.shape)
    return True


def _gen_rmsnorm_decomposed(b: _Builder) -> bool:
    """x / Sqrt(mean(x^2) + eps) * w, often of a residual sum a + b."""
    x = b.pick(lambda v: len(v.shape) >= 1)
    if x is None:
        return False
    if b.draw(st.booleans()):
        other = b.pick(lambda v: v.shape == x.shape and v is not x) or b.const_input(x.shape)
        x = b.op("Add", [x, other], x.shape)
    sq = b.op("Pow", [x, _scalar(b, 2.0)], x.shape) if b.draw(st.booleans()) else b.op("Mul", [x, x], x.shape)
    ms = b.op("ReduceMean", [sq], x.shape[:-1] + (1,), {"axes": [-1], "keepdims": 1})
    den = b.op("Sqrt", [b.op("Add", [ms, _scalar(b, 1e-6)], ms.shape)], ms.shape)
    y = b.op("Div", [x, den], x.shape)
    b.op("Mul", [y, b.const_input((x.shape[-1],))], x.shape)
    return True


def _gen_gelu_decomposed(b: _Builder) -> bool:
    """x * 0.5 * (1 + Erf(x / sqrt 2)), or the tanh approximation, in an exporter's order."""
    x = b.pick()
    if b.draw(st.booleans()):
        scaled = (b.op("Div", [x, _scalar(b, math.sqrt(2.0))], x.shape) if b.draw(st.booleans())
                  else b.op("Mul", [x, _scalar(b, 1 / math.sqrt(2.0))], x.shape))
        inner = b.op("Erf", [scaled], x.shape)
    else:
        cube = b.op("Pow", [x, _scalar(b, 3.0)], x.shape) if b.draw(st.booleans()) else \
            b.op("Mul", [b.op("Mul", [x, x], x.shape), x], x.shape)
        poly = b.op("Add", [x, b.op("Mul", [cube, _scalar(b, 0.044715)], x.shape)], x.shape)
        inner = b.op("Tanh", [b.op("Mul", [poly, _scalar(b, math.sqrt(2 / math.pi))], x.shape)], x.shape)
    e = b.op("Add", [inner, _scalar(b, 1.0)], x.shape)
    order = b.draw(st.sampled_from(["(x*e)*h", "(x*h)*e", "x*(e*h)"]))
    if order == "(x*e)*h":
        b.op("Mul", [b.op("Mul", [x, e], x.shape), _scalar(b, 0.5)], x.shape)
    elif order == "(x*h)*e":
        b.op("Mul", [b.op("Mul", [x, _scalar(b, 0.5)], x.shape), e], x.shape)
    else:
        b.op("Mul", [x, b.op("Mul", [e, _scalar(b, 0.5)], x.shape)], x.shape)
    return True


def _gen_pad_then_window(b: _Builder) -> bool:
    """A constant Pad of the spatial dims, then Conv, AveragePool or MaxPool."""
    x = b.pick(lambda v: len(v.shape) in (3, 4))
    if x is None:
        return False
    r = len(x.shape)
    begin = [0, 0] + [b.draw(st.integers(0, 2)) for _ in range(r - 2)]
    end = [0, 0] + [b.draw(st.integers(0, 2)) for _ in range(r - 2)]
    consumer = b.draw(st.sampled_from(["conv", "avg", "max"]))
    fill = -np.inf if consumer == "max" and b.draw(st.booleans()) else 0.0
    if consumer == "max" and fill == 0.0:
        x = b.op("Relu", [x], x.shape)  # a zero pad of a Relu output is a -inf pad for MaxPool
    padded_shape = tuple(d + p + q for d, p, q in zip(x.shape, begin, end))
    if not _fits(padded_shape):
        return False
    padded = b.op("Pad", [x, b.ints(begin + end), _scalar(b, fill)], padded_shape, {"mode": "constant"})
    if fill != 0.0:
        b.values.remove(padded)  # -inf must reach nothing but the MaxPool
    # every window overlaps real data: a kernel wider than the padding on either side
    k = [max(b.draw(st.integers(1, min(3, d))), p + 1, q + 1)
         for d, p, q in zip(padded_shape[2:], begin[2:], end[2:])]
    if consumer == "conv":
        c, m = x.shape[1], b.draw(st.integers(1, 4))
        out = (x.shape[0], m, *[d - kk + 1 for d, kk in zip(padded_shape[2:], k)])
        w = b.const_input((m, c, *k), scale=1 / math.sqrt(c * math.prod(k)))
        b.op("Conv", [padded, w], out, {"kernel_shape": k})
    else:
        out = padded_shape[:2] + tuple(d - kk + 1 for d, kk in zip(padded_shape[2:], k))
        attrs: dict[str, Any] = {"kernel_shape": k}
        if consumer == "avg":
            attrs["count_include_pad"] = int(b.draw(st.booleans()))
        b.op("AveragePool" if consumer == "avg" else "MaxPool", [padded], out, attrs)
    return True


def _gen_transpose_sandwich(b: _Builder) -> bool:
    """Transpose, an elementwise op, Transpose: the pair cancels or merges."""
    x = b.pick(lambda v: len(v.shape) >= 2)
    if x is None:
        return False
    r = len(x.shape)
    p1 = list(b.draw(st.permutations(range(r))))
    t = b.op("Transpose", [x], tuple(x.shape[i] for i in p1), {"perm": p1})
    u = b.draw(st.sampled_from(["Relu", "Neg", "Tanh", "Mul", "Add", "none"]))
    if u in ("Mul", "Add"):
        t = b.op(u, [t, _scalar(b, 0.5)], t.shape)
    elif u != "none":
        t = b.op(u, [t], t.shape)
    p2 = [int(i) for i in np.argsort(p1)] if b.draw(st.booleans()) else list(b.draw(st.permutations(range(r))))
    b.op("Transpose", [t], tuple(t.shape[i] for i in p2), {"perm": p2})
    return True


def _gen_fused_activation(b: _Builder) -> bool:
    """Conv or Gemm followed by an activation (or Conv + Add + Relu)."""
    before = len(b.nodes)
    if not (_gen_conv(b) if b.draw(st.booleans()) else _gen_gemm(b)):
        return False
    y = b.values[-1]
    if b.nodes[-1].op_type == "Conv" and len(b.nodes) > before and b.draw(st.booleans()):
        z = b.pick(lambda v: v.shape == y.shape and v is not y) or b.const_input(y.shape, scale=0.5)
        b.op("Relu", [b.op("Add", [y, z], y.shape)], y.shape)
        return True
    act = b.draw(st.sampled_from(["Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip"]))
    if act == "Clip":
        b.op("Clip", [y, _scalar(b, 0.0), _scalar(b, 6.0)], y.shape)
    else:
        b.op(act, [y], y.shape, {"alpha": 0.1} if act == "LeakyRelu" else None)
    return True


def _gen_conv_bn(b: _Builder) -> bool:
    """Conv then BatchNormalization with constant statistics."""
    if not _gen_conv(b):
        return False
    y = b.values[-1]
    c = y.shape[1]
    params = [b.array((c,)), b.array((c,), scale=0.5), b.array((c,), scale=0.5), b.array((c,), positive=True)]
    b.op("BatchNormalization", [y, *[b.constant(p) for p in params]], y.shape, {"epsilon": 1e-5})
    return True


def _gen_matmul_bias(b: _Builder) -> bool:
    """MatMul by a constant weight, then Add of a constant bias."""
    x = b.pick(lambda v: len(v.shape) in (2, 3))
    if x is None:
        return False
    k, n = x.shape[-1], b.draw(st.integers(1, 6))
    out = x.shape[:-1] + (n,)
    if not _fits(out):
        return False
    y = b.op("MatMul", [x, b.constant(b.array((k, n), scale=1 / math.sqrt(k)))], out)
    bias = b.draw(st.sampled_from([(n,), (1, n), out, ()]))
    pair = [y, b.const_input(bias, scale=0.5)]
    b.op("Add", pair if b.draw(st.booleans()) else pair[::-1], out)
    return True


def _gen_attention(b: _Builder) -> bool:
    """The exported scaled-dot-product attention block over a [B, S, D] value."""
    x = b.pick(lambda v: len(v.shape) == 3)
    if x is None:
        return False
    batch, seq, dim = x.shape
    heads = b.draw(st.sampled_from(_divisors(dim)))
    head = dim // heads
    if not _fits((batch, heads, seq, seq)):
        return False

    def project():
        return b.op("MatMul", [x, b.const_input((dim, dim), scale=1 / math.sqrt(dim))], x.shape)

    def split(v, perm):
        r = b.op("Reshape", [v, b.ints([0, 0, heads, head] if b.draw(st.booleans()) else [batch, -1, heads, head])],
                 (batch, seq, heads, head))
        return b.op("Transpose", [r], tuple(r.shape[i] for i in perm), {"perm": perm})

    q, k, v = project(), project(), project()
    qh, kt, vh = split(q, [0, 2, 1, 3]), split(k, [0, 2, 3, 1]), split(v, [0, 2, 1, 3])
    scores = b.op("MatMul", [qh, kt], (batch, heads, seq, seq))
    how = b.draw(st.sampled_from(["div", "mul", "none"]))
    if how == "div":
        scores = b.op("Div", [scores, _scalar(b, math.sqrt(head))], scores.shape)
    elif how == "mul":
        scores = b.op("Mul", [scores, _scalar(b, 1 / math.sqrt(head))], scores.shape)
    if b.draw(st.booleans()):  # an additive mask: 0 or a large negative per key
        mask = np.where(b.rng.random((batch, 1, 1, seq)) < 0.25, -1e4, 0.0).astype(np.float32)
        scores = b.op("Add", [scores, b.constant(mask)], scores.shape)
    probs = b.op("Softmax", [scores], scores.shape, {"axis": -1}, bounded=True)
    ctx = b.op("MatMul", [probs, vh], (batch, heads, seq, head))
    merged = b.op("Transpose", [ctx], (batch, seq, heads, head), {"perm": [0, 2, 1, 3]})
    b.op("Reshape", [merged, b.ints([0, 0, dim] if b.draw(st.booleans()) else [batch, seq, -1])], x.shape)
    return True


GRAPH_OPS: dict[str, Callable[[_Builder], bool]] = {
    "unary": _gen_unary, "binary": _gen_binary, "matmul": _gen_matmul, "gemm": _gen_gemm, "conv": _gen_conv,
    "pool": _gen_pool, "batchnorm": _gen_batchnorm, "reshape": _gen_reshape, "transpose": _gen_transpose,
    "shape": _gen_shape_op, "concat": _gen_concat, "split": _gen_split, "slice": _gen_slice,
    "reduce": _gen_reduce, "softmax": _gen_softmax, "layernorm": _gen_layernorm, "cast": _gen_cast,
    "clip": _gen_clip, "dropout": _gen_dropout, "repeat": _gen_repeat,
    # idioms
    "layernorm-decomposed": _gen_layernorm_decomposed, "rmsnorm-decomposed": _gen_rmsnorm_decomposed,
    "gelu-decomposed": _gen_gelu_decomposed, "pad-window": _gen_pad_then_window,
    "transpose-sandwich": _gen_transpose_sandwich, "conv-gemm-activation": _gen_fused_activation,
    "attention": _gen_attention, "conv-bn": _gen_conv_bn, "matmul-bias": _gen_matmul_bias,
}


@st.composite
def onnx_graphs(draw, max_ops: int = 10, ops: tuple[str, ...] | None = None, max_inputs: int = 2,
                symbolic: bool | None = None) -> onnx.ModelProto:
    """Valid opset-17 float32 models that pass ``onnx.checker`` with full shape checking.

    Each graph has 1..``max_inputs`` inputs and 1..``max_ops`` ops drawn from ``GRAPH_OPS``
    (or the named subset ``ops``): elementwise ops with broadcasting, MatMul/Gemm, Conv,
    pooling, BatchNormalization, shape and data-movement ops, reductions, Softmax,
    LayerNormalization, Cast round trips, Clip, Dropout and repeated nodes (for CSE); weights
    and biases are often computed by constant subgraphs (for folding). Every intermediate shape
    is static and known. Values stay well conditioned: inputs of Log/Sqrt/Div/Pow are made
    positive, of Exp bounded, and fp16 rounding only touches input data, so a correct
    ``reassociating`` rewrite stays within its tolerance. Sinks become outputs at random;
    what is left is dead code.

    ``symbolic`` (drawn when ``None``) declares some input dims as symbols, so passes see only
    what shape inference derives; the graph is still built for one value of each symbol, which
    the model records (``planned_dims``) and ``model_inputs`` uses by default.
    """
    names = list(ops or GRAPH_OPS)
    unknown = [n for n in names if n not in GRAPH_OPS]
    if unknown:
        raise UsageError(f"unknown graph op kind(s) {unknown}; known: {', '.join(GRAPH_OPS)}")
    b = _Builder(draw, draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(1, max_inputs))):
        rank = draw(st.sampled_from([4, 2, 3, 1]))
        low = 3 if rank >= 3 else 1
        shape = tuple(draw(st.integers(1, 3)) if i == 0 and rank >= 3 else draw(st.integers(low if i >= 2 else 1, 6))
                      for i in range(rank))
        b.new_input(shape)
    for _ in range(draw(st.integers(1, max_ops))):
        GRAPH_OPS[draw(st.sampled_from(names))](b)
    return _finish(b, draw, draw(st.booleans()) if symbolic is None else symbolic)


PLANNED_DIMS_KEY = "infoptc.testing.dims"


def planned_dims(model: onnx.ModelProto) -> dict[str, int]:
    """The value each symbolic dim of a generated graph was built for (empty for other models)."""
    import json

    for prop in model.metadata_props:
        if prop.key == PLANNED_DIMS_KEY:
            return {k: int(v) for k, v in json.loads(prop.value).items()}
    return {}


def _finish(b: _Builder, draw, symbolic: bool) -> onnx.ModelProto:
    produced = [v for v in b.values if v not in b.inputs]
    if not produced:
        produced = [b.op("Identity", [b.inputs[0]], b.inputs[0].shape)]
    sinks = [v for v in produced if v.name not in b.used]
    outputs = [produced[-1]] + [v for v in sinks if v is not produced[-1] and draw(st.booleans())]
    extra = [v for v in produced if v not in outputs]
    if extra and draw(st.booleans()):
        outputs.append(draw(st.sampled_from(extra)))  # an intermediate that is also consumed
    dims: dict[str, int] = {}
    input_shapes = []
    for v in b.inputs:
        shape: list[int | str] = list(v.shape)
        for i, d in enumerate(shape):
            if symbolic and draw(st.booleans()):
                shape[i] = f"d{d}"  # one symbol per value: equal dims share it, as they truly are equal
                dims[shape[i]] = d
        input_shapes.append(shape)
    graph = helper.make_graph(
        b.nodes, "fuzz",
        [helper.make_tensor_value_info(v.name, v.dtype, shape) for v, shape in zip(b.inputs, input_shapes)],
        [helper.make_tensor_value_info(v.name, v.dtype, [None] * len(v.shape) if dims else v.shape)
         for v in outputs],
        b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8,
                              producer_name="infoptc.testing")
    if dims:
        import json

        helper.set_model_props(model, {PLANNED_DIMS_KEY: json.dumps(dims, sort_keys=True)})
    return model
