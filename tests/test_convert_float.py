"""convert-float: fp16/bf16 weights and compute, sensitive ops fp32, Casts only at region borders."""

from __future__ import annotations

import infoptc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from golden_models import BUILDERS, example_inputs
from infoptc.errors import MissingDependencyError
from infoptc.ir import infer_shapes, to_graph
from infoptc.pass_manager import PassContext
from infoptc.passes.quantize import convert_float
from infoptc.passes.quantize.convert_float import ConvertFloat, convert_model, output_errors
from infoptc.verify import sqnr_db
from onnx import TensorProto, helper, numpy_helper

F, H = TensorProto.FLOAT, TensorProto.FLOAT16
# fp16 keeps 11 significant bits: one rounding is at most 2^-11 (4.9e-4) relative. A few layers of
# rounded weights and activations, with sums in fp32 inside ORT's kernels, stay well within 4e-3 of
# the output's largest magnitude; an op wrongly left to overflow or to sum in fp16 does not.
FP16_MAX_REL = 4e-3
FP16_MIN_SQNR_DB = 50.0


def fp16(model, **options):
    return infoptc.compile(model, opt_level=2, quantize="fp16", quantize_options=options)


def run(model, feed):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in s.get_inputs()}
    feed = {k: v.astype(np.float16) if types[k] == "tensor(float16)" else v for k, v in feed.items()}
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))


def elem_types(model) -> dict[str, int]:
    """Tensor name -> ONNX element type (through ORT's contrib ops as well)."""
    graph = to_graph(infer_shapes(model))
    convert_float.fill_dtypes(graph)
    return {name: helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)) for name, t in graph.tensors().items()
            if t.dtype is not None}


def assert_casts_at_borders(model):
    """Every Cast changes the type, and no Cast reads another Cast (a pair would cancel or merge)."""
    types = elem_types(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "Cast":
            assert types[n.input[0]] != n.attribute[0].i, n.name
            assert n.input[0] not in producer or producer[n.input[0]].op_type != "Cast", n.name


@pytest.mark.parametrize("name", ["mlp", "bert", "resnet"])
@pytest.mark.parametrize("keep_io", [True, False])
def test_golden_models_within_fp16_tolerance(name, keep_io):
    model = BUILDERS[name]()
    art = fp16(model, **{"keep-io-types": keep_io})
    low = art.model
    assert sum(t.data_type == H for t in low.graph.initializer) > 0
    io = {v.type.tensor_type.elem_type for v in [*low.graph.input, *low.graph.output] if v.type.tensor_type.elem_type in (F, H)}
    assert io == ({F} if keep_io else {H})
    feed = example_inputs(name)
    ref, got = run(model, feed), run(low, feed)
    for k, r in ref.items():
        r = np.asarray(r, np.float64)
        err = np.abs(r - got[k].astype(np.float64)).max()
        assert err <= FP16_MAX_REL * np.abs(r).max(), (k, err)
        assert sqnr_db(r, got[k]) >= FP16_MIN_SQNR_DB
    assert_casts_at_borders(low)
    # the compile report carries the same measurement
    errors = art.reports["convert-float"]["outputs"]
    assert {e["output"] for e in errors} == set(ref) and all(e["max_rel"] <= FP16_MAX_REL for e in errors)
    assert any(m.key == "infoptc.quantization" for m in low.metadata_props)  # verify judges it by SQNR


def sensitive_model():
    """x -> MatMul -> Softmax -> Exp -> ReduceMean ...; a Reshape whose shape comes from float
    arithmetic on Shape; a Range."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    half = numpy_helper.from_array(np.array([2.0, 0.5], np.float32), "half")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("Softmax", ["m"], ["s"], axis=-1, name="softmax"),
        helper.make_node("Exp", ["m"], ["e"], name="exp"),
        helper.make_node("ReduceMean", ["e"], ["r"], axes=[-1], keepdims=1, name="mean"),
        helper.make_node("Mul", ["s", "r"], ["p"], name="mul"),
        helper.make_node("Shape", ["p"], ["shp"], name="shape"),
        helper.make_node("Cast", ["shp"], ["shf"], to=F, name="to_float"),
        helper.make_node("Mul", ["shf", "half"], ["shh"], name="shape_mul"),
        helper.make_node("Cast", ["shh"], ["shi"], to=TensorProto.INT64, name="to_int"),
        helper.make_node("Reshape", ["p", "shi"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [4, 8])],
                              [helper.make_tensor_value_info("y", F, None)], [w, half])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_sensitive_ops_and_shape_arithmetic_stay_fp32():
    model = sensitive_model()
    low = convert_model(model, "fp16", keep_io_types=True)
    types = elem_types(low)
    by_name = {n.name: n for n in low.graph.node}
    for name in ("softmax", "exp", "mean", "shape_mul"):
        assert types[by_name[name].input[0]] == F, name
    assert types[by_name["mm"].input[1]] == H and types[by_name["mm"].output[0]] == H
    assert_casts_at_borders(low)
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    (err,) = output_errors(model, low, [{"x": x}])
    assert err["max_rel"] <= FP16_MAX_REL


def test_cancelling_cast_pair_is_removed():
    """x -> Relu -> Cast(float) -> MatMul: Relu goes fp16 and the Cast(float) a Cast(fp16) would
    follow cancels: the MatMul reads the Relu's fp16 output directly."""
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Cast", ["r"], ["c"], to=F, name="cast"),
             helper.make_node("MatMul", ["c", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 4])],
                              [helper.make_tensor_value_info("y", F, [2, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    low = convert_model(model, "fp16")
    assert [n.op_type for n in low.graph.node] == ["Relu", "MatMul"]
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    assert np.allclose(run(low, {"x": x})["y"], np.maximum(x, 0), rtol=1e-3)


def test_int_to_float_cast_merges_into_one():
    table = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=F, name="cast"),
             helper.make_node("MatMul", ["f", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 4])],
                              [helper.make_tensor_value_info("y", F, [2, 3])], [table])
    low = convert_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), "fp16")
    casts = [n for n in low.graph.node if n.op_type == "Cast"]
    assert [c.attribute[0].i for c in casts] == [H] and casts[0].input[0] == "ids"


def test_fp16_model_is_not_converted_twice():
    once = convert_model(BUILDERS["mlp"](), "fp16", keep_io_types=True)
    art = infoptc.compile(once, opt_level=0, quantize="fp16")
    counters = {r.name: r.counters for r in art.pass_records}
    assert counters["convert-float"] == {"already_low": 1} and not art.pass_records[0].changed
    assert art.model.graph.SerializeToString() == infoptc.compile(once, opt_level=0).model.graph.SerializeToString()


def test_nodes_and_exclude_restrict_the_conversion():
    model = BUILDERS["mlp"]()
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    only = convert_model(model, "fp16", keep_io_types=True, nodes={matmuls[0]})
    types = elem_types(only)
    low_nodes = [n for n in only.graph.node if n.op_type != "Cast" and any(types.get(o) == H for o in n.output)]
    # the named MatMul goes low, the elementwise ops after it follow, up to the next (fp32) MatMul
    assert [n.name for n in low_nodes if n.op_type == "MatMul"] == [matmuls[0]]
    assert low_nodes[0].name == matmuls[0] and len(low_nodes) > 1
    casts = lambda m: sum(n.op_type == "Cast" for n in m.graph.node)  # noqa: E731
    assert casts(only) == casts(model) + 2  # into the region, out of it
    none = convert_model(model, "fp16", keep_io_types=True, exclude="MatMul;Add;Relu;Identity;Dropout;Cast")
    assert not any(t.data_type == H for t in none.graph.initializer)


def test_bf16_numerics_on_the_reference_evaluator():
    from onnx.reference import ReferenceEvaluator

    model = BUILDERS["mlp"]()
    low = convert_model(model, "bf16", keep_io_types=True)
    assert any(t.data_type == TensorProto.BFLOAT16 for t in low.graph.initializer)
    feed = example_inputs("mlp")
    (ref,), (got,) = ReferenceEvaluator(model).run(None, feed), ReferenceEvaluator(low).run(None, feed)
    # bf16 keeps 8 significant bits (2^-8 relative per rounding): ~40 dB for a few layers
    assert sqnr_db(ref, got.astype(np.float32)) >= 30.0


def test_bf16_raises_the_opset_to_22_where_conv_admits_bf16():
    low = convert_model(BUILDERS["resnet"](), "bf16", keep_io_types=True)
    assert next(o.version for o in low.opset_import if o.domain == "") == 22
    weights = {t.name: t.data_type for t in low.graph.initializer}
    convs = [n for n in low.graph.node if n.op_type == "Conv"]
    assert convs and all(weights[n.input[1]] == TensorProto.BFLOAT16 for n in convs)
    assert sum(n.op_type == "Cast" for n in low.graph.node) == 2  # the input and the output


def test_bf16_for_llvm_without_host_support_is_refused(monkeypatch):
    monkeypatch.setattr(convert_float, "cpu_flags", lambda: {"avx2", "fma"})
    graph = to_graph(infer_shapes(BUILDERS["mlp"]()))
    with pytest.raises(MissingDependencyError, match="bf16"):
        ConvertFloat(to="bf16").run(graph, PassContext(target="llvm"))
    assert convert_float.host_has_bf16({"avx512f", "avx512_bf16"})


@pytest.mark.parametrize("args, message", [
    (["--keep-io-types"], "needs --quantize fp16|bf16"),
    (["--quantize", "fp16", "--block-size", "64"], "needs --quantize int4"),
    (["--quantize", "fp16", "--per-tensor"], "does not apply to --quantize fp16"),
])
def test_bad_flags_exit_2(cli, golden, tmp_path, args, message):
    code, _, stderr = cli(golden("mlp"), *args, "-o", tmp_path / "out.onnx")
    assert code == 2 and message in stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("keep_io", [True, False])
def test_an_output_read_by_another_node(keep_io):
    """y is a graph output and Softmax (fp32) reads it too: one Cast keeps y's name and type."""
    w = numpy_helper.from_array(np.random.default_rng(5).standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("Softmax", ["y"], ["z"], axis=-1, name="softmax")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 8])],
                              [helper.make_tensor_value_info("y", F, [2, 8]), helper.make_tensor_value_info("z", F, [2, 8])],
                              [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    low = convert_model(model, "fp16", keep_io_types=keep_io)
    assert [o.type.tensor_type.elem_type for o in low.graph.output] == ([F, F] if keep_io else [H, H])
    assert_casts_at_borders(low)
    x = np.random.default_rng(6).standard_normal((2, 8)).astype(np.float32)
    for e in output_errors(model, low, [{"x": x}]):
        assert e["max_rel"] <= FP16_MAX_REL, e


def test_cli_reports_the_error_per_output(cli, golden, tmp_path):
    out = tmp_path / "m.fp16.onnx"
    code, stdout, _ = cli(golden("mlp"), "-O2", "--quantize", "fp16", "--keep-io-types", "-o", out)
    assert code == 0 and "error per output against fp32" in stdout
    code, stdout, _ = cli(golden("mlp"), "-O2", "--quantize", "fp16", "-o", out, "--json")
    import json

    (row,) = json.loads(stdout)["reports"]["convert-float"]["outputs"]
    assert row["output"] == "y" and 0 < row["max_rel"] <= FP16_MAX_REL
    assert onnx.load(out).graph.input[0].type.tensor_type.elem_type == H
