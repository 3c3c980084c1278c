"""Small CNN trained (numpy only) on scikit-learn's bundled 8x8 digits.

Network: Conv(1->8, 3x3, pad 1) -> Relu -> MaxPool(2x2) -> Flatten -> Gemm(128->10).
Input ``input`` float32 [batch, 1, 8, 8] (pixel values / 16, i.e. in [0, 1]),
output ``logits`` [batch, 10].

Data split: a seeded permutation of the 1797 images, last 20% held out.
Training: float64 numpy, Adam, fixed seed, a couple of seconds on one core.
To keep the exported bytes identical across machines whose BLAS rounds
differently, trained weights are rounded to a 1e-4 grid before the float32
cast.  ``build_dataset()`` returns the held-out split; ``save_dataset(path)``
writes it as a byte-deterministic ``.npz``.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import onnx

from ._graph import FLOAT, TorchStyleGraph, tensor_info

SEED = 7890
CONV_CHANNELS = 8
NUM_CLASSES = 10
HELD_OUT_FRACTION = 0.2
EPOCHS = 25
BATCH_SIZE = 32
LEARNING_RATE = 5e-3
ROUND_DECIMALS = 4


def _load_split():
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    d = load_digits()
    x = (np.asarray(d.images, dtype=np.float64) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(d.target, dtype=np.int64)
    perm = np.random.default_rng(SEED).permutation(len(y))
    n_test = int(round(len(y) * HELD_OUT_FRACTION))
    train, test = perm[:-n_test], perm[-n_test:]
    return x[train], y[train], x[test], y[test]


def build_dataset() -> dict[str, np.ndarray]:
    """Held-out split: x float32 [N, 1, 8, 8], y int64 [N]."""
    _, _, x, y = _load_split()
    return {"x": np.ascontiguousarray(x, dtype=np.float32), "y": y.astype(np.int64)}


def save_dataset(path) -> Path:
    """Write ``build_dataset()`` as an .npz with fixed zip timestamps (same bytes every time)."""
    path = Path(path)
    data = build_dataset()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(data):
            arr_buf = io.BytesIO()
            np.lib.format.write_array(arr_buf, np.ascontiguousarray(data[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, arr_buf.getvalue())
    path.write_bytes(buf.getvalue())
    return path


# --------------------------------------------------------------------- training
def _patches(x: np.ndarray) -> np.ndarray:
    """[N, 1, 8, 8] -> im2col patches [N, 8, 8, 9] for a 3x3 conv with pad 1."""
    xp = np.pad(x[:, 0], ((0, 0), (1, 1), (1, 1)))
    cols = [xp[:, i:i + 8, j:j + 8] for i in range(3) for j in range(3)]
    return np.stack(cols, axis=-1)


def _forward(params, patches):
    wc, bc, wf, bf = params
    n = patches.shape[0]
    pre = patches @ wc.reshape(CONV_CHANNELS, 9).T + bc          # [N, 8, 8, C]
    act = np.maximum(pre, 0.0)
    win = act.reshape(n, 4, 2, 4, 2, CONV_CHANNELS).transpose(0, 1, 3, 5, 2, 4)
    win = win.reshape(n, 4, 4, CONV_CHANNELS, 4)                 # pooling windows last
    arg = np.argmax(win, axis=-1)
    pooled = np.take_along_axis(win, arg[..., None], axis=-1)[..., 0]   # [N, 4, 4, C]
    flat = pooled.transpose(0, 3, 1, 2).reshape(n, -1)           # NCHW flatten order
    logits = flat @ wf.T + bf
    return logits, (pre, arg, flat)


def _grads(params, patches, y):
    wc, bc, wf, bf = params
    n = patches.shape[0]
    logits, (pre, arg, flat) = _forward(params, patches)
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(n), y] -= 1.0
    dlogits = p / n
    dwf = dlogits.T @ flat
    dbf = dlogits.sum(axis=0)
    dpooled = (dlogits @ wf).reshape(n, CONV_CHANNELS, 4, 4).transpose(0, 2, 3, 1)
    dwin = np.zeros((n, 4, 4, CONV_CHANNELS, 4))
    np.put_along_axis(dwin, arg[..., None], dpooled[..., None], axis=-1)
    dact = dwin.reshape(n, 4, 4, CONV_CHANNELS, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    dact = dact.reshape(n, 8, 8, CONV_CHANNELS)
    dpre = dact * (pre > 0)
    dwc = (patches.reshape(-1, 9).T @ dpre.reshape(-1, CONV_CHANNELS)).T.reshape(wc.shape)
    dbc = dpre.sum(axis=(0, 1, 2))
    return [dwc, dbc, dwf, dbf]


def train():
    """Returns (conv_w [8,1,3,3], conv_b [8], fc_w [10,128], fc_b [10]) as float64."""
    x_train, y_train, _, _ = _load_split()
    rng = np.random.default_rng(SEED + 1)
    flat_dim = CONV_CHANNELS * 16
    params = [
        rng.standard_normal((CONV_CHANNELS, 1, 3, 3)) * np.sqrt(2.0 / 9),
        np.zeros(CONV_CHANNELS),
        rng.standard_normal((NUM_CLASSES, flat_dim)) * np.sqrt(1.0 / flat_dim),
        np.zeros(NUM_CLASSES),
    ]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    patches = _patches(x_train)
    n = len(y_train)
    step = 0
    for _ in range(EPOCHS):
        order = rng.permutation(n)
        for start in range(0, n, BATCH_SIZE):
            idx = order[start:start + BATCH_SIZE]
            grads = _grads(params, patches[idx], y_train[idx])
            step += 1
            for i, gr in enumerate(grads):
                m[i] = b1 * m[i] + (1 - b1) * gr
                v[i] = b2 * v[i] + (1 - b2) * gr * gr
                mhat = m[i] / (1 - b1 ** step)
                vhat = v[i] / (1 - b2 ** step)
                params[i] = params[i] - LEARNING_RATE * mhat / (np.sqrt(vhat) + eps)
    return params


def build() -> onnx.ModelProto:
    wc, bc, wf, bf = [np.round(p, ROUND_DECIMALS).astype(np.float32) for p in train()]
    g = TorchStyleGraph()
    wc = g.init("conv.weight", wc)
    bc = g.init("conv.bias", bc)
    x = g.op("Conv", ["input", wc, bc], "/conv",
             dilations=[1, 1], group=1, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    x = g.op("Relu", [x], "/relu")
    x = g.op("MaxPool", [x], "/pool",
             ceil_mode=0, dilations=[1, 1], kernel_shape=[2, 2], pads=[0, 0, 0, 0],
             strides=[2, 2])
    x = g.op("Flatten", [x], "", axis=1)
    wf = g.init("fc.weight", wf)
    bf = g.init("fc.bias", bf)
    g.op("Gemm", [x, wf, bf], "/fc", outputs=["logits"], alpha=1.0, beta=1.0, transB=1)
    return g.make_model(
        "main_graph",
        [tensor_info("input", FLOAT, ["batch", 1, 8, 8])],
        [tensor_info("logits", FLOAT, ["batch", NUM_CLASSES])],
        doc_string="CNN trained on sklearn load_digits (numpy, fixed seed)",
    )


def example_inputs(batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.uniform(0.0, 1.0, (batch, 1, 8, 8)).astype(np.float32)}
