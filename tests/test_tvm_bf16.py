"""``--quantize bf16 --target llvm``: AVX512_BF16 matmuls and convs (backends/tvm/bf16.py).

Error bounds come from the arithmetic, per output element, against ONNX Runtime fp32 on the
original model. With u = 2^-8 (bf16's unit roundoff: 8 significand bits) and M = sum |x| |w|
over the reduction (ORT on |x| and |W|):

    inputs and weights rounded to bf16      products off by at most (2u + u^2) M
    fp32 accumulation (any order)           at most K 2^-24 (1 + u)^2 M
    each bf16 result after that (the        u times its magnitude, bounded by the exact
    contraction, + bias, + residual)        magnitude plus the error so far

(relu is 1-Lipschitz and exact on bf16 values). Weights packed in a wrong order fail it by far
(checked by breaking ``pack_weights``).
ONNX Runtime has no CPU kernels for bf16 Gemm/Conv, so the bf16 ONNX model is not a reference.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

import infoptc
from infoptc.passes.quantize.recipe import cpu_flags

# The kernels need AVX512_BF16 to run (an llvm bf16 compile exits 5 on a host without bf16).
pytestmark = pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="needs a CPU with AVX512_BF16")

U = 2.0 ** -8
F32_EPS = 2.0 ** -24


def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0].astype(np.float64)


def _model(nodes, inputs, output_shape, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _dpbf16_count(artifact) -> int:
    module = artifact.executable.mod
    llvm = [m for m in module.imports if m.kind == "llvm"] or [module]
    return sum("vdpbf16ps" in line for line in llvm[0].inspect_source("asm").splitlines())


def _bound(magnitude, reduction, stages) -> np.ndarray:
    """The error bound of the module docstring: ``magnitude`` is M; ``stages`` the exact values
    (and magnitudes of the bf16 terms added) of each rounded result after the contraction."""
    error = (2 * U + U * U) * magnitude + reduction * F32_EPS * (1 + U) ** 2 * magnitude
    for exact, added in stages:
        error = error + U * added + U * (np.abs(exact) + error)
    return error


def _check(model, contraction, feeds, reduction, stages, **options):
    """Compile ``model`` for llvm bf16, run it, and hold it to the bound; returns the artifact."""
    artifact = infoptc.compile(model, target="llvm", opt_level=3, quantize="bf16", **options)
    got, want, bound = _within_bound(artifact, model, contraction, feeds, reduction, stages)
    # not vacuous: the bound is of bf16's size, and the outputs differ from fp32
    assert bound.max() < 0.05 * np.abs(want).max()
    assert np.abs(got - want).max() > 0
    return artifact


def _within_bound(artifact, model, contraction, feeds, reduction, stages):
    got = artifact.run(feeds)["y"].astype(np.float64)
    want = _ort(model, feeds)
    abs_model = onnx.ModelProto()
    abs_model.CopyFrom(contraction)
    for init in abs_model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(init)), init.name))
    magnitude = _ort(abs_model, {k: np.abs(v) for k, v in feeds.items()})
    exact = _ort(contraction, feeds)
    bound = _bound(magnitude, reduction, stages(exact))
    excess = np.abs(got - want) - bound
    assert excess.max() <= 0, f"error {np.abs(got - want).max():.3g} over the bound by {excess.max():.3g}"
    return got, want, bound


def test_pack_weights_layout():
    from infoptc.backends.tvm.bf16 import pack_weights

    w = np.arange(3 * 3 * 4 * 32, dtype=np.float32).reshape(3, 3, 4, 32)
    packed = pack_weights(w)
    assert packed.shape == (2, 3, 3, 2, 16, 2)
    f, ky, kx, c = 21, 2, 1, 3
    assert packed[f // 16, ky, kx, c // 2, f % 16, c % 2] == w[ky, kx, c, f]


def _dense_case(k=512, n=64):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) * 4
    x = rng.standard_normal((2, 24, k)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
                    helper.make_node("Relu", ["a"], ["y"])], [("x", [2, 24, k])], [2, 24, n], {"w": w, "b": b})
    contraction = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [2, 24, k])], [2, 24, n], {"w": w})
    return model, contraction, {"x": x}, k, lambda m: [(m, 0), (m + b, np.abs(b))]


def test_mlp_layer_runs_vdpbf16ps_within_the_bf16_bound():
    model, contraction, feeds, k, stages = _dense_case()
    artifact = _check(model, contraction, feeds, k, stages)
    assert _dpbf16_count(artifact) > 0


def test_without_avx512bf16_accumulates_in_fp32():
    model, contraction, feeds, k, stages = _dense_case()
    artifact = _check(model, contraction, feeds, k, stages, mattr="-avx512bf16")
    assert _dpbf16_count(artifact) == 0


def test_symbolic_rows_run_vdpbf16ps_within_the_bf16_bound():
    """Batch and sequence known only at run time: the rows are padded to whole tiles in the kernel."""
    model, contraction, feeds, k, stages = _dense_case()
    for m in (model, contraction):
        for value in (*m.graph.input, *m.graph.output):
            dims = value.type.tensor_type.shape.dim
            dims[0].dim_param, dims[1].dim_param = "batch", "seq"
    artifact = _check(model, contraction, feeds, k, stages)
    assert artifact.manifest["symbolic_dims"] == ["batch", "seq"] and _dpbf16_count(artifact) > 0
    x = np.random.default_rng(1).standard_normal((1, 7, k)).astype(np.float32)  # a partial tile of rows
    _within_bound(artifact, model, contraction, {"x": x}, k, stages)


@pytest.mark.parametrize("stride, residual", [(1, True), (2, False)])
def test_conv_runs_vdpbf16ps_within_the_bf16_bound(stride, residual):
    rng = np.random.default_rng(stride)
    channels, size = 32, 14
    features = channels if residual else 64
    w = (rng.standard_normal((features, channels, 3, 3)) / 6).astype(np.float32)
    b = rng.standard_normal(features).astype(np.float32)
    x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
    out = size // stride
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride])
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **conv)]
    if residual:
        nodes.append(helper.make_node("Add", ["c", "x"], ["s"]))
    nodes.append(helper.make_node("Relu", ["s" if residual else "c"], ["y"]))
    shape = [1, features, out, out]
    model = _model(nodes, [("x", [1, channels, size, size])], shape, {"w": w, "b": b})
    contraction = _model([helper.make_node("Conv", ["x", "w"], ["y"], **conv)], [("x", [1, channels, size, size])],
                         shape, {"w": w})
    bias = b.reshape(1, -1, 1, 1)

    def stages(m):
        rounded = [(m, 0), (m + bias, np.abs(bias))]
        return rounded + [(m + bias + x, np.abs(x))] if residual else rounded

    artifact = _check(model, contraction, {"x": x}, 9 * channels, stages)
    assert _dpbf16_count(artifact) > 0


def test_transformer_block_within_the_rounding_stages():
    """LayerNorm, Q/K/V and output projections, softmax attention, residual: many bf16 roundings
    in a row. Each rounds to 2^-8 of its value and the products add two more input roundings,
    so the output is within (3 u) per bf16 stage of the output's scale (softmax and the norm's
    statistics stay fp32)."""
    rng = np.random.default_rng(3)
    seq, dim = 16, 64
    inits = {name: (rng.standard_normal((dim, dim)) / 8).astype(np.float32) for name in ("wq", "wk", "wv", "wo")}
    inits.update(gamma=(1 + rng.standard_normal(dim) / 10).astype(np.float32),
                 beta=(rng.standard_normal(dim) / 10).astype(np.float32), scale=np.array(1 / 8, np.float32))
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "wq"], ["q"]), helper.make_node("MatMul", ["n", "wk"], ["k"]),
             helper.make_node("MatMul", ["n", "wv"], ["v"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["ss"]),
             helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["a"]),
             helper.make_node("MatMul", ["a", "wo"], ["o"]), helper.make_node("Add", ["o", "x"], ["y"])]
    model = _model(nodes, [("x", [1, seq, dim])], [1, seq, dim], inits)
    x = rng.standard_normal((1, seq, dim)).astype(np.float32)
    artifact = infoptc.compile(model, target="llvm", opt_level=3, quantize="bf16")
    converted = artifact.model
    stages = sum(1 for node in converted.graph.node if node.op_type not in ("Cast", "Softmax"))
    got = artifact.run({"x": x})["y"].astype(np.float64)
    want = _ort(model, {"x": x})
    error = np.abs(got - want).max()
    assert 0 < error <= 3 * U * stages * np.abs(want).max()
    assert _dpbf16_count(artifact) > 0


def test_round_to_bf16_bits_is_round_to_nearest_even():
    """The fp32 -> bf16 rounding the kernels apply to an fp32 model input, against ml_dtypes."""
    import ml_dtypes
    from infoptc.backends.tvm.bf16 import round_to_bf16_bits
    from tvm import te

    rng = np.random.default_rng(0)
    ties = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0xFF800000, 0x00000001], np.uint32)
    values = np.concatenate([rng.standard_normal(1000).astype(np.float32) * 1e3, ties.view(np.float32),
                             np.array([np.inf, -np.inf, 0.0, -0.0, np.nan], np.float32)])
    x = te.placeholder(values.shape, "float32", name="x")
    y = te.compute(values.shape, lambda i: round_to_bf16_bits(x[i]), name="y")
    func = tvm.compile(te.create_prim_func([x, y]), target=tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.zeros(values.shape, np.uint16))
    func(tvm.runtime.tensor(values), out)
    got = out.numpy()
    np.testing.assert_array_equal(got[:-1], values[:-1].astype(ml_dtypes.bfloat16).view(np.uint16))
    assert np.isnan(got[-1:].view(ml_dtypes.bfloat16).astype(np.float32)).all()


def _kernels(artifact) -> str:
    """The assembly of the artifact's kernels (their symbols name the fused Relax functions)."""
    module = artifact.executable.mod
    llvm = [m for m in module.imports if m.kind == "llvm"] or [module]
    return llvm[0].inspect_source("asm")


@pytest.mark.parametrize("kernel, stride, channels", [(3, 1, 32), (5, 2, 48)])
def test_depthwise_conv_runs_the_bf16_depthwise_kernel_within_the_bound(kernel, stride, channels):
    """One group per channel: bf16 inputs widened in the kernel, fp32 multiply-adds, the bias and
    ReLU6 on the fp32 result (the padding read as zeros at every border)."""
    rng = np.random.default_rng(kernel)
    size = 15
    w = (rng.standard_normal((channels, 1, kernel, kernel)) / kernel).astype(np.float32)
    b = rng.standard_normal(channels).astype(np.float32)
    x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
    pad = kernel // 2
    conv = dict(kernel_shape=[kernel, kernel], pads=[pad] * 4, strides=[stride, stride], group=channels)
    out = (size + 2 * pad - kernel) // stride + 1
    shape = [1, channels, out, out]
    model = _model([helper.make_node("Conv", ["x", "w", "b"], ["c"], **conv),
                    helper.make_node("Clip", ["c", "lo", "hi"], ["y"])], [("x", [1, channels, size, size])], shape,
                   {"w": w, "b": b, "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)})
    contraction = _model([helper.make_node("Conv", ["x", "w"], ["y"], **conv)], [("x", [1, channels, size, size])],
                         shape, {"w": w})
    bias = b.reshape(1, -1, 1, 1)
    artifact = _check(model, contraction, {"x": x}, kernel * kernel, lambda m: [(m, 0), (m + bias, np.abs(bias))])
    assert "bf16_depthwise" in _kernels(artifact)


def test_conv_with_24_output_channels_pads_them_to_vectors_within_the_bound():
    """MobileNet's projections to 24 channels: weights padded to 32 columns, the padded ones
    dropped from the output."""
    rng = np.random.default_rng(24)
    channels, features, size = 48, 24, 10
    w = (rng.standard_normal((features, channels, 1, 1)) / 4).astype(np.float32)
    b = rng.standard_normal(features).astype(np.float32)
    x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
    shape = [1, features, size, size]
    model = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"])], [("x", [1, channels, size, size])], shape,
                   {"w": w, "b": b})
    contraction = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, channels, size, size])], shape,
                         {"w": w})
    bias = b.reshape(1, -1, 1, 1)
    artifact = _check(model, contraction, {"x": x}, channels, lambda m: [(m, 0), (m + bias, np.abs(bias))])
    assert _dpbf16_count(artifact) > 0


def test_one_row_dense_with_1000_columns_runs_vdpbf16ps_within_the_bound():
    """A classifier at batch 1: 1000 columns padded to 1024 (whole tiles of 4 vectors), one row."""
    rng = np.random.default_rng(1000)
    k, n = 320, 1000
    w = (rng.standard_normal((k, n)) / 8).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((1, k)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                   [("x", [1, k])], [1, n], {"w": w, "b": b})
    contraction = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [1, k])], [1, n], {"w": w})
    artifact = _check(model, contraction, {"x": x}, k, lambda m: [(m, 0), (m + b, np.abs(b))])
    assert _dpbf16_count(artifact) > 0


@pytest.mark.parametrize("bf16_kernels", [True, False])
def test_squeeze_excitation_block_within_the_rounding_stages(bf16_kernels):
    """Depthwise conv, SiLU, global average pool (on the fp32 result), two small 1x1 convs, a
    sigmoid gate multiplied back, a 1x1 projection: each bf16 stage rounds to 2^-8 of its value,
    with two more input roundings per contraction (as the transformer block's test). Without
    avx512bf16 the same graph compiles to TVM's kernels, accumulating in fp32."""
    rng = np.random.default_rng(5)
    channels, squeeze, size = 32, 8, 12
    inits = {"dw": (rng.standard_normal((channels, 1, 3, 3)) / 3).astype(np.float32),
             "db": rng.standard_normal(channels).astype(np.float32) / 4,
             "s1": (rng.standard_normal((squeeze, channels, 1, 1)) / 4).astype(np.float32),
             "s2": (rng.standard_normal((channels, squeeze, 1, 1)) / 2).astype(np.float32),
             "pw": (rng.standard_normal((16, channels, 1, 1)) / 4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "dw", "db"], ["d"], kernel_shape=[3, 3], pads=[1] * 4, group=channels),
             helper.make_node("Sigmoid", ["d"], ["ds"]), helper.make_node("Mul", ["d", "ds"], ["a"]),
             helper.make_node("GlobalAveragePool", ["a"], ["p"]), helper.make_node("Conv", ["p", "s1"], ["q"]),
             helper.make_node("Relu", ["q"], ["r"]), helper.make_node("Conv", ["r", "s2"], ["e"]),
             helper.make_node("Sigmoid", ["e"], ["g"]), helper.make_node("Mul", ["a", "g"], ["z"]),
             helper.make_node("Conv", ["z", "pw"], ["y"])]
    model = _model(nodes, [("x", [1, channels, size, size])], [1, 16, size, size], inits)
    x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
    options = {} if bf16_kernels else {"mattr": "-avx512bf16"}
    artifact = infoptc.compile(model, target="llvm", opt_level=3, quantize="bf16", **options)
    got = artifact.run({"x": x})["y"].astype(np.float64)
    want = _ort(model, {"x": x})
    error = np.abs(got - want).max()
    assert 0 < error <= 3 * U * len(nodes) * np.abs(want).max()
    assert ("bf16_depthwise" in _kernels(artifact)) == bf16_kernels
    assert (_dpbf16_count(artifact) > 0) == bf16_kernels
