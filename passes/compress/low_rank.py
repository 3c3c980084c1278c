"""low-rank: factorise the weight matrices of Gemm and MatMul by truncated SVD.

    x @ W  (W [K, N])   ->   (x @ A) @ B,   A = U_r S_r [K, r],  B = V_r^T [r, N]

The rank ``r`` keeps ``energy`` of the squared singular values, or ``ratio`` of the full rank;
a layer is factorised only where that saves work, r < K N / (K + N) (unless
``only-if-cheaper=false``). With ``activation-aware`` the SVD is of ``diag(s) W``, ``s`` the RMS
of each input feature over the calibration data, and ``A`` is scaled back by ``1/s``: the
truncation then drops what the data excite least (as ASVD does). With ``reconstruct`` the
second factor (and the bias) is refit by least squares so that the layer's output on the
calibration data matches the original's (prune-channels' reconstruction, same guard). A Gemm becomes a MatMul
(with ``alpha``) feeding a Gemm (with the bias and ``beta``). Convolutions are not factorised.
LOSSY; at full rank the product equals W to fp32 rounding.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.ir import from_graph
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from infoptc.passes.quantize import calibration
from infoptc.passes.quantize.common import CALIBRATION_OPTIONS
from infoptc.rewrite import Namer

from . import refit
from .channel_groups import const_value
from .prune_channels import as_linear, reconstruct

log = logging.getLogger("infoptc")


def _fraction(text) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError("expected a fraction in (0, 1]")
    return value


def factorisable(node: gs.Node) -> np.ndarray | None:
    """The [K, N] matrix a Gemm (transA=0) or MatMul multiplies its activation by, or None."""
    if node.op not in ("Gemm", "MatMul") or len(node.inputs) < 2 or isinstance(node.inputs[0], gs.Constant):
        return None
    w = const_value(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype != np.float32 or node.attrs.get("transA", 0):
        return None
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return w.T
    return w


def choose_rank(s: np.ndarray, energy: float | None, ratio: float | None) -> int:
    if ratio is not None:
        return max(1, int(round(ratio * len(s))))
    cum = np.cumsum(s.astype(np.float64) ** 2)
    return int(min(len(s), np.searchsorted(cum, energy * cum[-1] * (1 - 1e-12)) + 1))


def factorise(w: np.ndarray, rank_of, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(A [K, r], B [r, N]) with A @ B ~ W; ``scale`` per row of W (activation-aware)."""
    w64 = w.astype(np.float64)
    s_rows = np.ones(w.shape[0]) if scale is None else np.maximum(scale, 1e-12 * max(scale.max(), 1e-30))
    u, s, vt = np.linalg.svd(w64 * s_rows[:, None], full_matrices=False)
    r = rank_of(s)
    return (u[:, :r] * s[:r]) / s_rows[:, None], vt[:r]


@register_pass
class LowRank(Pass):
    name = "low-rank"
    summary = "factorise Gemm/MatMul weights by truncated SVD where the two thinner products cost less"
    contract = Contract.LOSSY
    reports_changes = True
    options = {
        "energy": Option(0.99, "keep this fraction of the squared singular values (ignored when ratio is set)",
                         parse=_fraction),
        "ratio": Option(0.0, "keep this fraction of the full rank instead (0: use energy)",
                        parse=lambda t: 0.0 if float(t) == 0 else _fraction(t)),
        "only-if-cheaper": Option(True, "factorise only where r < K N / (K + N)"),
        "activation-aware": Option(False, "scale weight rows by the inputs' RMS on calibration data before the SVD"),
        "min-size": Option(4096, "leave weight matrices with fewer elements alone"),
        "reconstruct": Option(False, "refit the second factor (and bias) by least squares on calibration data"),
        **CALIBRATION_OPTIONS,
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        targets = [(n, w) for n in graph.nodes if (w := factorisable(n)) is not None and w.size >= self.opts["min-size"]]
        counters = {"candidates": len(targets), "factorised": 0, "skipped_not_cheaper": 0}
        if not targets:
            log.warning("low-rank: no Gemm/MatMul with a constant fp32 weight matrix; the model is unchanged")
            return PassResult(False, counters)
        scales: dict[str, np.ndarray] = {}
        model = data = None
        if self.opts["activation-aware"] or self.opts["reconstruct"]:
            source = calibration.calibration_source(ctx.options, self.opts, f"{self.name} (activation-aware "
                                                    "or reconstruct)")
            model = from_graph(graph)
            data = calibration.CalibrationData(source, calibration.model_inputs(model), self.opts["samples"])
        if self.opts["activation-aware"]:
            tensors = {n.inputs[0].name: (n.inputs[0].shape and len(n.inputs[0].shape) or 2) - 1 for n, _ in targets}
            scales = {k: np.sqrt(v) for k, v in refit.channel_energy(model, tensors, data).items()}
        ratio = self.opts["ratio"] or None
        energy = None if ratio else self.opts["energy"]
        namer = Namer([graph])
        report, refit_nodes, originals = [], [], {}
        for node, w in targets:
            k, n = w.shape
            a, b = factorise(w, lambda s: choose_rank(s, energy, ratio), scales.get(node.inputs[0].name))
            r = a.shape[1]
            cheaper = r * (k + n) < k * n
            report.append({"node": node.name, "shape": [k, n], "rank": r, "factorised": bool(cheaper)
                           or not self.opts["only-if-cheaper"]})
            if not cheaper and self.opts["only-if-cheaper"]:
                counters["skipped_not_cheaper"] += 1
                continue
            if self.opts["reconstruct"]:
                originals[node.name] = as_linear(node)
                refit_nodes.append(node)
            self._rewrite(graph, node, a, b, namer)
            counters["factorised"] += 1
        if refit_nodes:
            graph.toposort()  # the first factors were appended at the end
            counters["refit"], undone = reconstruct(model, graph, refit_nodes, originals, data, namer)
            counters["refit_undone"] = int(undone)
        ctx.reports[self.name] = {"layers": report}
        return PassResult(counters["factorised"] > 0, counters)

    @staticmethod
    def _rewrite(graph: gs.Graph, node: gs.Node, a: np.ndarray, b: np.ndarray, namer: Namer) -> None:
        x, y = node.inputs[0], node.outputs[0]
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        a_c = gs.Constant(namer(f"{node.inputs[1].name}_lowrank_a"), np.ascontiguousarray(a * alpha, np.float32))
        b_c = gs.Constant(namer(f"{node.inputs[1].name}_lowrank_b"), np.ascontiguousarray(b, np.float32))
        shape = None if x.shape is None else list(x.shape[:-1]) + [a.shape[1]]
        mid = gs.Variable(namer(f"{y.name}_lowrank"), np.float32, shape)
        graph.nodes.append(gs.Node("MatMul", namer(f"{node.name}_lowrank_a"), inputs=[x, a_c], outputs=[mid]))
        node.inputs[0], node.inputs[1] = mid, b_c
        if node.op == "Gemm":
            node.attrs["alpha"], node.attrs["transB"] = 1.0, 0
