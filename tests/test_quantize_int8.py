"""quantize-int8: calibrated static int8 in the QDQ form ONNX Runtime fuses.

What must hold: every op the pass quantizes runs as an int8 kernel in ONNX Runtime (not fp32
between conversions); the error of one quantized Conv stays within the bound its scales allow;
a trained model keeps its accuracy; output is deterministic; bad calibration data is refused
naming the input; a quantized model is not quantized again unless asked.
"""

from __future__ import annotations

import json
import logging

import infoptc
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from infoptc.errors import UsageError
from infoptc.passes.quantize.calibration import CalibrationData, model_inputs
from infoptc.passes.quantize.fusion_check import fusion_report
from infoptc.passes.quantize.observers import Observer, quant_params
from infoptc.passes.quantize.recipe import cpu_flags, host_isa, recipe_for
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def feeds(shape, n, seed=0, name="input", scale=1.0):
    rng = np.random.default_rng(seed)
    return [{name: (rng.standard_normal(shape) * scale).astype(np.float32)} for _ in range(n)]


def run(model, feed):
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)


def conv_model(cin, cout, k, stride, relu, seed=0, hw=8):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if relu else "y"], name="conv",
                              kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, cin, hw, hw])],
                              [helper.make_tensor_value_info("y", F, [1, cout, (hw - 1) // stride + 1] * 1
                                                             + [(hw - 1) // stride + 1])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def quantize(model, cal, **options):
    """The mechanics without the host timing (the speed check has its own tests below)."""
    options.setdefault("speed-check", False)
    return infoptc.compile(model, opt_level=2, quantize="int8", calibration=cal, quantize_options=options)


# ----------------------------------------------------------------------------- ORT runs it as int8


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_every_quantized_op_runs_as_an_int8_kernel(golden, name):
    art = quantize(golden(name), feeds((1, 3, 224, 224), 4))
    report = fusion_report(art.model)
    assert report["intended"] >= 20
    assert report["left_fp32"] == []
    # one QuantizeLinear at the input and nothing after: the classifier's QGemm writes fp32 itself
    assert report["conversions"] == 1
    assert report["kernels"]["QLinearConv"] == sum(n.op_type == "Conv" for n in onnx.load(golden(name)).graph.node)


def test_relu_is_folded_into_the_output_range():
    art = quantize(conv_model(8, 16, 3, 1, relu=True), feeds((1, 8, 8, 8), 4, name="x"))
    ops = [n.op_type for n in art.model.graph.node]
    assert "Relu" not in ops
    (y,) = run(art.model, feeds((1, 8, 8, 8), 1, seed=5, name="x")[0])
    assert y.min() >= 0.0


@settings(max_examples=25, deadline=None)
@given(cin=st.sampled_from([1, 3, 8, 16]), cout=st.sampled_from([4, 8, 24]), k=st.sampled_from([1, 3, 5]),
       stride=st.sampled_from([1, 2]), relu=st.booleans(), seed=st.integers(0, 10_000))
def test_one_conv_stays_within_its_quantization_error_bound(cin, cout, k, stride, relu, seed):
    """|y_int8 - y| <= sum|w| * s_x/2 + sum|x| * s_w/2 + s_y/2 (+ the bias rounding), per output,
    on a calibration sample (so nothing saturates): the error a quantized Conv may make, no more."""
    model = conv_model(cin, cout, k, stride, relu, seed)
    cal = feeds((1, cin, 8, 8), 6, seed=seed, name="x")
    art = quantize(model, cal, **{"report-samples": 0})
    x = cal[seed % 6]["x"]
    (ref,) = run(model, {"x": x})
    (out,) = run(art.model, {"x": x})
    inits = {t.name: numpy_helper.to_array(t) for t in art.model.graph.initializer}
    s_x = float(next(v for k_, v in inits.items() if k_.startswith("x_scale")))
    s_y = float(next(v for k_, v in inits.items() if k_.startswith("y_scale")))
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w")).astype(np.float64)
    s_w = np.abs(w).reshape(cout, -1).max(axis=1) / 127
    w_abs = np.abs(w).reshape(cout, -1).sum(axis=1)
    x_bound = np.abs(x).max() + s_x
    taps = cin * k * k
    bound = w_abs * s_x / 2 + taps * x_bound * s_w / 2 + s_y / 2 + s_x * s_w / 2 + 1e-5
    err = np.abs(out.astype(np.float64) - ref).max(axis=(0, 2, 3))
    assert (err <= bound).all(), (err, bound)


def test_a_trained_model_keeps_its_accuracy(golden):
    from golden_models import digits_cnn

    data = digits_cnn.build_dataset()
    x, y = data["x"], data["y"]
    half = len(x) // 2  # calibrate on one half of the held-out split, evaluate on the other
    cal = [{"input": x[i : i + 1]} for i in range(0, half, 4)]
    art = quantize(golden("digits_cnn"), cal)
    (ref,) = run(golden("digits_cnn"), {"input": x[half:]})
    (out,) = run(art.model, {"input": x[half:]})
    fp32_acc = float(np.mean(ref.argmax(1) == y[half:]))
    int8_acc = float(np.mean(out.argmax(1) == y[half:]))
    assert fp32_acc > 0.9
    assert int8_acc >= fp32_acc - 0.005


def test_output_is_deterministic(golden, tmp_path):
    cal = feeds((1, 3, 224, 224), 3)
    a, b = quantize(golden("resnet"), cal), quantize(golden("resnet"), cal)
    a.save(tmp_path / "a.onnx")
    b.save(tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_report_and_metadata(golden):
    art = quantize(golden("resnet"), feeds((1, 3, 224, 224), 3))
    rows = art.reports["quantize-int8"]["tensors"]
    assert len(rows) > 10 and all(r["sqnr_db"] > 10 for r in rows)
    assert [r["sqnr_db"] for r in rows] == sorted(r["sqnr_db"] for r in rows)  # worst first
    meta = {m.key: m.value for m in art.model.metadata_props}
    recorded = json.loads(meta["infoptc.quantization"])
    assert recorded["recipe"]["isa"] == host_isa()
    assert recorded["method"] == "mse"


# ----------------------------------------------------------------------------- recipe and observers


def test_without_vnni_weights_are_seven_bits():
    assert host_isa({"avx2", "fma"}) == "avx2"
    assert host_isa({"avx2", "avx512f", "avx512_vnni"}) == "vnni"
    assert recipe_for("avx2").weight_qmax == 63
    assert recipe_for("vnni").weight_qmax == 127
    assert "fpu" in cpu_flags("processor: 0\nflags\t\t: fpu vme avx2\n")


def test_isa_override_reaches_the_weights():
    art = quantize(conv_model(8, 8, 3, 1, False), feeds((1, 8, 8, 8), 3, name="x"), isa="avx2")
    wq = next(numpy_helper.to_array(t) for t in art.model.graph.initializer if t.name == "w_quantized")
    assert np.abs(wq).max() == 63


def test_observers_clip_outliers_that_minmax_keeps():
    rng = np.random.default_rng(0)
    obs = Observer()
    for _ in range(4):
        obs.update(np.concatenate([rng.standard_normal(20000), [40.0]]))  # one outlier per batch
    lo, hi = obs.range("minmax")
    assert hi == pytest.approx(40.0)
    for method in ("percentile", "entropy"):
        m_lo, m_hi = obs.range(method, percentile=99.99)  # 4 outliers in 80004 values: 0.005%
        assert m_hi < 20.0 and m_lo > -20.0, method
        assert m_hi > 2.0, method  # still covers the bulk of the distribution
    # mse weighs the outliers' clipping error against the bulk's rounding noise: here keeping
    # them costs less, and the range it picks is never wider than minmax's
    m_lo, m_hi = obs.range("mse")
    assert lo <= m_lo and m_hi <= hi


def test_observer_histogram_widens_without_losing_counts():
    obs = Observer()
    obs.update(np.linspace(0, 1, 1000))
    obs.update(np.linspace(-5, 5, 1000))
    assert obs.hist.sum() == 2000
    assert (obs.lo, obs.hi) == (-5.0, 5.0)


def test_quant_params_make_zero_exact():
    for lo, hi in ((-1.3, 2.7), (0.0, 6.0), (0.5, 3.0), (-4.0, -1.0)):
        scale, zp = quant_params(lo, hi)
        assert 0 <= zp <= 255
        assert np.float32(0.0) == np.float32((np.round(0.0 / scale) + zp - zp) * scale)
        # the range is covered up to the one step the zero point's rounding may move it
        assert scale * (255 - zp) >= max(hi, 0) - scale and -scale * zp <= min(lo, 0) + scale


# ----------------------------------------------------------------------------- calibration data


def test_calibration_cache_skips_the_second_run(tmp_path, golden):
    cal = feeds((1, 3, 224, 224), 3)
    cache = tmp_path / "ranges.json"
    first = quantize(golden("resnet"), cal, cache=str(cache))
    again = quantize(golden("resnet"), cal, cache=str(cache), method="percentile")
    counters = lambda art: next(r.counters for r in art.pass_records if r.name == "quantize-int8")
    assert counters(first)["calibration_cached"] == 0
    assert counters(again)["calibration_cached"] == 1
    other = quantize(golden("resnet"), feeds((1, 3, 224, 224), 3, seed=9), cache=str(cache))
    assert counters(other)["calibration_cached"] == 0  # other data: other key


def test_npz_file_and_folder_forms(tmp_path):
    model = conv_model(3, 4, 3, 1, False)
    inputs = model_inputs(model)
    x = np.random.default_rng(0).standard_normal((5, 1, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "stacked.npz", x=x)
    assert len(list(CalibrationData(tmp_path / "stacked.npz", inputs))) == 5
    np.savez(tmp_path / "batch_axis.npz", x=x[:, 0])  # the input's own rank: split along the batch
    assert [f["x"].shape for f in CalibrationData(tmp_path / "batch_axis.npz", inputs)] == [(1, 3, 8, 8)] * 5
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", x=x[i])
    assert len(list(CalibrationData(folder, inputs))) == 3
    assert len(list(CalibrationData(folder, inputs, limit=2))) == 2


@pytest.mark.parametrize("bad, message", [
    ({"y": np.zeros((1, 3, 8, 8), np.float32)}, "lacks input 'x'"),
    ({"x": np.zeros((1, 3, 8, 8), np.float32), "z": np.zeros(1, np.float32)}, "'z' is not a model input"),
    ({"x": np.zeros((1, 3, 9, 8), np.float32)}, "input 'x' sample 0 has shape 1x3x9x8, the model takes 1x3x8x8"),
    ({"x": np.zeros((1, 3, 8, 8), np.float64)}, "input 'x' has dtype float64"),
    ({"x": np.full((1, 3, 8, 8), np.nan, np.float32)}, "input 'x' sample 0 holds NaN or Inf"),
])
def test_bad_calibration_samples_are_refused_by_name(bad, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        quantize(conv_model(3, 4, 3, 1, False), [bad])


def test_missing_unreadable_and_empty_calibration(tmp_path):
    model = conv_model(3, 4, 3, 1, False)
    with pytest.raises(UsageError, match="does not exist"):
        quantize(model, str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a readable .npz"):
        quantize(model, str(tmp_path / "junk.npz"))
    with pytest.raises(UsageError, match="zero samples"):
        quantize(model, [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="zero samples"):
        quantize(model, str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="needs calibration data"):
        infoptc.compile(model, quantize="int8")


def test_a_quantized_model_is_refused_unless_requantize(golden):
    once = quantize(golden("resnet"), feeds((1, 3, 224, 224), 2)).model
    with pytest.raises(UsageError, match="already quantized"):
        quantize(once, feeds((1, 3, 224, 224), 2))


def test_nothing_to_quantize_keeps_fp32_and_warns(caplog):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", F, [1, 4])],
                              [helper.make_tensor_value_info("y", F, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with caplog.at_level(logging.WARNING, logger="infoptc"):
        art = quantize(model, [{"x": np.ones((1, 4), np.float32)}])
    assert [n.op_type for n in art.model.graph.node] == ["Relu"]
    assert "nothing worth quantizing" in caplog.text


# ----------------------------------------------------------------------------- the command line


def _npz(path, model_path, n=3):
    m = onnx.load(model_path)
    name = m.graph.input[0].name
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    np.savez(path, **{name: np.stack([f[name] for f in feeds(shape, n, name=name)])})
    return path


def test_cli_quantizes_reports_and_inspect_sees_the_fusion(cli, golden, tmp_path):
    cal = _npz(tmp_path / "cal.npz", golden("resnet"))
    out = tmp_path / "r8.onnx"
    code, stdout, _ = cli(golden("resnet"), "-O3", "--quantize", "int8", "--calibration", cal, "-o", out,
                          "--no-speed-check")
    assert code == 0 and "worst SQNR first" in stdout
    code, stdout, _ = cli("inspect", "--quant", out, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["intended"] == report["fused"] > 20 and report["left_fp32"] == []
    assert report["recipe"]["recipe"]["isa"] == host_isa()
    again = tmp_path / "again.onnx"
    assert cli(golden("resnet"), "-O3", "--quantize", "int8", "--calibration", cal, "-o", again,
               "--no-speed-check")[0] == 0
    assert out.read_bytes() == again.read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int8"], "needs --calibration"),
    (["--calibration-method", "entropy"], "needs --quantize"),
    (["--quantize", "int8", "--calibration", "MISSING"], "does not exist"),
    (["--quantize", "int8-dynamic", "--per-tensor"], "apply to --quantize int8 and auto"),
    (["--quantize", "int8", "--calibration", "BAD"], "input 'input' has dtype float64"),
])
def test_cli_refuses_bad_quantization_input(cli, golden, tmp_path, args, message):
    np.savez(tmp_path / "bad.npz", input=np.zeros((2, 1, 3, 224, 224)))  # float64
    args = [str(tmp_path / "missing.npz") if a == "MISSING" else str(tmp_path / "bad.npz") if a == "BAD" else a
            for a in args]
    out = tmp_path / "never.onnx"
    code, _, stderr = cli(golden("resnet"), *args, "-o", out)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


# ----------------------------------------------------------------------------- never slower than fp32


def test_speed_check_keeps_fp32_where_int8_is_slower(caplog):
    """A 4x4 Conv runs in microseconds, where Q/DQ and int8 kernel set-up usually cost more than
    the product. The real timing decides (and on a noisy machine it can go either way), so what
    must hold is that the model written is the one the measured times call for: fp32 with the
    warning unless an int8 candidate took at most INT8_MARGIN of fp32's time."""
    from infoptc.passes.quantize.speed import INT8_MARGIN

    model = conv_model(4, 4, 1, 1, False, hw=4)
    with caplog.at_level(logging.WARNING, logger="infoptc"):
        art = infoptc.compile(model, quantize="int8", calibration=feeds((1, 4, 4, 4), 2, name="x"))
    speed = art.reports["quantize-int8"]["speed"]
    limit, rounding = INT8_MARGIN * speed["fp32_ms"], 1e-4  # the report rounds to 4 decimals
    ops = [n.op_type for n in art.model.graph.node]
    if speed["chosen"] is None:  # then the first candidate (the fullest int8) was over the margin
        assert next(iter(speed["candidates_ms"].values())) > limit - rounding, speed
        assert ops == ["Conv"] and "not faster than fp32" in caplog.text
    else:
        assert speed["candidates_ms"][speed["chosen"]] <= limit + rounding, speed
        assert "QuantizeLinear" in ops and "not faster than fp32" not in caplog.text


def test_speed_check_choice(monkeypatch):
    from infoptc.passes.quantize import speed

    def fake(times):
        def compare(fp32, candidates, feed):
            ms = dict(zip(candidates, times[1:]))
            best = list(candidates)[0]
            for k in list(candidates)[1:]:
                if ms[k] <= speed.PREFER * ms[best]:
                    best = k
            return speed.Timing(times[0], ms, best if ms[best] <= speed.INT8_MARGIN * times[0] else None)
        return compare

    cases = [((10.0, 5.0, 4.9, 6.0), True), ((10.0, 5.0, 4.0, 6.0), False), ((10.0, 11.0, 12.0, 12.0), None)]
    for times, expected in cases:
        monkeypatch.setattr(speed, "compare", fake(times))
        model = conv_model(3, 8, 3, 1, relu=False)  # an RGB stem: the third candidate leaves it fp32
        # an SE-style gate, so there is an elementwise op the second candidate leaves in fp32
        model.graph.node.append(helper.make_node("Sigmoid", ["y"], ["s"], name="sig"))
        model.graph.node.append(helper.make_node("Mul", ["y", "s"], ["z"], name="mul"))
        model.graph.output[0].name = "z"
        art = infoptc.compile(model, quantize="int8", calibration=feeds((1, 3, 8, 8), 2, name="x"))
        ops = [n.op_type for n in art.model.graph.node]
        if expected is None:
            assert "QuantizeLinear" not in ops
        else:
            sig_out = next(n for n in art.model.graph.node if n.op_type == "Sigmoid").output[0]
            readers = {n.op_type for n in art.model.graph.node if sig_out in n.input}
            assert (readers == {"QuantizeLinear"}) == expected, (times, readers)


def test_speed_check_can_leave_the_rgb_stem_in_fp32(monkeypatch):
    from infoptc.passes.quantize import speed

    def compare(fp32, candidates, feed):
        assert list(candidates) == ["full", "stem-fp32"]
        return speed.Timing(10.0, {"full": 5.0, "stem-fp32": 4.0}, "stem-fp32")

    monkeypatch.setattr(speed, "compare", compare)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="stem", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="body", pads=[1] * 4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", F, [1, 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    art = infoptc.compile(model, quantize="int8", calibration=feeds((1, 3, 8, 8), 2, name="x"))
    stem = next(n for n in art.model.graph.node if n.name == "stem")
    assert stem.input[1] == "w1"  # fp32 weight, no DequantizeLinear
    assert json.loads({m.key: m.value for m in art.model.metadata_props}["infoptc.quantization"])["coverage"] == "stem-fp32"
    assert fusion_report(art.model)["fused"] == 1


def test_quantization_settings_from_the_config_file(cli, golden, tmp_path, monkeypatch):
    cal = _npz(tmp_path / "cal.npz", golden("resnet"))
    (tmp_path / "infoptc.toml").write_text(f'quantize = "int8"\ncalibration = "{cal}"\n'
                                           'calibration-method = "percentile"\nno-speed-check = true\n')
    monkeypatch.chdir(tmp_path)
    code, _, _ = cli(golden("resnet"), "-O3", "-o", tmp_path / "q.onnx")
    assert code == 0
    recipe = json.loads({m.key: m.value for m in onnx.load(tmp_path / "q.onnx").metadata_props}["infoptc.quantization"])
    assert recipe["method"] == "percentile"


def test_verify_each_judges_int8_by_sqnr_on_the_calibration_data(golden, monkeypatch):
    from infoptc import verify
    from infoptc.errors import VerificationError

    cal = feeds((1, 3, 224, 224), 2)
    art = infoptc.compile(golden("resnet"), opt_level=3, quantize="int8", calibration=cal, verify_each=True,
                          quantize_options={"speed-check": False})
    assert any(n.op_type == "QuantizeLinear" for n in art.model.graph.node)
    monkeypatch.setattr(verify, "LOSSY_MIN_SQNR_DB", 200.0)  # no int8 model is this close
    with pytest.raises(VerificationError, match=r"after pass 'quantize-int8'.*SQNR [0-9.]+ dB, below 200 dB"):
        infoptc.compile(golden("resnet"), opt_level=3, quantize="int8", calibration=cal, verify_each=True,
                        quantize_options={"speed-check": False})


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "efficientnet_b0"])
def test_real_size_cnns_run_every_int8_op_as_an_int8_kernel(name, tmp_path):
    """The benchmark's CNNs (torchvision layouts at 224x224): ORT fuses every op the quantizer
    meant to be int8; one conversion, at the input (the classifier's QGemm writes fp32)."""
    import golden_models

    model = golden_models.module(name).build()
    art = quantize(model, feeds((1, 3, 224, 224), 2), **{"report-samples": 0})
    report = fusion_report(art.model)
    assert report["left_fp32"] == [] and report["intended"] == report["fused"]
    assert report["kernels"]["QLinearConv"] == sum(n.op_type == "Conv" for n in model.graph.node)
    assert report["conversions"] == 1


# ----------------------------------------------------------------------------- trained models, real data


def _trained(name):
    trained = pytest.importorskip("golden_models.trained")
    try:
        return trained, str(trained.path(name))
    except trained.ModelUnavailable as e:  # no package index reachable: nothing to measure
        pytest.skip(f"{name} not available: {e}")


def _task_metric(trained, name, path, model, n=12):
    import onnxruntime as ort

    ev = trained.evaluation_feeds(name, n)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return trained.task_metric(name, [out.run(None, f) for f in ev], [ref.run(None, f) for f in ev])


def test_trained_ocr_recognizer_keeps_its_reading():
    """PP-OCRv4 (rapidocr-onnxruntime's recognizer, an opset-12 PaddlePaddle export) on rendered
    text lines disjoint from the calibration lines: characters read as fp32 reads them."""
    trained, path = _trained("ppocr_rec")
    art = quantize(path, trained.calibration_feeds("ppocr_rec", 16), **{"report-samples": 0})
    assert _task_metric(trained, "ppocr_rec", path, art.model) >= 0.95


def test_trained_sentence_embedder_dynamic_keeps_its_embeddings():
    """all-MiniLM-L6-v2 on real sentences: int8-dynamic embeddings point where fp32's do."""
    trained, path = _trained("minilm")
    art = infoptc.compile(path, opt_level=3, quantize="int8-dynamic", quantize_options={"speed-check": False})
    assert _task_metric(trained, "minilm", path, art.model) >= 0.99


def test_verify_judges_a_quantized_candidate_by_sqnr(cli, golden, tmp_path):
    cal = _npz(tmp_path / "cal.npz", golden("resnet"))
    q = tmp_path / "q.onnx"
    assert cli(golden("resnet"), "-O3", "--quantize", "int8", "--calibration", cal, "-o", q, "--no-speed-check")[0] == 0
    code, stdout, _ = cli("verify", golden("resnet"), q, "--json")
    row = json.loads(stdout)["outputs"][0]
    assert code == 0 and row["passed"] and row["min_sqnr_db"] == 10.0 and row["sqnr_db"] > 20
    assert row["max_abs_error"] > 1e-3  # the fp32 tolerance would have failed it
    code, _, stderr = cli("verify", golden("resnet"), q, "--min-sqnr", "80")
    assert code == 3 and "below 80 dB (lossy)" in stderr


def test_a_clip_above_zero_is_not_folded():
    """Clip(0.5, 6) raises small values to 0.5; the Q of a range starting at 0 would keep them."""
    model = conv_model(4, 8, 3, 1, relu=False)
    model.graph.node.append(helper.make_node("Clip", ["y", "lo", "hi"], ["z"], name="clip"))
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(0.5), "lo"),
                                    numpy_helper.from_array(np.float32(6.0), "hi")])
    model.graph.output[0].name = "z"
    art = quantize(model, feeds((1, 4, 8, 8), 3, name="x"))
    assert "Clip" in [n.op_type for n in art.model.graph.node]
    (z,) = run(art.model, feeds((1, 4, 8, 8), 1, seed=7, name="x")[0])
    assert z.min() >= 0.5


def test_the_speed_decision_is_kept_in_the_cache_so_reruns_write_the_same_bytes(monkeypatch, golden, tmp_path):
    from infoptc.passes.quantize import speed

    cache = tmp_path / "ranges.json"
    cal = feeds((1, 3, 224, 224), 2)
    first = infoptc.compile(golden("resnet"), quantize="int8", calibration=cal, quantize_options={"cache": str(cache)})

    def no_timing(*args):
        raise AssertionError("the decision in the cache should have been used")

    monkeypatch.setattr(speed, "compare", no_timing)
    again = infoptc.compile(golden("resnet"), quantize="int8", calibration=cal, quantize_options={"cache": str(cache)})
    assert again.model.SerializeToString() == first.model.SerializeToString()
    assert again.reports["quantize-int8"]["speed"] == first.reports["quantize-int8"]["speed"]
    with pytest.raises(Exception, match="decision in the cache"):  # other options: a new decision
        infoptc.compile(golden("resnet"), quantize="int8", calibration=cal,
                        quantize_options={"cache": str(cache), "method": "minmax"})
