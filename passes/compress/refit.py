"""Layer-wise reconstruction: refit a linear layer's weights by least squares so that, on
calibration data, its output from the compressed model's inputs matches the original model's.

For a consumer whose input lost channels (or whose weights were factorised), with ``x_o`` its
input in the original model and ``x_p`` its input in the compressed one (both with a trailing 1
for the bias), the refit weights are

    W' = argmin_W  sum over samples || [W_o, b_o] x_o - W x_p ||^2
       = (X_p^T X_p + lambda I)^-1 (X_p^T X_o) [W_o, b_o]^T

so only the Gram matrices ``X_p^T X_p`` and ``X_p^T X_o`` are accumulated while the data
streams through both models (the bias row is the bias correction). Convolutions are linear in
their im2col patches, which play the part of ``x``. The models run through the quantizers'
calibration helpers (``calibration.ort_session``, ``with_outputs``, ``CalibrationData``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from infoptc.passes.quantize import calibration

GRAM_BUDGET = 256 * 2**20  # bytes of Gram matrices held at once; more consumers take more passes
MAX_ROWS_PER_SAMPLE = 1024  # im2col positions (or tokens) kept per sample, evenly spaced


@dataclass
class Linear:
    """A layer seen as ``y = W x + b`` on ``features(input)`` rows.

    ``kind``: ``conv`` (attrs of the Conv), ``rows`` (Gemm/MatMul: the last axis is the feature
    axis). ``weight`` [N, F_o] and ``bias`` [N] (None: fit without intercept) are the target
    (original) layer; ``tensor`` is the name of the layer's input in the original model,
    ``compressed`` in the compressed one (None: the same; low-rank's second factor reads another)."""

    key: str
    tensor: str
    kind: str
    weight: np.ndarray
    bias: np.ndarray | None
    kernel: tuple = ()
    strides: tuple = ()
    pads: tuple = ()
    dilations: tuple = ()
    compressed: str | None = None


def features(layer: Linear, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows of features [P, F] of one sample's input (im2col for convolutions)."""
    x = np.asarray(x, np.float64)
    if layer.kind == "rows":
        rows = x.reshape(-1, x.shape[-1])
    else:
        rows = _im2col(x, layer.kernel, layer.strides, layer.pads, layer.dilations)
    if rows.shape[0] > MAX_ROWS_PER_SAMPLE:
        rows = rows[np.sort(rng.choice(rows.shape[0], MAX_ROWS_PER_SAMPLE, replace=False))]
    return rows


def _im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """[N, C, *spatial] -> [N * positions, C * prod(kernel)] in the weight's (C, k...) order."""
    nd = len(kernel)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    n, c = x.shape[:2]
    out = [(x.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    taps = []
    for offs in np.ndindex(*kernel):
        sl = tuple(slice(o * d, o * d + s * (m - 1) + 1, s) for o, d, s, m in zip(offs, dilations, strides, out))
        taps.append(x[(slice(None), slice(None)) + sl])  # [N, C, *out]
    cols = np.stack(taps, axis=2)  # [N, C, taps, *out]
    cols = cols.reshape(n, c * len(taps), -1)
    return cols.transpose(0, 2, 1).reshape(-1, c * len(taps))


def refit(original: onnx.ModelProto, compressed: onnx.ModelProto, layers: list[Linear],
          data: calibration.CalibrationData, start: dict[str, Linear]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The refit ``(W' [N, F_p], b' [N] or None)`` of the layers worth refitting, by key.

    ``start`` holds each layer as it is in the compressed model. The fit is a ridge regression
    shrunk towards it (penalty on W' - W_start); the strength is chosen on held-out samples
    (every second one), among RIDGES and "no refit at all": with few calibration samples for
    many features, an exact fit of the samples generalises worse than the plain compressed
    layer, and then the layer is left as it is (absent from the result)."""
    features_p = {k: v.weight.shape[1] for k, v in start.items()}
    result: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for chunk in _chunks(layers, features_p):
        grams = _accumulate(original, compressed, chunk, data)
        for layer in chunk:
            w0 = start[layer.key]
            intercept = layer.bias is not None
            target = np.concatenate([layer.weight.T, layer.bias[None, :]], 0) if intercept else layer.weight.T
            prior = np.concatenate([w0.weight.T, w0.bias[None, :]], 0) if intercept else w0.weight.T
            folds = [[m if intercept else m[:-1, :-1] for m in fold] for fold in grams[layer.key]]
            ridge = _choose_ridge(folds, target, prior)
            if ridge is None:
                continue
            g, c = folds[0][0], folds[0][1]  # fit on the even samples: the odd ones stay held out (see closer)
            scale = max(float(np.mean(np.diag(g))), 1e-12)
            solved = np.linalg.solve(g + ridge * scale * np.eye(g.shape[0]), c @ target + ridge * scale * prior)
            result[layer.key] = (solved[:-1].T, solved[-1]) if intercept else (solved.T, None)
    return result


RIDGES = (1e-6, 1e-4, 1e-2, 1.0)


def _choose_ridge(folds: list, target: np.ndarray, prior: np.ndarray) -> float | None:
    """The ridge strength whose fit on fold 0 best predicts fold 1; None when the unrefit layer
    (``prior``) does better than all. With one fold only (a single sample), the weakest."""
    if len(folds) < 2:
        return RIDGES[0]
    (g0, c0, _), (g1, c1, o1) = folds
    scale = max(float(np.mean(np.diag(g0))), 1e-12)

    def error(w: np.ndarray) -> float:  # sum over held-out rows of ||x_o T - x_p W||^2
        return float(np.sum(target * (o1 @ target)) - 2 * np.sum(w * (c1 @ target)) + np.sum(w * (g1 @ w)))

    best, best_err = None, error(prior)
    for ridge in RIDGES:
        w = np.linalg.solve(g0 + ridge * scale * np.eye(g0.shape[0]), c0 @ target + ridge * scale * prior)
        err = error(w)
        if err < best_err:
            best, best_err = ridge, err
    return best


def _chunks(layers: list[Linear], features_p: dict[str, int]) -> list[list[Linear]]:
    chunks: list[list[Linear]] = [[]]
    used = 0
    for layer in layers:
        fp, fo = features_p[layer.key] + 1, layer.weight.shape[1] + 1
        cost = 8 * (2 * fp * (fp + fo) + fo * fo)  # two folds of X_p'X_p and X_p'X_o, one of X_o'X_o
        if chunks[-1] and used + cost > GRAM_BUDGET:
            chunks.append([])
            used = 0
        chunks[-1].append(layer)
        used += cost
    return [c for c in chunks if c]


def _accumulate(original, compressed, layers, data) -> dict[str, list[list[np.ndarray]]]:
    """Per layer, per fold (even / odd samples): [X_p'X_p, X_p'X_o, X_o'X_o (odd samples only)],
    with the features' trailing 1."""
    names = sorted({layer.tensor for layer in layers})
    names_p = sorted({layer.compressed or layer.tensor for layer in layers})
    s_o = calibration.ort_session(calibration.with_outputs(original, names))
    s_p = calibration.ort_session(calibration.with_outputs(compressed, names_p))
    grams: dict[str, list[list]] = {layer.key: [] for layer in layers}
    for i, feed in enumerate(data):
        xo = dict(zip(names, s_o.run(names, feed)))
        xp = dict(zip(names_p, s_p.run(names_p, feed)))
        for j, layer in enumerate(layers):
            seed = [i, j]  # the same positions in both models
            fo = _ones(features(layer, xo[layer.tensor], np.random.default_rng(seed)))
            fp = _ones(features(layer, xp[layer.compressed or layer.tensor], np.random.default_rng(seed)))
            folds = grams[layer.key]
            if len(folds) <= i % 2:
                folds.append([0.0, 0.0, 0.0])
            acc = folds[i % 2]
            acc[0] = acc[0] + fp.T @ fp
            acc[1] = acc[1] + fp.T @ fo
            if i % 2:  # X_o'X_o only serves to measure the held-out error
                acc[2] = acc[2] + fo.T @ fo
    return grams


def closer(original: onnx.ModelProto, plain: onnx.ModelProto, refit_model: onnx.ModelProto,
           data: calibration.CalibrationData) -> bool:
    """Whether ``refit_model``'s outputs are nearer the original's than ``plain``'s, on the
    held-out (odd) samples: the sum over float outputs of ||y - y_o||^2 / ||y_o||^2. True with
    fewer than two samples (nothing held out)."""
    names = [o.name for o in original.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    sessions = [calibration.ort_session(m) for m in (original, plain, refit_model)]
    errors, held_out = [0.0, 0.0], 0
    for i, feed in enumerate(data):
        if i % 2 == 0:
            continue
        held_out += 1
        ref, *outs = [s.run(names, feed) for s in sessions]
        for k, out in enumerate(outs):
            errors[k] += sum(float(np.sum((np.asarray(o, np.float64) - r) ** 2) / max(np.sum(np.asarray(r, np.float64) ** 2), 1e-30))
                             for o, r in zip(out, ref))
    return held_out == 0 or errors[1] < errors[0]


def _ones(rows: np.ndarray) -> np.ndarray:
    return np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)


def channel_energy(model: onnx.ModelProto, tensors: dict[str, int], data: calibration.CalibrationData
                   ) -> dict[str, np.ndarray]:
    """Per channel of each tensor (``name -> channel axis``): the mean of x^2 over ``data``."""
    names = sorted(tensors)
    session = calibration.ort_session(calibration.with_outputs(model, names))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feed in data:
        for name, value in zip(names, session.run(names, feed)):
            v = np.moveaxis(np.asarray(value, np.float64), tensors[name], -1)
            v = v.reshape(-1, v.shape[-1])
            sums[name] = sums.get(name, 0) + (v * v).sum(axis=0)
            counts[name] = counts.get(name, 0) + v.shape[0]
    return {n: sums[n] / counts[n] for n in names}
