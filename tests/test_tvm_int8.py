"""int8 kernels of the llvm target (backends/tvm/int8.py): the QDQ graphs of ``--quantize int8``
compiled to integer contractions on the CPU's u8 x s8 dot-product instructions.

What must hold: the library's code uses the instruction the host's features call for
(``vpdpbusd`` with VNNI, ``vpmaddubsw`` without), never one the target lacks; its outputs agree
with ONNX Runtime running the same QDQ model (itself on int8 kernels). Integer accumulation is
exact on both sides, so the results differ only where a requantization or the final fp32
multiply rounds differently: a requantized output within one quantization step of ORT's, an fp32
output within fp32 rounding of it. A layer whose 8-bit weights would saturate ``vpmaddubsw``
stays fp32 on a host without VNNI; a quantized CNN runs NHWC between its convs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

import infoptc
from _tvm import kernels_by_name, lowered
from infoptc.backends.tvm import _cpu_flags

F = TensorProto.FLOAT
FLAGS = _cpu_flags() or set()
VNNI = bool({"avx512_vnni", "avx_vnni"} & FLAGS)
needs_avx2 = pytest.mark.skipif("avx2" not in FLAGS, reason="the int8 kernels need AVX2 or newer x86 SIMD")
NO_VNNI = "-avx512vnni,-avxvnni"


def _rng(seed):
    return np.random.default_rng(seed)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def mlp_model():
    """x [batch, 48] -> 32 -> Relu -> 16 -> Relu -> 8 (symbolic batch: the rows are a TIR variable)."""
    rng = _rng(1)
    nodes, inits, x = [], [], "x"
    for i, (fin, fout) in enumerate([(48, 32), (32, 16), (16, 8)]):
        inits += [_init(f"w{i}", rng.standard_normal((fin, fout)) / np.sqrt(fin)), _init(f"b{i}", rng.standard_normal(fout) * 0.1)]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        x = f"a{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", F, ["batch", 48])],
                              [helper.make_tensor_value_info("y", F, ["batch", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def conv_model():
    """NCHW [1, 3, 16, 16]: a 3-channel stem (channels padded to 4), a residual block, a strided
    1x1 conv, a depthwise conv, a conv to 8 channels (ymm vectors), global pool and a Gemm with
    an fp32 output."""
    rng = _rng(2)
    inits = []

    def conv(name, x, cin, cout, k, stride=1, relu=True, groups=1):
        inits.extend([_init(f"{name}_w", rng.standard_normal((cout, cin // groups, k, k)) / np.sqrt(cin // groups * k * k)),
                      _init(f"{name}_b", rng.standard_normal(cout) * 0.1)])
        out = [helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], kernel_shape=[k, k],
                                strides=[stride, stride], pads=[k // 2] * 4, group=groups)]
        if relu:
            out.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]))
        return out, f"{name}_r" if relu else f"{name}_c"

    nodes = []
    for spec in [("stem", "x", 3, 16, 3), ("c1", "stem_r", 16, 16, 3)]:
        made, _ = conv(*spec)
        nodes += made
    made, c2 = conv("c2", "c1_r", 16, 16, 3, relu=False)
    nodes += made + [helper.make_node("Add", [c2, "stem_r"], ["res"]), helper.make_node("Relu", ["res"], ["res_r"])]
    made, c3 = conv("c3", "res_r", 16, 32, 1, stride=2)
    nodes += made
    made, dw = conv("dw", c3, 32, 32, 3, groups=32)
    nodes += made
    made, c4 = conv("c4", dw, 32, 8, 3)
    nodes += made
    inits += [_init("fc_w", rng.standard_normal((16, 8)) / np.sqrt(8)), _init("fc_b", rng.standard_normal(16) * 0.1)]
    nodes += [helper.make_node("GlobalAveragePool", [c4], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", F, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", F, [1, 16]),
                               helper.make_tensor_value_info(c4, F, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def transformer_model(seq=16, d=32, ff=64):
    """One pre-LayerNorm block, one head: q/k/v/o projections, softmax attention, a Relu FFN,
    two residual adds. The projections and the FFN are int8 MatMuls; attention stays fp32."""
    rng = _rng(3)
    inits = [_init("ln_g", 1 + rng.standard_normal(d) * 0.1), _init("ln_b", rng.standard_normal(d) * 0.1),
             _init("scale", np.array(1 / np.sqrt(d)))]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_g", "ln_b"], ["h"], axis=-1)]

    def linear(name, x, fin, fout):
        inits.extend([_init(f"{name}_w", rng.standard_normal((fin, fout)) / np.sqrt(fin)),
                      _init(f"{name}_b", rng.standard_normal(fout) * 0.1)])
        nodes.extend([helper.make_node("MatMul", [x, f"{name}_w"], [f"{name}_m"]),
                      helper.make_node("Add", [f"{name}_m", f"{name}_b"], [name])])
        return name

    q, k, v = (linear(n, "h", d, d) for n in ("q", "k", "v"))
    nodes += [helper.make_node("Transpose", [k], ["kt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", [q, "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["ss"]),
              helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("MatMul", ["p", v], ["att"])]
    o = linear("o", "att", d, d)
    nodes.append(helper.make_node("Add", ["x", o], ["r1"]))
    f1 = linear("f1", "r1", d, ff)
    nodes.append(helper.make_node("Relu", [f1], ["f1r"]))
    f2 = linear("f2", "f1r", ff, d)
    nodes.append(helper.make_node("Add", ["r1", f2], ["y"]))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", F, [1, seq, d])],
                              [helper.make_tensor_value_info("y", F, [1, seq, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(model, n, seed=0):
    rng = _rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for vi in model.graph.input:
            shape = [d.dim_value or 4 for d in vi.type.tensor_type.shape.dim]
            feed[vi.name] = rng.standard_normal(shape).astype(np.float32)
        out.append(feed)
    return out


def quantize(model, isa="auto"):
    """The QDQ model of ``--quantize int8`` (every layer int8: no host timing)."""
    art = infoptc.compile(model, opt_level=2, quantize="int8", calibration=feeds(model, 8),
                          quantize_options={"speed-check": False, "isa": isa})
    return art.model


def ort_outputs(model, feed):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def output_scales(model) -> dict[str, float]:
    """Graph outputs written by a DequantizeLinear: their quantization step."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    steps = {}
    for out in model.graph.output:
        node = producers.get(out.name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in consts:
            steps[out.name] = float(consts[node.input[1]])
    return steps


def sqnr_db(reference, test) -> float:
    reference, test = reference.astype(np.float64), test.astype(np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - test) ** 2), 1e-30)))


def assert_agrees(qmodel, artifact, fp32_model=None, n=3):
    """Requantized outputs within one step of ORT's; fp32 outputs within fp32 rounding of it.

    With ``fp32_model`` (a transformer: softmax turns a one-step flip of a requantized tensor into
    several steps of the next), the outputs are judged against the quantization error instead:
    our error against fp32 is ORT's (within 0.5 dB), and ours differs from ORT's at least 6 dB
    less than ORT's int8 differs from fp32 (measured: 9.5-16 dB less, the same error within 0.1 dB)."""
    steps = output_scales(qmodel)
    for feed in feeds(qmodel, n, seed=7):
        ours, ref = artifact.run(feed), ort_outputs(qmodel, feed)
        fp32 = ort_outputs(fp32_model, feed) if fp32_model is not None else None
        for name, expected in ref.items():
            if fp32 is not None:
                error = sqnr_db(fp32[name], expected)
                assert abs(sqnr_db(fp32[name], ours[name]) - error) <= 0.5, name
                assert sqnr_db(expected, ours[name]) >= error + 6, name
            elif name in steps:
                diff = np.abs(ours[name].astype(np.float64) - expected)
                assert diff.max() <= steps[name] * 1.0001, (name, diff.max() / steps[name])
            else:
                np.testing.assert_allclose(ours[name], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(),
                                           err_msg=name)


def assembly(artifact) -> str:
    return artifact.executable.mod.imports[0].inspect_source("asm")


def instruction_used(artifact) -> set[str]:
    asm = assembly(artifact)
    return {name for name in ("vpdpbusd", "vpmaddubsw") if name in asm}


def host_instruction() -> str:
    return "vpdpbusd" if VNNI else "vpmaddubsw"


# ----------------------------------------------------------------------------- host features


@needs_avx2
@pytest.mark.parametrize("build", [mlp_model, conv_model, transformer_model], ids=["mlp", "convnet", "transformer"])
def test_int8_model_runs_on_the_hosts_dot_product_and_agrees_with_ort(build):
    model = build()
    qmodel = quantize(model)
    artifact = infoptc.compile(qmodel, target="llvm", opt_level=0)
    assert instruction_used(artifact) == {host_instruction()}
    assert_agrees(qmodel, artifact, model if build is transformer_model else None)


@needs_avx2
@pytest.mark.parametrize("mattr", [NO_VNNI, "-avx512f,-avxvnni"], ids=["avx512bw-zmm", "avx2-ymm"])
def test_without_vnni_7bit_weights_run_on_vpmaddubsw_and_agree(mattr):
    """The quantizer's AVX2 recipe (|w| <= 63): pairs of u8 x s8 products cannot saturate int16."""
    if mattr == NO_VNNI and "avx512bw" not in FLAGS:
        pytest.skip("no AVX-512BW here")
    qmodel = quantize(conv_model(), isa="avx2")
    artifact = infoptc.compile(qmodel, target="llvm", opt_level=0, mattr=mattr)
    asm = assembly(artifact)
    assert instruction_used(artifact) == {"vpmaddubsw"}
    assert ("zmm" in asm) == (mattr == NO_VNNI)  # ymm only without AVX-512
    assert_agrees(qmodel, artifact)


@needs_avx2
@pytest.mark.skipif(not VNNI, reason="8-bit weights come from the VNNI recipe of a VNNI host")
def test_without_vnni_8bit_weights_stay_fp32_rather_than_saturate(caplog):
    qmodel = quantize(mlp_model(), isa="vnni")
    with caplog.at_level(logging.WARNING, logger="infoptc"):
        artifact = infoptc.compile(qmodel, target="llvm", opt_level=0, mattr=NO_VNNI)
    assert instruction_used(artifact) == set()
    assert sum("saturates" in r.getMessage() for r in caplog.records) == 1  # one line for all such layers
    assert_agrees(qmodel, artifact)


def test_quantized_cnn_runs_nhwc_between_its_convs():
    """Q/DQ of activations become elementwise ops that ConvertLayout sees through: of the int8
    convs' inputs, only the model input's is transposed (NCHW -> NHWC, fused with its Q)."""
    from tvm import relax

    mod = lowered(quantize(conv_model(), isa="vnni"))
    names = list(kernels_by_name(mod))
    assert sum("int8_conv2d" in n for n in names) == 5
    assert sum("int8_depthwise" in n for n in names) == 1
    assert sum("int8_dense" in n for n in names) == 1  # the Gemm
    producer, transposed = {}, []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_tir":
                kernel = value.args[0].name_hint
                producer[binding.var] = kernel
                if "int8_conv2d" in kernel or "int8_depthwise" in kernel:
                    transposed += [producer[a] for a in value.args[1].fields if "transpose" in producer.get(a, "")]
    assert len(transposed) == 1 and "round" in transposed[0], transposed  # the input's Q + transpose


def small_map_model(size=7, channels=64):
    """Two 3x3 convs on a ``size`` x ``size`` map (ResNet's last stage is 7x7x512)."""
    rng = _rng(5)
    inits, nodes, x = [], [], "x"
    for i in range(2):
        inits += [_init(f"w{i}", rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)),
                  _init(f"b{i}", rng.standard_normal(channels) * 0.1)]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3], pads=[1] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "small_map", [helper.make_tensor_value_info("x", F, [1, channels, size, size])],
                              [helper.make_tensor_value_info(x, F, [1, channels, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_register_tile_favours_products_per_load():
    """A 7-pixel row with 32 channel vectors: 7 rows x 2 vectors (14 dot products for 9 loads),
    not the 1 x 4 tile (4 for 5) that the widest channel block would leave; wide rows keep 4 x 4."""
    from infoptc.backends.tvm.schedule import dot_register_tile

    assert dot_register_tile(7, 32, 24) == (7, 2)
    assert dot_register_tile(14, 16, 24) == (7, 2)
    assert dot_register_tile(56, 4, 24) == (4, 4)
    assert dot_register_tile(None, 6, 24) == (1, 3)
    for rows_extent in range(1, 60):
        for vector_extent in (1, 2, 3, 4, 5, 8, 10, 32):
            rows, vectors = dot_register_tile(rows_extent, vector_extent, 12)
            assert rows_extent % rows == 0 and vector_extent % vectors == 0 and rows * vectors <= 12


@needs_avx2
@pytest.mark.parametrize("size", [7, 14])
def test_small_maps_tile_rows_and_agree(size):
    model = small_map_model(size)
    qmodel = quantize(model)
    artifact = infoptc.compile(qmodel, target="llvm", opt_level=0)
    assert instruction_used(artifact) == {host_instruction()}
    assert_agrees(qmodel, artifact)


def test_requantization_is_one_multiply_add_per_element():
    """The dequantization scale, the bias and the next quantization's 1 / scale fold into one
    per-channel multiply-add before the rounding (fold_requantization_pass), as ONNX Runtime's
    int8 kernels requantize; outputs stay within a step of ORT's on the same QDQ graph."""
    qmodel = quantize(small_map_model(7, 32))
    texts = [f.script() for name, f in kernels_by_name(lowered(qmodel)).items() if "int8_conv2d" in name]
    requantized = [t for t in texts if "T.nearbyint(" in t]
    assert requantized, texts
    for text in requantized:
        rounded = text[text.index("T.nearbyint(") + len("T.nearbyint("):]
        assert rounded.startswith('T.Cast("float32"'), rounded[:200]  # not ((float(acc) * s + b) * c)
    assert_agrees(qmodel, infoptc.compile(qmodel, target="llvm", opt_level=0))


def test_pack_weights_layout():
    from infoptc.backends.tvm.int8 import pack_weights

    w = _rng(4).integers(-127, 128, size=(3, 3, 6, 32)).astype(np.int8)  # HWIO, K=6 -> padded to 8
    packed = pack_weights(w, 16)
    assert packed.shape == (2, 3, 3, 2, 16, 4)
    for f, ky, kx, c in [(0, 0, 0, 0), (17, 2, 1, 5), (31, 1, 2, 3)]:
        assert packed[f // 16, ky, kx, c // 4, f % 16, c % 4] == w[ky, kx, c, f]
    assert not packed[:, :, :, 1, :, 2:].any()  # channels 6 and 7: zeros


@needs_avx2
def test_compile_quantizes_for_llvm_without_timing_onnx_runtime(monkeypatch):
    """``infoptc.compile(model, target="llvm", quantize="int8", calibration=...)``, the call the
    benchmarks make: the quantizer's speed check times ONNX Runtime's int8 kernels, which the llvm
    target does not run, so it is skipped there and every layer is quantized."""
    from infoptc.passes.quantize import speed

    def timed(*_args, **_kwargs):
        raise AssertionError("the speed check ran ONNX Runtime for an llvm build")

    monkeypatch.setattr(speed, "compare", timed)
    model = conv_model()
    artifact = infoptc.compile(model, target="llvm", opt_level=3, quantize="int8", calibration=feeds(model, 8))
    assert instruction_used(artifact) == {host_instruction()}
    assert sum(n.op_type == "DequantizeLinear" for n in artifact.model.graph.node) > 0
    assert_agrees(artifact.model, artifact)
