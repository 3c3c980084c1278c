"""Random graphs (``infoptc.testing.onnx_graphs``) through every -O level keep their outputs.

CI runs a fixed (derandomized) set of examples; ``pytest -m slow tests/test_random_graphs.py``
fuzzes with fresh random graphs, ``INFOPTC_FUZZ_EXAMPLES`` of them (default 2000).
"""

from __future__ import annotations

import os

import infoptc
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from infoptc import Contract, PassManager, register_pass, testing, verify
from infoptc.errors import CompileError
from infoptc.pass_manager import PASS_REGISTRY, get_pass
from infoptc.pipelines import pipeline_for_level
from infoptc.verify import random_inputs, run_onnx

LEVELS = ["1", "2", "3", "s"]
CI_EXAMPLES = 300
PER_PASS_EXAMPLES = 40
FUZZ_EXAMPLES = int(os.environ.get("INFOPTC_FUZZ_EXAMPLES", "2000"))
QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
         HealthCheck.function_scoped_fixture]


@pytest.fixture
def slow_only(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long fuzzing run: select it with -m slow")


def check_levels(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> None:
    """Compile at each -O level (once per distinct pipeline) and compare with the original."""
    done: set[str] = set()
    for level in LEVELS:
        pipeline = pipeline_for_level(level)
        if pipeline in done:
            continue
        done.add(pipeline)
        artifact = infoptc.compile(model, opt_level=level)
        try:
            testing.assert_equivalent(model, artifact, PassManager(pipeline).contract, inputs)
        except testing.EquivalenceError as e:
            raise testing.EquivalenceError(f"-O{level} ({pipeline}): {e}\nmodel:\n{onnx.printer.to_text(model.graph)}") from None


@settings(max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=QUIET)
@given(model=testing.onnx_graphs(symbolic=False), data=st.data())
def test_generated_graphs_are_valid(model, data):
    """Static graphs: the checker and strict shape inference agree with every declared shape,
    and ORT produces finite outputs of exactly those shapes."""
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    declared = {o.name: o.type.tensor_type for o in model.graph.output}
    for out in inferred.graph.output:
        assert out.type.tensor_type == declared[out.name]
    outputs = run_onnx(model, data.draw(testing.model_inputs(model)), threads=1, optimize=False)
    for out in model.graph.output:
        value = outputs[out.name]
        assert value.shape == tuple(d.dim_value for d in out.type.tensor_type.shape.dim)
        assert np.isfinite(value).all(), f"{out.name} is not finite: the generator must keep values defined"


@settings(max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=QUIET)
@given(model=testing.onnx_graphs(symbolic=True), data=st.data())
def test_symbolic_graphs_run_at_their_planned_dims(model, data):
    onnx.checker.check_model(model, full_check=True)
    dims = testing.planned_dims(model)
    declared = {d.dim_param for vi in model.graph.input for d in vi.type.tensor_type.shape.dim if d.dim_param}
    assert declared == set(dims)
    inputs = data.draw(testing.model_inputs(model))
    for vi in model.graph.input:
        want = [dims[d.dim_param] if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
        assert list(inputs[vi.name].shape) == want
    outputs = run_onnx(model, inputs, threads=1, optimize=False)
    assert all(np.isfinite(v).all() for v in outputs.values())


def test_generator_covers_its_vocabulary():
    """Every op kind of the generator appears within a modest number of graphs."""
    seen: set[str] = set()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=QUIET)
    @given(model=testing.onnx_graphs(max_ops=12))
    def collect(model):
        seen.update(n.op_type for n in model.graph.node)

    collect()
    wanted = {"MatMul", "Gemm", "Conv", "MaxPool", "AveragePool", "Reshape", "Transpose", "Concat", "Split", "Slice",
              "ReduceSum", "ReduceMean", "Softmax", "LayerNormalization", "Cast", "Identity", "Add", "Mul", "Div",
              "BatchNormalization", "ConstantOfShape", "Constant"}
    assert wanted <= seen, f"never generated: {sorted(wanted - seen)}"


def sqnr_shortfall_db(expected: dict, actual: dict) -> float:
    """How far the worst float output's SQNR falls below the lossy contract's floor
    (``verify.LOSSY_MIN_SQNR_DB``, what `infoptc verify` and --verify-each demand); <= 0 passes."""
    from infoptc.verify import LOSSY_MIN_SQNR_DB, sqnr_db

    worst = min((sqnr_db(e, actual[n]) for n, e in expected.items() if np.asarray(e).dtype.kind == "f"),
                default=float("inf"))
    return LOSSY_MIN_SQNR_DB - worst


def registered_passes() -> list[str]:
    get_pass("dce")  # loads the built-in passes
    return sorted(PASS_REGISTRY)


@pytest.mark.parametrize("name", registered_passes())
def test_each_pass_alone_keeps_outputs(name):
    """Every registered pass, run alone, keeps the outputs of random graphs within its contract
    (the pipelines may not run it yet)."""
    cls = PASS_REGISTRY[name]
    contract = cls.contract
    # passes that measure the host (the quantizers' speed check) must not decide by timing here
    # and calibrating ones take the whole observed range (minmax): calibrated on the very inputs
    # they are checked on, nothing clips, so the error is the rounding a contract can bound (mse,
    # the default, may clip a lone outlier of a sparse random tensor on purpose)
    # a float conversion keeps the model's fp32 interface (the inputs drawn are fp32), and the
    # accuracy-budget search aims at the floor it is judged by
    wanted = dict(o.split("=") for o in ("speed-check=false", "method=minmax", "keep-io-types=true",
                                          f"budget={verify.LOSSY_MIN_SQNR_DB}"))
    applies = lambda key, value: key in cls.options and value in (cls.options[key].choices or (value,))
    opts = [f"{k}={v}" for k, v in wanted.items() if applies(k, v)]
    text = name + ("{" + ",".join(opts) + "}" if opts else "")
    # lossy passes are judged as their contract says: every float output's SQNR above the floor
    judge = {"metric": sqnr_shortfall_db, "budget": 0.0} if contract == Contract.LOSSY else {}

    @settings(max_examples=PER_PASS_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=QUIET)
    @given(model=testing.onnx_graphs(max_ops=12), data=st.data())
    def check(model, data):
        inputs = data.draw(testing.model_inputs(model), label="inputs")
        # passes that calibrate get the inputs they are checked on (so no range saturates)
        try:
            artifact = infoptc.compile(model, passes=text, calibration=[inputs])
        except CompileError as e:
            if str(e).startswith(f"{name}: "):
                return  # the pass refused this graph, naming why (make-batch-dynamic's batch rules)
            raise
        testing.assert_equivalent(model, artifact, contract, inputs, **judge)

    check()


def _mul_as_div(graph, ctx):
    """rewrites x * c as x / (1 / c) and claims exactness"""
    import onnx_graphsurgeon as gs

    changed = 0
    for node in graph.nodes:
        if node.op == "Mul" and isinstance(node.inputs[1], gs.Constant):
            c = node.inputs[1]
            node.inputs[1] = gs.Constant(c.name + "_inv", (1 / c.values).astype(c.values.dtype))
            node.op = "Div"
            changed += 1
    return {"rewritten": changed}


def _sub_as_add(graph, ctx):
    """turns Sub into Add"""
    subs = [n for n in graph.nodes if n.op == "Sub"]
    for node in subs:
        node.op = "Add"
    return {"rewritten": len(subs)}


@pytest.fixture
def broken_pass(request):
    """Register one of the deliberately wrong passes above for one test, then remove it."""
    fn, contract = request.param
    name = "test-broken-" + fn.__name__.strip("_").replace("_", "-")
    register_pass(fn, name=name, contract=contract)
    yield name, contract
    PASS_REGISTRY.pop(name, None)


@pytest.mark.parametrize("broken_pass", [(_mul_as_div, Contract.EXACT), (_sub_as_add, Contract.REASSOCIATING)],
                         indirect=True, ids=["one-ulp-off-but-exact", "sub-as-add"])
def test_fuzzing_catches_a_wrong_pass(broken_pass):
    """The property cannot pass vacuously: a pass that is wrong (or only one ulp off while
    claiming exactness) is found within a few hundred graphs."""
    name, contract = broken_pass

    def survives(model) -> bool:
        artifact = infoptc.compile(model, passes=name)
        try:
            testing.assert_equivalent(model, artifact, contract,
                                      random_inputs(model, seed=0, dims=testing.planned_dims(model)))
        except testing.EquivalenceError:
            return False
        return True

    found = find(testing.onnx_graphs(ops=("binary", "unary", "matmul")), lambda m: not survives(m),
                 settings=settings(max_examples=500, deadline=None, derandomize=True, database=None,
                                   suppress_health_check=QUIET))
    assert any(n.op_type in ("Mul", "Sub") for n in found.graph.node)


@settings(max_examples=CI_EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=QUIET)
@given(model=testing.onnx_graphs(), data=st.data())
def test_levels_keep_outputs(model, data):
    check_levels(model, data.draw(testing.model_inputs(model), label="inputs"))


@pytest.mark.slow
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=QUIET)
@given(model=testing.onnx_graphs(max_ops=16, max_inputs=3), data=st.data())
def test_levels_keep_outputs_fuzz(slow_only, model, data):
    check_levels(model, data.draw(testing.model_inputs(model), label="inputs"))
