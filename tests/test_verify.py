"""The equivalence harness itself: output comparison, input generation, feed checks, and
``infoptc.testing.assert_equivalent``."""

from __future__ import annotations

import infoptc
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from infoptc import Contract, testing
from infoptc.errors import InvalidModelError, UsageError
from infoptc.targets import TensorSpec
from infoptc.verify import (
    InputConstraint,
    Tolerance,
    check_feeds,
    compare_outputs,
    index_bound,
    input_constraints,
    random_inputs,
    worst,
)
from onnx import TensorProto, helper, numpy_helper

F32 = np.float32
EXACT, REASSOC = Contract.EXACT, Contract.REASSOCIATING


def one(expected, actual, contract=EXACT, **kw):
    (diff,) = compare_outputs({"y": np.asarray(expected)}, {"y": np.asarray(actual)}, contract, **kw)
    return diff


def make_model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


# ----------------------------------------------------------------------------- compare_outputs


def test_exact_accepts_identical_and_rejects_one_ulp():
    x = np.linspace(-3, 3, 12, dtype=F32).reshape(3, 4)
    assert one(x, x.copy()).ok
    y = x.copy()
    y[2, 1] = np.nextafter(y[2, 1], np.inf)
    d = one(x, y)
    assert not d.ok
    assert d.worst_index == (2, 1)
    assert d.expected == x[2, 1].item() and d.actual == y[2, 1].item()
    assert "bit for bit" in d.describe()
    assert one(x, y, REASSOC).ok  # one ulp is well inside the reassociating tolerance


def test_exact_distinguishes_signed_zeros():
    d = one(np.array([1.0, -0.0], F32), np.array([1.0, 0.0], F32))
    assert not d.ok
    assert d.worst_index == (1,)
    assert "bits differ" in d.describe()
    assert one(np.array([-0.0], F32), np.array([0.0], F32), REASSOC).ok


def test_exact_ignores_nan_payloads_but_not_nan_placement():
    quiet = np.array([np.nan], F32)
    other = np.array([0x7FC00123], np.uint32).view(F32)
    assert np.isnan(other[0])
    assert one(quiet, other).ok
    d = one(np.array([1.0, np.nan], F32), np.array([np.nan, 1.0], F32))
    assert not d.ok and d.max_abs == np.inf


@pytest.mark.parametrize("contract", [EXACT, REASSOC])
def test_nan_must_sit_at_the_same_places(contract):
    ref = np.array([0.5, np.nan, 2.0], F32)
    assert one(ref, ref.copy(), contract).ok
    d = one(ref, np.array([0.5, 7.0, 2.0], F32), contract)
    assert not d.ok and d.worst_index == (1,) and d.max_abs == np.inf
    assert not one(np.array([0.5, 1.0], F32), np.array([np.nan, 1.0], F32), contract).ok


def test_infinities_must_match_exactly():
    ref = np.array([np.inf, -np.inf, 1.0], F32)
    assert one(ref, ref.copy(), REASSOC).ok
    assert not one(ref, np.array([-np.inf, -np.inf, 1.0], F32), REASSOC).ok
    d = one(ref, np.array([3e38, -np.inf, 1.0], F32), REASSOC)
    assert not d.ok and d.worst_index == (0,)


def test_reassociating_tolerance_is_atol_plus_rtol_times_magnitude():
    tol = Tolerance.for_contract(REASSOC, "float32")
    assert (tol.atol, tol.rtol) == (1e-5, 1e-4)
    assert one(np.array([0.0], F32), np.array([0.9e-5], F32), REASSOC).ok
    assert not one(np.array([0.0], F32), np.array([2e-5], F32), REASSOC).ok
    assert one(np.array([1000.0], F32), np.array([1000.05], F32), REASSOC).ok  # 1e-5 + 0.1
    assert not one(np.array([1000.0], F32), np.array([1000.2], F32), REASSOC).ok


def test_worst_element_is_the_one_furthest_beyond_tolerance():
    ref = np.array([[1000.0, 1.0], [0.0, 5.0]], F32)
    got = ref + np.array([[0.09, 0.0], [0.001, 0.0]], F32)  # abs err largest at [0,0] but inside rtol
    d = one(ref, got, REASSOC)
    assert not d.ok
    assert d.worst_index == (1, 0) and d.expected == 0.0
    assert d.max_abs == pytest.approx(0.09, rel=1e-3)
    assert "worst at [1, 0]" in d.describe() and "expected 0.0" in d.describe()


def test_float16_and_float64_have_their_own_tolerances():
    assert one(np.array([1.0], np.float16), np.array([1.0009765625], np.float16), REASSOC).ok
    assert not one(np.array([1.0], np.float64), np.array([1.0 + 1e-6]), REASSOC).ok
    assert Tolerance.for_contract(REASSOC, "bfloat16") == Tolerance(1e-2, 1e-2)


def test_integer_bool_and_string_outputs_are_always_exact():
    d = one(np.array([1, 2, 3], np.int64), np.array([1, 2, 4], np.int64), REASSOC)
    assert not d.ok and d.worst_index == (2,) and d.max_abs == 1
    assert Tolerance.for_contract(REASSOC, np.int64) == Tolerance(0, 0)
    assert not one(np.array([True, False]), np.array([True, True]), REASSOC).ok
    assert one(np.array(["a", "b"], object), np.array(["a", "b"], object)).ok
    d = one(np.array(["a", "b"], object), np.array(["a", "c"], object))
    assert not d.ok and d.worst_index == (1,)


def test_dtype_shape_and_missing_outputs_are_reported():
    assert "expected float32[2], got float64[2]" in one(np.zeros(2, F32), np.zeros(2)).describe()
    assert "expected float32[2], got float32[1, 2]" in one(np.zeros(2, F32), np.zeros((1, 2), F32)).describe()
    (d,) = compare_outputs({"y": np.zeros(2, F32)}, {}, REASSOC)
    assert not d.ok and "missing" in d.describe()


def test_empty_and_scalar_outputs():
    assert one(np.zeros((0, 3), F32), np.zeros((0, 3), F32)).ok
    d = one(np.array(2.0, F32), np.array(2.5, F32), REASSOC)
    assert not d.ok and d.worst_index == () and d.actual == 2.5


def test_explicit_tolerances_override_the_contract():
    tol = {"y": Tolerance(atol=0.1, rtol=0.0)}
    assert one(np.array([1.0], F32), np.array([1.05], F32), EXACT, tolerances=tol).ok
    assert not one(np.array([1.0], F32), np.array([1.2], F32), REASSOC, tolerances=tol).ok


def test_worst_picks_the_largest_error():
    diffs = compare_outputs({"a": np.zeros(2, F32), "b": np.zeros(2, F32)},
                            {"a": np.array([0, 1], F32), "b": np.array([0, 3], F32)})
    assert worst(diffs).name == "b"
    assert worst([]) is None


# ----------------------------------------------------------------------------- inputs


def gather_model(ids_type=TensorProto.INT64, through_cast=False, table_as_node=False, vocab=7):
    table = numpy_helper.from_array(np.arange(vocab * 3, dtype=F32).reshape(vocab, 3), "table")
    nodes, inits = [], [] if table_as_node else [table]
    if table_as_node:
        nodes.append(helper.make_node("Constant", [], ["table"], value=table))
    src = "ids"
    if through_cast:
        nodes.append(helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64))
        nodes.append(helper.make_node("Identity", ["ids64"], ["ids_same"]))
        src = "ids_same"
    nodes.append(helper.make_node("Gather", ["table", src], ["emb"], axis=0))
    nodes.append(helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"]))
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axis"))
    nodes.append(helper.make_node("Mul", ["emb", "mask3"], ["y"]))
    return make_model(nodes, [vi("ids", ids_type, ["n", "seq"]), vi("mask", TensorProto.INT64, ["n", "seq"])],
                      [vi("y", TensorProto.FLOAT, ["n", "seq", 3])], inits)


@pytest.mark.parametrize("variant", [{}, {"through_cast": True, "ids_type": TensorProto.INT32},
                                     {"table_as_node": True}])
def test_gather_indices_stay_inside_the_vocabulary(variant):
    model = gather_model(**variant)
    assert index_bound(model, "ids") == 7
    assert input_constraints(model) == {"ids": InputConstraint("index", 7), "mask": InputConstraint("mask")}
    feeds = random_inputs(model, seed=1, dims={"n": 16, "seq": 32})
    assert feeds["ids"].shape == (16, 32) and feeds["mask"].shape == (16, 32)
    assert feeds["ids"].min() == 0 and feeds["ids"].max() == 6  # the whole range, nothing past it
    assert set(np.unique(feeds["mask"])) == {0, 1}
    infoptc.verify.run_onnx(model, feeds)


def unary_model(op_chain, extra_inputs=()):
    nodes, src = [], "x"
    for i, op in enumerate(op_chain):
        out = f"t{i}"
        if op == "Reshape":
            nodes.append(helper.make_node("Reshape", [src, "shape"], [out]))
        elif op == "Pow":
            nodes.append(helper.make_node("Pow", [src, "e"], [out]))
        else:
            nodes.append(helper.make_node(op, [src], [out]))
        src = out
    nodes.append(helper.make_node("Identity", [src], ["y"]))
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "shape")]
    inputs = [vi("x", TensorProto.FLOAT, [4, 8])] + [vi(n, TensorProto.FLOAT, [1]) for n in extra_inputs]
    return make_model(nodes, inputs, [vi("y", TensorProto.FLOAT, None)], inits)


@pytest.mark.parametrize("chain", [["Log"], ["Reshape", "Sqrt"], ["Reciprocal"], ["Pow"]])
def test_inputs_feeding_log_like_ops_are_positive(chain):
    model = unary_model(chain, extra_inputs=["e"] if "Pow" in chain else ())
    assert input_constraints(model)["x"] == InputConstraint("positive")
    assert (random_inputs(model, seed=3)["x"] > 0).all()


def test_other_float_inputs_are_signed_and_seeded():
    model = unary_model(["Relu"])
    assert input_constraints(model)["x"] == InputConstraint("any")
    a, b = random_inputs(model, seed=5), random_inputs(model, seed=5)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert (a["x"] < 0).any() and (a["x"] > 0).any()
    assert not np.array_equal(a["x"], random_inputs(model, seed=6)["x"])
    # the exponent of Pow may be negative: only the base must be positive
    pow_model = unary_model(["Pow"], extra_inputs=["e"])
    assert input_constraints(pow_model)["e"] == InputConstraint("any")


def test_symbolic_dims_default_to_two_and_are_shared():
    feeds = random_inputs(gather_model(), seed=0)
    assert feeds["ids"].shape == feeds["mask"].shape == (2, 2)


def test_unsupported_inputs_are_typed_errors():
    strings = make_model([helper.make_node("Identity", ["s"], ["y"])], [vi("s", TensorProto.STRING, [2])],
                         [vi("y", TensorProto.STRING, [2])])
    with pytest.raises(InvalidModelError, match="dtype"):
        random_inputs(strings)
    unknown = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, None)],
                         [vi("y", TensorProto.FLOAT, None)])
    with pytest.raises(InvalidModelError, match="no shape"):
        random_inputs(unknown)


@settings(max_examples=30, deadline=None, database=None)
@given(data=testing.model_inputs(gather_model(through_cast=True, ids_type=TensorProto.INT32),
                                 dims={"n": 3}, max_dim=5))
def test_model_inputs_strategy_respects_every_constraint(data):
    assert data["ids"].dtype == np.int32 and data["mask"].dtype == np.int64
    assert data["ids"].shape == data["mask"].shape and data["ids"].shape[0] == 3
    assert 1 <= data["ids"].shape[1] <= 5
    assert data["ids"].min() >= 0 and data["ids"].max() < 7
    assert set(np.unique(data["mask"])) <= {0, 1}
    model = gather_model(through_cast=True, ids_type=TensorProto.INT32)
    check_feeds({s.name: s for s in testing.tensor_specs(model)}, data)


@settings(max_examples=30, deadline=None, database=None)
@given(data=testing.model_inputs(unary_model(["Sqrt"])))
def test_model_inputs_strategy_keeps_log_like_inputs_positive(data):
    assert data["x"].dtype == np.float32 and data["x"].shape == (4, 8)
    assert (data["x"] > 0).all()


# ----------------------------------------------------------------------------- check_feeds

SPECS = {"ids": TensorSpec("ids", "int64", ("batch", "seq")), "x": TensorSpec("x", "float32", ("batch", 4))}


def feeds(**over):
    base = {"ids": np.zeros((2, 3), np.int64), "x": np.zeros((2, 4), F32)}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_check_feeds_accepts_valid_feeds():
    check_feeds(SPECS, feeds())


@pytest.mark.parametrize("bad, message", [
    (feeds(x=None), "missing input(s) 'x'"),
    (feeds(extra=np.zeros(1)), "unknown input(s) 'extra'"),
    (feeds(x=np.zeros((2, 4))), "input 'x' has dtype float64, the model expects float32"),
    (feeds(x=np.zeros((2, 4, 1), F32)), "expects rank 2"),
    (feeds(x=np.zeros((2, 5), F32)), "input 'x' has shape [2, 5], the model expects ['batch', 4]"),
    (feeds(x=np.zeros((3, 4), F32)), "dimension 'batch' is 2 in input 'ids' but 3 in input 'x'"),
])
def test_check_feeds_errors(bad, message):
    with pytest.raises(UsageError) as err:
        check_feeds(SPECS, bad)
    assert message in str(err.value)


# ----------------------------------------------------------------------------- assert_equivalent


def linear_model(scale: float = 1.0, nextafter: bool = False) -> onnx.ModelProto:
    w = np.linspace(-1, 1, 12, dtype=F32).reshape(4, 3) * F32(scale)
    if nextafter:
        w[1, 2] = np.nextafter(w[1, 2], np.inf)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", TensorProto.FLOAT, ["n", 4])],
                      [vi("y", TensorProto.FLOAT, ["n", 3])], [numpy_helper.from_array(w, "w")])


def test_assert_equivalent_accepts_models_and_artifacts():
    model = linear_model()
    inputs = {"x": np.ones((2, 4), F32)}
    diffs = testing.assert_equivalent(model, linear_model(), EXACT, inputs)
    assert [d.ok for d in diffs] == [True]
    testing.assert_equivalent(model, infoptc.compile(model, opt_level=1), EXACT, inputs)
    testing.assert_equivalent(model, linear_model(), EXACT)  # inputs default to random_inputs


def test_assert_equivalent_reports_output_index_and_errors():
    inputs = {"x": np.arange(8, dtype=F32).reshape(2, 4)}
    with pytest.raises(testing.EquivalenceError) as err:
        testing.assert_equivalent(linear_model(), linear_model(scale=1.01), REASSOC, inputs)
    text = str(err.value)
    assert "reassociating contract" in text and "output 'y'" in text
    assert "worst at [1, " in text and "expected" in text and "max abs err" in text and "max rel err" in text
    assert isinstance(err.value, AssertionError) and isinstance(err.value, infoptc.VerificationError)


def test_one_ulp_in_a_weight_breaks_exact_not_reassociating():
    inputs = {"x": np.array([[0, 1, 0, 0], [0, 2, 0, 0]], F32)}  # y[:, 2] is w[1, 2] exactly (times 1, 2)
    with pytest.raises(testing.EquivalenceError, match="exact contract"):
        testing.assert_equivalent(linear_model(), linear_model(nextafter=True), EXACT, inputs)
    testing.assert_equivalent(linear_model(), linear_model(nextafter=True), REASSOC, inputs)


def test_lossy_needs_a_metric_and_respects_the_budget():
    inputs = {"x": np.eye(4, dtype=F32)}
    with pytest.raises(UsageError, match="metric"):
        testing.assert_equivalent(linear_model(), linear_model(scale=1.01), Contract.LOSSY, inputs)
    testing.assert_equivalent(linear_model(), linear_model(scale=1.01), Contract.LOSSY, inputs,
                              metric=testing.max_abs_error, budget=0.02)
    testing.assert_equivalent(linear_model(), linear_model(scale=1.01), Contract.LOSSY, inputs,
                              metric=testing.top1_disagreement, budget=0.0)
    with pytest.raises(testing.EquivalenceError, match="max_abs_error is 0.01.*over the budget 0.001"):
        testing.assert_equivalent(linear_model(), linear_model(scale=1.01), Contract.LOSSY, inputs,
                                  metric=testing.max_abs_error, budget=0.001)


class OtherRuntime:
    """An artifact of some other target: runs through its own ``run``."""

    target = "other"

    def __init__(self, noise: float):
        self.noise = noise

    def run(self, inputs):
        w = np.linspace(-1, 1, 12, dtype=F32).reshape(4, 3)
        return {"y": (inputs["x"] @ w + F32(self.noise)).astype(F32)}


def test_other_targets_are_held_to_reassociating_tolerances():
    inputs = {"x": np.ones((2, 4), F32)}
    testing.assert_equivalent(linear_model(), OtherRuntime(1e-7), EXACT, inputs)
    with pytest.raises(testing.EquivalenceError, match="reassociating contract"):
        testing.assert_equivalent(linear_model(), OtherRuntime(1e-3), EXACT, inputs)
    with pytest.raises(UsageError, match="cannot run"):
        testing.assert_equivalent(linear_model(), object(), EXACT, inputs)
