"""cluster-weights: weight sharing, a k-means codebook of ``clusters`` values per weight tensor.

Each fp32 weight of a Conv, ConvTranspose, Gemm or MatMul with at least ``min-size`` elements
is replaced by its nearest codebook entry (1-D k-means, Lloyd's iterations from evenly spaced
quantiles: deterministic). ``store=gather`` keeps uint8 indices and the codebook in the model and
expands them with Cast + Gather (ONNX Runtime folds those once, when the session starts: the
file is about 4x smaller, the speed the same); ``store=expanded`` writes the clustered values
as ordinary tensors (no smaller on disk, but only ``clusters`` distinct values: it compresses
well, and a later int8 quantizer loses nothing more). LOSSY; a tensor that already has at most
``clusters`` distinct values is reproduced exactly.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.errors import UsageError
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from infoptc.rewrite import Namer

from .weights import WEIGHT_INPUT, weight_tensors


FIT_SAMPLE = 200_000  # values the centres are fit on (evenly spaced in sorted order); all are assigned


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(codebook [<= k] sorted, index of each value) by Lloyd's iterations from k evenly spaced
    centres between the 0.5/k and 1 - 0.5/k quantiles."""
    flat = values.astype(np.float64).reshape(-1)
    distinct = np.unique(flat)
    if len(distinct) <= k:
        return distinct, np.searchsorted(distinct, flat)
    fit = np.sort(flat)
    if fit.size > FIT_SAMPLE:
        fit = fit[np.linspace(0, fit.size - 1, FIT_SAMPLE).astype(np.int64)]
    centers = np.linspace(*np.quantile(fit, [0.5 / k, 1 - 0.5 / k]), k)
    for _ in range(iterations):
        index = np.searchsorted((centers[1:] + centers[:-1]) / 2, fit)
        counts = np.bincount(index, minlength=len(centers))
        sums = np.bincount(index, weights=fit, minlength=len(centers))
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centers)
        if np.allclose(updated, centers, rtol=0, atol=0):
            break
        centers = np.sort(updated)
    index = np.searchsorted((centers[1:] + centers[:-1]) / 2, flat)
    return centers, index


@register_pass
class ClusterWeights(Pass):
    name = "cluster-weights"
    summary = "share weights: replace each weight tensor by a k-means codebook of a few values (smaller file)"
    contract = Contract.LOSSY
    reports_changes = True
    options = {
        "clusters": Option(16, "codebook entries per tensor (2..256)"),
        "store": Option("gather", "gather: uint8 indices + codebook, expanded at load; expanded: plain tensors",
                        choices=("gather", "expanded")),
        "min-size": Option(1024, "leave weights with fewer elements alone"),
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        k = self.opts["clusters"]
        if not 2 <= k <= 256:
            raise UsageError(f"cluster-weights: clusters must be in 2..256 (uint8 indices), got {k}")
        namer = Namer([graph])
        done: dict[int, gs.Tensor] = {}
        counters = {"tensors": 0, "bytes_saved": 0}
        for node, w in weight_tensors(graph, self.opts["min-size"]):
            old = node.inputs[WEIGHT_INPUT[node.op]]
            if id(old) not in done:
                codebook, index = kmeans_1d(w, k)
                done[id(old)] = self._store(graph, old, w, codebook.astype(np.float32), index, namer)
                counters["tensors"] += 1
                if self.opts["store"] == "gather":
                    counters["bytes_saved"] += w.nbytes - w.size - codebook.size * 4
            node.inputs[WEIGHT_INPUT[node.op]] = done[id(old)]
        return PassResult(counters["tensors"] > 0, counters)

    def _store(self, graph: gs.Graph, old: gs.Tensor, w: np.ndarray, codebook: np.ndarray, index: np.ndarray,
               namer: Namer) -> gs.Tensor:
        if self.opts["store"] == "expanded":
            return gs.Constant(namer(f"{old.name}_clustered"), np.ascontiguousarray(codebook[index].reshape(w.shape)))
        idx = gs.Constant(namer(f"{old.name}_indices"), np.ascontiguousarray(index.astype(np.uint8).reshape(w.shape)))
        book = gs.Constant(namer(f"{old.name}_codebook"), codebook)
        idx32 = gs.Variable(namer(f"{old.name}_indices_i32"), np.int32, list(w.shape))
        out = gs.Variable(namer(f"{old.name}_shared"), np.float32, list(w.shape))
        graph.nodes.append(gs.Node("Cast", namer(f"{old.name}_cast"), {"to": 6}, inputs=[idx], outputs=[idx32]))
        graph.nodes.append(gs.Node("Gather", namer(f"{old.name}_gather"), {"axis": 0}, inputs=[book, idx32],
                                   outputs=[out]))
        return out
