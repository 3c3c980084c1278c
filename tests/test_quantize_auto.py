"""quantize-auto and sensitivity analysis: int8 where an accuracy budget allows, measured per layer.

The model under test is a chain of three convolutions whose first one reads an input with one
outlier channel (values near 60 against values near 1) that its weights ignore: one 8-bit range
for that tensor crushes the channels that matter, so that layer, and only it, is sensitive. The tests check that the
analysis finds it, that the search gives exactly it back to fp32 when the budget asks for it,
that the budget holds on the written model measured independently, and the failure modes.
"""

from __future__ import annotations

import json

import infoptc
import numpy as np
import onnx
import pytest
from infoptc.calibration_data import CalibrationData, model_inputs
from infoptc.errors import UsageError, VerificationError
from infoptc.passes.quantize import metrics, sensitivity
from infoptc.verify import sqnr_db
from onnx import TensorProto, helper, numpy_helper

SENSITIVE = "conv1"


def chain_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i, (cin, cout) in enumerate([(4, 8), (8, 8), (8, 4)], 1):
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        if i == 1:
            w[:, 0] = 0.0  # conv1 ignores the input's outlier channel, whose range costs the others
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "y" if i == 3 else f"a{i}"
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}" if i < 3 else out], name=f"conv{i}",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        if i < 3:
            nodes.append(helper.make_node("Relu", [f"c{i}"], [out], name=f"relu{i}"))
        x = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(n=8, seed=1):
    rng = np.random.default_rng(seed)
    out = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(n)]
    for f in out:
        f["x"][:, 0] += 60.0
    return out


def run(model, feed):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def measured_sqnr(original, candidate, data):
    ref = np.concatenate([run(original, f).ravel() for f in data])
    got = np.concatenate([run(candidate, f).ravel() for f in data])
    return float(sqnr_db(ref, got))


def fp32_convs(model):
    """Conv nodes whose weight is still a float initializer (not read through a DequantizeLinear)."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sorted(n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] not in dq_outputs)


def auto(model, data, **options):
    options.setdefault("speed-check", False)
    return infoptc.compile(model, opt_level=2, quantize="auto", calibration=data, quantize_options=options)


@pytest.fixture(scope="module")
def scores():
    """sqnr of every-layer-int8, and of every layer but the sensitive one."""
    model, data = chain_model(), feeds()
    with sensitivity.range_cache() as cache:
        full = sensitivity.quantize_except(model, data, (), cache)
        without = sensitivity.quantize_except(model, data, {SENSITIVE}, cache)
    return measured_sqnr(model, full, data), measured_sqnr(model, without, data)


# ----------------------------------------------------------------------------- metrics


def test_metrics_score_identical_outputs_as_perfect_and_noise_as_less():
    rng = np.random.default_rng(0)
    ref = [{"y": rng.standard_normal((2, 10)).astype(np.float32)} for _ in range(3)]
    noisy = [{"y": r["y"] + 0.1 * rng.standard_normal(r["y"].shape).astype(np.float32)} for r in ref]
    assert metrics.sqnr(ref, ref) == np.inf and 10 < metrics.sqnr(noisy, ref) < 30
    assert metrics.cosine(ref, ref) == pytest.approx(1.0) and metrics.cosine(noisy, ref) < 1.0
    assert metrics.top1_agreement(ref, ref) == 1.0
    flipped = [{"y": -r["y"]} for r in ref]
    assert metrics.top1_agreement(flipped, ref) < 0.5 and metrics.cosine(flipped, ref) == pytest.approx(-1.0)
    labels = [r["y"].argmax(-1) for r in ref]
    assert metrics.accuracy(ref, labels) == 1.0 and metrics.accuracy(flipped, labels) < 0.5


def test_budget_semantics_floor_for_sqnr_drop_for_the_others():
    sqnr, cos = metrics.resolve_metric("sqnr"), metrics.resolve_metric("cosine")
    assert sqnr.meets(31.0, np.inf, 30.0) and not sqnr.meets(29.0, np.inf, 30.0)
    assert cos.meets(0.9995, 1.0, 1e-3) and not cos.meets(0.998, 1.0, 1e-3)
    custom = metrics.resolve_metric(lambda out, ref: -abs(out[0]["y"] - ref[0]["y"]).max())
    ref = [{"y": np.ones(3, np.float32)}]
    assert custom.reference_score(ref, None) == 0.0


def test_unknown_metric_is_a_usage_error_listing_the_known_ones():
    with pytest.raises(UsageError, match="sqnr, cosine, top1-agreement, accuracy"):
        metrics.resolve_metric("f1")


def test_labels_in_the_calibration_npz_are_read_and_never_fed(tmp_path):
    model = chain_model()
    path = tmp_path / "cal.npz"
    x = np.stack([f["x"] for f in feeds(5)])
    np.savez(path, x=x, labels=np.arange(5))
    data = CalibrationData(path, model_inputs(model), limit=3)
    assert [list(f) for f in data] == [["x"]] * 3
    assert [int(lab[0]) for lab in data.labels()] == [0, 1, 2]
    assert CalibrationData(feeds(2), model_inputs(model)).labels() is None


# ----------------------------------------------------------------------------- sensitivity


def test_sensitivity_ranks_the_layer_that_reads_the_outlier_channel_worst():
    result = sensitivity.analyze(chain_model(), feeds(), "sqnr")
    assert [r["layer"] for r in result.rows][0] == SENSITIVE
    assert sorted(r["layer"] for r in result.rows) == ["conv1", "conv2", "conv3"]
    worst = result.rows[0]
    # giving the sensitive layer back recovers more than giving back any other
    assert worst["left_out"] == max(r["left_out"] for r in result.rows) > result.all_int8_score


def test_quantize_except_leaves_exactly_the_named_layers_fp32():
    model, data = chain_model(), feeds(4)
    with sensitivity.range_cache() as cache:
        assert fp32_convs(sensitivity.quantize_except(model, data, {"conv1", "conv3"}, cache)) == ["conv1", "conv3"]
        assert fp32_convs(sensitivity.quantize_except(model, data, (), cache)) == []


# ----------------------------------------------------------------------------- quantize-auto


def test_a_loose_budget_keeps_every_layer_int8(scores):
    full, _ = scores
    artifact = auto(chain_model(), feeds(), budget=full - 1)
    report = artifact.reports["quantize-auto"]
    assert report["chosen"]["fp32_layers"] == [] and len(report["trials"]) == 1
    assert fp32_convs(artifact.model) == []


def test_a_tight_budget_gives_exactly_the_sensitive_layer_back_and_holds_on_the_written_model(scores):
    full, without = scores
    assert without > full + 3, "the fixture's outlier channel no longer makes conv1 sensitive"
    budget = (full + without) / 2
    model, data = chain_model(), feeds()
    artifact = auto(model, data, budget=budget)
    assert artifact.reports["quantize-auto"]["chosen"]["fp32_layers"] == [SENSITIVE]
    assert fp32_convs(artifact.model) == [SENSITIVE]
    assert measured_sqnr(model, artifact.model, data) >= budget
    # and the final model carries the int8 quantizer's metadata and per-tensor report
    assert "infoptc.quantization" in {p.key for p in artifact.model.metadata_props}
    assert artifact.reports["quantize-int8"]["tensors"]


def test_the_same_model_data_and_budget_give_the_same_bytes(scores):
    full, without = scores
    a = auto(chain_model(), feeds(), budget=(full + without) / 2).model
    b = auto(chain_model(), feeds(), budget=(full + without) / 2).model
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_an_unreachable_budget_fails_naming_the_best_found_unless_forced():
    with pytest.raises(VerificationError, match=r"no int8 assignment meets sqnr >= 200.*best of \d+ tried"):
        auto(chain_model(), feeds(), budget=200.0)
    artifact = auto(chain_model(), feeds(), budget=200.0, force=True)
    trials = artifact.reports["quantize-auto"]["trials"]
    assert artifact.reports["quantize-auto"]["chosen"]["score"] == max(t["score"] for t in trials)


def test_accuracy_and_python_callable_metrics():
    model, data = chain_model(), feeds()
    labels = [run(model, f).reshape(-1, 8).argmax(-1) for f in data]  # fp32's own predictions, per row
    artifact = auto(model, [dict(f, labels=lab) for f, lab in zip(data, labels)], metric="accuracy", budget=0.02)
    report = artifact.reports["quantize-auto"]
    assert report["metric"] == "accuracy" and report["fp32_score"] == 1.0
    got = np.mean(np.concatenate([run(artifact.model, f).reshape(-1, 8).argmax(-1) == lab for f, lab in zip(data, labels)]))
    assert got == pytest.approx(report["chosen"]["score"], abs=1e-6) and got >= 0.98

    def worst_abs_error(outputs, reference):
        return -max(float(np.abs(o["y"] - r["y"]).max()) for o, r in zip(outputs, reference))

    artifact = auto(model, data, metric=worst_abs_error, budget=1.0)
    assert artifact.reports["quantize-auto"]["metric"] == "worst_abs_error"
    got = max(float(np.abs(run(model, f) - run(artifact.model, f)).max()) for f in data)
    assert got <= 1.0


def test_accuracy_without_labels_is_a_usage_error():
    with pytest.raises(UsageError, match="needs the labels"):
        auto(chain_model(), feeds(), metric="accuracy")


# ----------------------------------------------------------------------------- command line


@pytest.fixture()
def files(tmp_path):
    onnx.save(chain_model(), tmp_path / "chain.onnx")
    np.savez(tmp_path / "cal.npz", x=np.stack([f["x"] for f in feeds()]))
    return tmp_path


def test_sensitivity_command_json(files, cli):
    code, out, _ = cli("sensitivity", str(files / "chain.onnx"), "--calibration", str(files / "cal.npz"), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["layers"][0]["layer"] == SENSITIVE and report["metric"] == "sqnr"


def test_compile_auto_exit_3_writes_nothing_and_force_writes(files, cli):
    out_path = files / "out.onnx"
    base = [str(files / "chain.onnx"), "--quantize", "auto", "--calibration", str(files / "cal.npz"),
            "--accuracy-budget", "200", "--no-speed-check", "-o", str(out_path)]
    code, _, err = cli(*base)
    assert code == 3 and "no int8 assignment meets" in err and not out_path.exists()
    code, _, _ = cli(*base, "--force")
    assert code == 0 and out_path.exists()


def test_auto_flags_need_quantize_auto(files, cli):
    code, _, err = cli(str(files / "chain.onnx"), "--quantize", "int8", "--calibration", str(files / "cal.npz"),
                       "--metric", "cosine")
    assert code == 2 and "--metric applies to --quantize auto only" in err


def test_embedding_tables_are_layers_the_search_can_give_back(golden):
    from infoptc.driver import prepare_for_quantization

    model = prepare_for_quantization(golden("bert"))
    gathers = [n for n in sensitivity.layers(model) if n.endswith("Gather")]
    assert gathers and not [n for n in sensitivity.layers(model, embeddings=False) if n.endswith("Gather")]
    ids = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    rng = np.random.default_rng(0)
    data = [{i.name: rng.integers(1, 50, size=[d.dim_value or 8 for d in i.type.tensor_type.shape.dim]).astype(np.int64)
             for i in ids}]
    with sensitivity.range_cache() as cache:
        kept = sensitivity.quantize_except(model, data, set(gathers), cache)
        stored = sensitivity.quantize_except(model, data, (), cache)
    def int8_tables(m):
        s8 = {t.name for t in m.graph.initializer if t.data_type == TensorProto.INT8}
        return sum(1 for n in m.graph.node if n.op_type == "Gather" and n.input[0] in s8)

    assert int8_tables(kept) == 0 < int8_tables(stored)


def test_int8_elementwise_ops_are_one_layer_the_search_can_give_back():
    """Conv -> SiLU (Sigmoid, Mul) -> Conv: the int8 Mul/Sigmoid are the layer ELEMENTWISE."""
    rng = np.random.default_rng(0)
    w = lambda name, cout, cin: numpy_helper.from_array((rng.standard_normal((cout, cin, 1, 1)) * 0.5).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Sigmoid", ["c1"], ["s"], name="sigmoid"),
             helper.make_node("Mul", ["c1", "s"], ["m"], name="mul"),
             helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [w("w1", 4, 4), w("w2", 4, 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert sensitivity.layers(model) == ["conv1", "conv2", sensitivity.ELEMENTWISE]
    data = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)]

    def reads_dq(m, op):
        dq = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return all(i in dq for n in m.graph.node if n.op_type == op for i in n.input)

    with sensitivity.range_cache() as cache:
        assert reads_dq(sensitivity.quantize_except(model, data, (), cache), "Mul")
        kept = sensitivity.quantize_except(model, data, {sensitivity.ELEMENTWISE}, cache)
    assert not reads_dq(kept, "Mul") and fp32_convs(kept) == []
