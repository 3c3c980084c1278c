"""Range observers: what an activation tensor's float range is taken to be.

Each observer sees the calibration batches of one tensor as they stream past and keeps a
fixed-size summary (never the data): min/max, and a histogram whose range widens as new
extremes arrive. ``range()`` turns the summary into the ``(lo, hi)`` that the quantizer maps
onto the integer grid:

- ``minmax``: the extremes seen.
- ``percentile``: the values at the given low/high percentiles (outliers clipped).
- ``entropy``: the clipping threshold whose quantized histogram has the least KL divergence
  from the observed one (TensorRT's calibration; Migacz, "8-bit Inference with TensorRT", 2017).
- ``mse``: the clipping range that minimizes the expected squared error of quantizing the
  observed histogram (rounding noise inside the range, clipping error outside it).
"""

from __future__ import annotations

import numpy as np

METHODS = ("minmax", "percentile", "entropy", "mse")
BINS = 2048  # histogram resolution; 2048 as TensorRT and ONNX Runtime's calibrators use


class Observer:
    """Streaming summary of one tensor: extremes plus a histogram over [lo, hi]."""

    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf
        self.hist: np.ndarray | None = None  # counts over [edge_lo, edge_hi]
        self.edge_lo = 0.0
        self.edge_hi = 0.0
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.count += x.size
        if self.hist is None:
            self.edge_lo, self.edge_hi = _widen(lo, hi)
            self.hist = np.zeros(BINS, dtype=np.float64)
        elif lo < self.edge_lo or hi > self.edge_hi:
            self._rebin(*_widen(min(lo, self.edge_lo), max(hi, self.edge_hi)))
        counts, _ = np.histogram(x, bins=BINS, range=(self.edge_lo, self.edge_hi))
        self.hist += counts

    def _rebin(self, new_lo: float, new_hi: float) -> None:
        """Spread the old bins' counts over the wider range (each old bin lands where its centre falls)."""
        old_width = (self.edge_hi - self.edge_lo) / BINS
        centres = self.edge_lo + (np.arange(BINS) + 0.5) * old_width
        idx = np.clip(((centres - new_lo) / (new_hi - new_lo) * BINS).astype(np.int64), 0, BINS - 1)
        hist = np.zeros(BINS, dtype=np.float64)
        np.add.at(hist, idx, self.hist)
        self.hist, self.edge_lo, self.edge_hi = hist, new_lo, new_hi

    # ------------------------------------------------------------------ ranges

    def range(self, method: str = "minmax", percentile: float = 99.999) -> tuple[float, float]:
        """The range ``method`` chooses from what was observed (remembered until the next update:
        quantize-auto asks again for every assignment it tries)."""
        key = (method, percentile, self.count, self.lo, self.hi)
        memo = self.__dict__.setdefault("_ranges", {})
        if key not in memo:
            memo[key] = self._range(method, percentile)
        return memo[key]

    def _range(self, method: str, percentile: float) -> tuple[float, float]:
        if self.count == 0:
            raise ValueError("observer saw no data")
        if method == "minmax" or self.hi <= self.lo:
            return self.lo, self.hi
        if method == "percentile":
            return self._percentile(percentile)
        if method == "entropy":
            return self._entropy()
        if method == "mse":
            return self._mse()
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")

    def _edges(self) -> np.ndarray:
        return np.linspace(self.edge_lo, self.edge_hi, BINS + 1)

    def _percentile(self, pct: float) -> tuple[float, float]:
        cdf = np.cumsum(self.hist) / self.hist.sum()
        edges = self._edges()
        tail = (100.0 - pct) / 100.0
        lo = edges[int(np.searchsorted(cdf, tail, side="left"))] if self.lo < 0 else self.lo
        hi = edges[min(int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1, BINS)]
        return max(float(lo), self.lo), min(float(hi), self.hi)

    def _entropy(self) -> tuple[float, float]:
        """TensorRT's threshold: fold the histogram onto |x| (1024 bins up to max |x|), and for
        each candidate threshold from 64 bins up, compare the clipped distribution P with its
        quantization Q (128 levels over [-T, T]); keep the threshold of least KL(P || Q)."""
        edges = self._edges()
        centres = (edges[:-1] + edges[1:]) / 2
        top = max(abs(self.lo), abs(self.hi))
        if top == 0:
            return self.lo, self.hi
        # |x| in BINS / 2 bins: the resolution of TensorRT's and ONNX Runtime's symmetric 2048-bin
        # histogram, on which the KL trade-off was tuned (finer bins make it clip harder)
        half = BINS // 2
        idx = np.minimum((np.abs(centres) / top * half).astype(np.int64), half - 1)
        folded = np.bincount(idx, weights=self.hist, minlength=half)
        best_i, best_cost = half, np.inf
        for i in range(ENTROPY_LEVELS, half + 1, 8):
            cost = _kl_threshold(folded, i)
            if cost < best_cost:
                best_i, best_cost = i, cost
        threshold = top * best_i / half
        return max(self.lo, -threshold), min(self.hi, threshold)

    def _mse(self) -> tuple[float, float]:
        """Shrink the range toward zero in 96 steps and keep the one of least expected squared
        error (``_mse_cost``).

        The range keeps the sign structure of the data: a one-signed tensor (after a Relu) is
        clipped only at its far end; a two-signed one symmetrically around zero in |x| terms
        scaled to each side, as asymmetric uint8 maps both ends."""
        edges = self._edges()
        centres = (edges[:-1] + edges[1:]) / 2
        best, best_cost = (self.lo, self.hi), np.inf
        for frac in np.linspace(1.0, 0.05, 96):
            lo, hi = self.lo * frac, self.hi * frac
            if self.lo >= 0:
                lo = self.lo
            if self.hi <= 0:
                hi = self.hi
            c = _mse_cost(self.hist, centres, lo, hi)
            if c < best_cost:
                best, best_cost = (lo, hi), c
        return float(best[0]), float(best[1])


def _widen(lo: float, hi: float) -> tuple[float, float]:
    """A histogram range that contains [lo, hi] and is never empty."""
    if hi <= lo:
        pad = max(abs(lo), 1e-6) * 1e-3
        return lo - pad, hi + pad
    return lo, hi


LEVELS = 255  # uint8 steps


def _mse_cost(hist, centres, lo, hi) -> float:
    step = (hi - lo) / LEVELS
    clipped = np.clip(centres, lo, hi)
    rounding = np.where((centres >= lo) & (centres <= hi), step * step / 12.0, 0.0)
    return float(np.sum(hist * ((centres - clipped) ** 2 + rounding)))


ENTROPY_LEVELS = 64  # levels per sign: 128 over [-T, T], as TensorRT and ONNX Runtime merge the histogram


def _kl_threshold(folded: np.ndarray, i: int) -> float:
    """KL(P || Q) for the threshold at bin ``i`` of a histogram of |x|: P is bins [0, i) with the
    mass beyond added to its last bin; Q is bins [0, i) *without* that mass, merged into 64
    levels and spread back evenly over each level's non-empty bins."""
    raw = folded[:i]
    p = raw.copy()
    p[-1] += folded[i:].sum()
    groups = (np.arange(i) * ENTROPY_LEVELS) // i
    nonzero = raw > 0
    mass = np.bincount(groups, weights=raw, minlength=ENTROPY_LEVELS)
    size = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=ENTROPY_LEVELS)
    q = np.where(nonzero, mass[groups] / np.maximum(size[groups], 1), 0.0)
    if p.sum() == 0 or q.sum() == 0:
        return np.inf
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    q = np.where(m & (q == 0), 1e-12, q)  # the outlier bin: mass P has and Q lacks
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def quant_params(lo: float, hi: float, *, signed: bool = False, symmetric: bool = False,
                 reduce_range: bool = False) -> tuple[np.float32, int]:
    """(scale, zero point) mapping [lo, hi] onto uint8 (or int8) so that 0.0 is exact."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if signed:
        qmin, qmax = (-64, 63) if reduce_range else (-128, 127)
    else:
        qmin, qmax = (0, 127) if reduce_range else (0, 255)
    if symmetric:
        bound = max(abs(lo), abs(hi))
        scale = bound / ((qmax - qmin) / 2) if bound > 0 else 1.0
        zp = 0 if signed else (qmax + qmin + 1) // 2
    else:
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return np.float32(scale), zp
