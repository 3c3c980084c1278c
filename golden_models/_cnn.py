"""Shared pieces of the real-size CNN golden models (ResNet-18, MobileNetV2, EfficientNet-B0).

Weights are He-initialised on the fan-in (so a ReLU/SiLU network keeps unit-ish
activations from layer to layer), BatchNormalization stays un-fused with
plausible inference statistics (running mean near 0, running var near 1, which
is what the He-initialised convolution before it produces), and every array
comes from one seeded ``numpy.random.Generator`` in a fixed order, so the
serialized model is byte-identical on every build.
"""

from __future__ import annotations

import numpy as np

from ._graph import TorchStyleGraph, normal, uniform

INPUT_SHAPE = (1, 3, 224, 224)
NUM_CLASSES = 1000

# ImageNet normalisation, used by ``example_inputs`` so that the random-weight
# CNNs see the value range a real image pipeline feeds them.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# ------------------------------------------------------- BN calibration
# While a builder emits the graph it also runs the network in float64 numpy on
# a small calibration batch (CAL_BATCH smooth random images at the real 224², see
# ``image_inputs``), and every BatchNormalization gets the per-channel mean and
# variance that its input really has on that batch, rounded to 3 significant
# digits (so float64 rounding differences between machines cannot change a
# stored byte): the statistics a BN recalibration would give, and the network
# really normalises, from the first layer to the last.
CAL_BATCH = 2
CAL_SIZE = 224


def acts(g: TorchStyleGraph) -> dict[str, np.ndarray]:
    """Calibration activations (float64, NCHW) per tensor name, kept on the graph object."""
    if not hasattr(g, "acts"):
        img = image_inputs(CAL_BATCH, seed=12345, size=CAL_SIZE)["input"]
        g.acts = {"input": img.astype(np.float64)}
    return g.acts


def _round_sig(a: np.ndarray, digits: int = 3) -> np.ndarray:
    return np.array([float(f"{v:.{digits}g}") for v in np.asarray(a, np.float64).ravel()],
                    dtype=np.float32).reshape(np.shape(a))


def conv_np(x: np.ndarray, w: np.ndarray, b, stride: int, pad: int, groups: int) -> np.ndarray:
    """Reference float64 Conv2d (groups 1 or depthwise)."""
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    w = w.astype(np.float64)
    if groups == 1:
        y = np.einsum("nchwij,ocij->nohw", win, w, optimize=True)
    elif groups == x.shape[1] == w.shape[0]:
        y = np.einsum("nchwij,cij->nchw", win, w[:, 0], optimize=True)
    else:
        raise NotImplementedError("grouped conv other than depthwise")
    if b is not None:
        y = y + np.asarray(b, np.float64)[None, :, None, None]
    return y


def conv(g: TorchStyleGraph, rng, x: str, scope: str, pname: str, cin: int, cout: int,
         k: int, stride: int = 1, groups: int = 1, pad: int | None = None,
         bias: bool = False, gain: float = 2.0) -> str:
    """torch ``Conv2d`` as exported (weight ``<pname>.weight``, optional bias).

    He init on the fan-in (``gain`` 2: for a ReLU-like input).
    """
    fan_in = (cin // groups) * k * k
    w_arr = normal(rng, (cout, cin // groups, k, k), np.sqrt(gain / fan_in))
    w = g.init(f"{pname}.weight", w_arr)
    inputs = [x, w]
    b_arr = None
    if bias:
        b_arr = normal(rng, (cout,), 0.01)
        inputs.append(g.init(f"{pname}.bias", b_arr))
    if pad is None:
        pad = (k - 1) // 2
    y = g.op(
        "Conv", inputs, scope,
        dilations=[1, 1], group=groups, kernel_shape=[k, k], pads=[pad] * 4,
        strides=[stride] * 2,
    )
    a = acts(g)
    a[y] = conv_np(a[x], w_arr, b_arr, stride, pad, groups)
    return y


def bn(g: TorchStyleGraph, rng, x: str, scope: str, pname: str, c: int,
       gamma: tuple[float, float] = (0.7, 1.2), eps: float = 1e-5) -> str:
    """torch ``BatchNorm2d`` in eval mode, un-fused, statistics calibrated (see above)."""
    a = acts(g)
    gam = uniform(rng, (c,), *gamma)
    bet = normal(rng, (c,), 0.1)
    rm = _round_sig(a[x].mean(axis=(0, 2, 3)))
    rv = _round_sig(np.maximum(a[x].var(axis=(0, 2, 3)), 1e-4))
    w = g.init(f"{pname}.weight", gam)
    b = g.init(f"{pname}.bias", bet)
    mean = g.init(f"{pname}.running_mean", rm)
    var = g.init(f"{pname}.running_var", rv)
    y = g.op("BatchNormalization", [x, w, b, mean, var], scope, epsilon=eps, momentum=0.9)
    ch = (None, slice(None), None, None)
    a[y] = ((a[x] - rm.astype(np.float64)[ch]) / np.sqrt(rv.astype(np.float64)[ch] + eps)
            * gam.astype(np.float64)[ch] + bet.astype(np.float64)[ch])
    return y


def track(g: TorchStyleGraph, out: str, value: np.ndarray) -> str:
    """Record the calibration value of ``out`` (for ops emitted by a builder itself)."""
    acts(g)[out] = value
    return out


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def relu(g: TorchStyleGraph, x: str, scope: str) -> str:
    return track(g, g.op("Relu", [x], scope), np.maximum(acts(g)[x], 0.0))


def relu6(g: TorchStyleGraph, x: str, scope: str) -> str:
    """``nn.ReLU6`` as exported at opset 17: Clip with min/max *inputs*."""
    lo = g.const(0.0, scope, np.float32)
    hi = g.const(6.0, scope, np.float32)
    return track(g, g.op("Clip", [x, lo, hi], scope), np.clip(acts(g)[x], 0.0, 6.0))


def silu(g: TorchStyleGraph, x: str, scope: str) -> str:
    """``nn.SiLU`` as exported at opset 17: x * Sigmoid(x)."""
    s = g.op("Sigmoid", [x], scope)
    v = acts(g)[x]
    return track(g, g.op("Mul", [x, s], scope), v * _sigmoid(v))


def add(g: TorchStyleGraph, a: str, b: str, scope: str) -> str:
    """Residual Add."""
    v = acts(g)
    return track(g, g.op("Add", [a, b], scope), v[a] + v[b])


def classifier(g: TorchStyleGraph, rng, x: str, scope: str, pname: str, fin: int,
               fout: int = NUM_CLASSES, output: str = "logits") -> str:
    """``nn.Linear`` on a [N, fin] input, exported as Gemm(transB=1)."""
    w = g.init(f"{pname}.weight", normal(rng, (fout, fin), np.sqrt(1.0 / fin)))
    b = g.init(f"{pname}.bias", normal(rng, (fout,), 0.01))
    return g.op("Gemm", [x, w, b], scope, outputs=[output], alpha=1.0, beta=1.0, transB=1)


def image_inputs(batch: int = 1, seed: int = 0, size: int = 224) -> dict[str, np.ndarray]:
    """A smooth random image batch, ImageNet-normalised, float32 [batch, 3, size, size].

    Upsampled low-resolution noise in [0, 1] (so neighbouring pixels correlate
    like in a photo), then ``(x - mean) / std`` per channel.
    """
    assert size % 8 == 0
    rng = np.random.default_rng(seed)
    low = rng.random((batch, 3, size // 8, size // 8))
    img = np.repeat(np.repeat(low, 8, axis=2), 8, axis=3)
    img = img + 0.05 * rng.standard_normal(img.shape)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    img = (img - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[None, :, None, None]
    return {"input": np.ascontiguousarray(img, dtype=np.float32)}


def param_count(model) -> int:
    """Number of float parameters (initializers), BatchNorm running statistics excluded."""
    total = 0
    for t in model.graph.initializer:
        if t.name.endswith((".running_mean", ".running_var")):
            continue
        if t.data_type != 1:  # FLOAT only: index buffers are not parameters
            continue
        n = 1
        for d in t.dims:
            n *= d
        total += n
    return total


def maxpool_np(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    """Reference MaxPool2d (padding with -inf)."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return win.max(axis=(4, 5))
