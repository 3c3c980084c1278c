"""prune-channels: remove whole channels, a dependency group at a time.

The groups come from ``channel_groups`` (which channels of which producers, consumers and
per-channel constants go together). Each prunable group ranks its channels by a criterion:

- ``l1`` / ``l2``: norms of the producers' output filters and the consumers' input columns,
  each member scaled by its mean so that no layer dominates by its scale alone;
- ``bn-scale``: |gamma| of the BatchNormalizations in the group (Network Slimming); a group
  without one falls back to l1;
- ``taylor``: the first-order change of the consumers' outputs when the channel is zeroed,
  sqrt(E[x_c^2]) * ||W[:, c]||, with E[x_c^2] measured on the calibration data (no labels or
  loss gradients: for the next linear layer that change is exact, not an approximation).

``ratio`` of the channels go, per group (``scope=per-layer``) or by one threshold over all the
groups' normalised scores (``global``); kept counts are rounded to a multiple of ``round-to``
(SIMD-friendly widths; a group no wider than that is left whole). With ``reconstruct`` each
consumer of pruned channels is refit by least squares on calibration activations (refit.py).
LOSSY: channels whose weights and incoming constants are all zero are removed exactly.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_graphsurgeon as gs
from infoptc.errors import UsageError
from infoptc.ir import from_graph
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from infoptc.passes.quantize import calibration
from infoptc.passes.quantize.common import CALIBRATION_OPTIONS
from infoptc.progress import stage
from infoptc.rewrite import Namer

from . import refit as refit_mod
from .channel_groups import Action, Analysis, Group, channel_groups, const_value, kept_indices, layout_size

log = logging.getLogger("infoptc")

CRITERIA = ("l1", "l2", "bn-scale", "taylor")


def parse_ratio(text) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise ValueError("the ratio of channels to remove must be in [0, 1)")
    return value


def replace_constant(node: gs.Node, index: int, values: np.ndarray, namer: Namer, suffix: str) -> None:
    """Give ``node`` a fresh constant at input ``index`` (the old one may be shared), same dtype."""
    old = node.inputs[index] if len(node.inputs) > index else None
    dtype = np.asarray(const_value(old)).dtype if old is not None and const_value(old) is not None else np.float32
    base = old.name if old is not None and old.name else f"{node.name}_bias"
    const = gs.Constant(namer(base + suffix), np.ascontiguousarray(np.asarray(values).astype(dtype)))
    if old is not None:
        node.inputs[index] = const
    else:
        node.inputs.append(const)


# ----------------------------------------------------------------------------- importance

def _norms(w: np.ndarray, axis: int, kind: str) -> np.ndarray:
    m = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)
    return np.abs(m).sum(1) if kind == "l1" else np.sqrt((m * m).sum(1))


def _scatter(group: Group, layout, values: np.ndarray, find) -> np.ndarray:
    out, offset = np.zeros(group.size), 0
    for s in layout.segs:
        n = s.length * s.inner
        if find(s.space) == group.root:
            out[s.start:s.start + s.length] += values[offset:offset + n].reshape(s.length, s.inner).sum(1)
        offset += n
    return out


def _linear_consumer(action: Action) -> bool:
    return (action.kind == "slice" and action.role == "in" and action.node.op in ("Conv", "Gemm", "MatMul")
            and int(action.node.attrs.get("group", 1)) == 1)


def importance(group: Group, criterion: str, find, energy: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """Scores per channel of the group, and the criterion actually used (bn-scale and taylor
    fall back to l1 where the group has no BatchNormalization or no linear consumer)."""
    score = np.zeros(group.size)
    used = criterion
    for a in group.actions:
        if a.kind != "slice":
            continue
        w = const_value(a.node.inputs[a.index])
        if criterion == "bn-scale":
            ok = a.node.op == "BatchNormalization" and a.index == 1
            values = np.abs(w.astype(np.float64)) if ok else None
        elif criterion == "taylor":
            ok = _linear_consumer(a) and a.node.inputs[0].name in energy
            values = _norms(w, a.axis, "l2") * np.sqrt(energy[a.node.inputs[0].name]) if ok else None
        else:
            values = _norms(w, a.axis, criterion) if a.role in ("in", "out") else None
        if values is None or values.shape[0] != layout_size(a.layout):
            continue
        mean = float(values.mean())
        score += _scatter(group, a.layout, values / mean if mean > 0 else values, find)
    if criterion != "l1" and not score.any():
        return importance(group, "l1", find, energy)[0], "l1"
    return score, used


def keep_count(n: int, ratio: float, round_to: int, blocks: int = 1, unit: int = 1) -> int:
    if unit > 1:  # whole attention heads
        return max(1, int(round(n // unit * (1.0 - ratio)))) * unit
    keep = n * (1.0 - ratio)
    if round_to > 1:
        keep = max(round_to, round(keep / round_to) * round_to)
    keep = int(min(n, max(1, round(keep))))
    if blocks > 1:
        keep = max(1, keep // blocks) * blocks
    return keep


def choose(score: np.ndarray, keep: int, blocks: int = 1, unit: int = 1) -> np.ndarray:
    """The ``keep`` best channels (ties: the lower index), ``keep / blocks`` in each block, or
    the best ``keep / unit`` whole units (heads) by their total score."""
    n = score.shape[0]
    if unit > 1:
        heads = choose(score.reshape(-1, unit).sum(1), keep // unit)
        return (heads[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
    if blocks == 1:
        order = np.lexsort((np.arange(n), -score))
        return np.sort(order[:keep])
    per, size = keep // blocks, n // blocks
    kept = [b * size + np.sort(np.lexsort((np.arange(size), -score[b * size:(b + 1) * size]))[:per])
            for b in range(blocks)]
    return np.concatenate(kept)


def global_keep(groups: list[Group], scores: dict[int, np.ndarray], ratio: float) -> dict[int, int]:
    """Per group, how many channels survive one threshold over all normalised scores."""
    pool = []
    for g in groups:
        s = scores[g.root]
        mean = float(s.mean()) or 1.0
        pool += [(v / mean, g.root, i) for i, v in enumerate(s)]
    pool.sort()
    removed: dict[int, int] = {g.root: 0 for g in groups}
    sizes = {g.root: g.size for g in groups}
    for _, root, _ in pool[: int(len(pool) * ratio)]:
        if sizes[root] - removed[root] > 1:
            removed[root] += 1
    return {root: sizes[root] - removed[root] for root in sizes}


# ----------------------------------------------------------------------------- rewriting

def apply(analysis: Analysis, kept: dict[int, np.ndarray], namer: Namer, opset: int) -> None:
    """Carry out every action of the analysis for the kept channels (groups absent keep all)."""
    find = analysis.find
    for a in analysis.actions:
        if a.kind == "split":
            sizes = [len(kept_indices(lay, kept, find)) for lay in a.layouts]
            if sizes != [layout_size(lay) for lay in a.layouts]:
                _set_split(a.node, sizes, opset, namer)
            continue
        idx = kept_indices(a.layout, kept, find)
        if len(idx) == layout_size(a.layout):
            continue
        if a.kind == "shape":
            if a.tensor.shape is not None and len(a.tensor.shape) > a.layout.axis:
                shape = list(a.tensor.shape)
                shape[a.layout.axis] = len(idx)
                a.tensor.shape = shape
        elif a.kind == "slice":
            w = const_value(a.node.inputs[a.index])
            replace_constant(a.node, a.index, np.take(w, idx, axis=a.axis), namer, "_pruned")
        elif a.kind == "group":
            a.node.attrs["group"] = len(idx)
        elif a.kind == "reshape":  # an entry of a Reshape target (or of a Concat building one)
            target = np.array(const_value(a.node.inputs[a.index]))
            flat = target.reshape(-1)
            if flat[a.axis] > 0:
                flat[a.axis] = len(idx)
                replace_constant(a.node, a.index, flat.reshape(target.shape), namer, "_pruned")
        elif a.kind == "grouped-in":
            w = const_value(a.node.inputs[1])
            per, g = w.shape[1], a.groups
            out_per = w.shape[0] // g
            parts = []
            for b in range(g):
                local = idx[(idx >= b * per) & (idx < (b + 1) * per)] - b * per
                parts.append(w[b * out_per:(b + 1) * out_per][:, local])
            replace_constant(a.node, 1, np.concatenate(parts, 0), namer, "_pruned")


def _set_split(node: gs.Node, sizes: list[int], opset: int, namer: Namer) -> None:
    """Split sizes as the node's opset takes them: an input from 13 on, else the attribute."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        replace_constant(node, 1, np.array(sizes, np.int64), namer, "_pruned")
    elif opset >= 13:
        node.attrs.pop("num_outputs", None)
        node.attrs.pop("split", None)
        node.inputs.append(gs.Constant(namer(f"{node.name}_split"), np.array(sizes, np.int64)))
    else:
        node.attrs["split"] = sizes


# ----------------------------------------------------------------------------- reconstruction

def as_linear(node: gs.Node) -> refit_mod.Linear | None:
    """The layer's current weights as ``y = W x + b`` (W [N, F])."""
    w = const_value(node.inputs[1]).astype(np.float64)
    if node.op == "Conv":
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return None
        nd = w.ndim - 2
        b = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(w.shape[0])
        return refit_mod.Linear(node.name, node.inputs[0].name, "conv", w.reshape(w.shape[0], -1),
                                np.asarray(b, np.float64), tuple(w.shape[2:]),
                                tuple(node.attrs.get("strides", [1] * nd)), tuple(node.attrs.get("pads", [0] * 2 * nd)),
                                tuple(node.attrs.get("dilations", [1] * nd)))
    if node.op == "Gemm":
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        weff = alpha * (w if node.attrs.get("transB", 0) else w.T)
        c = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(1)
        if c.ndim == 2 and c.shape[0] > 1:
            return None
        b = beta * np.broadcast_to(np.asarray(c, np.float64).reshape(-1), (weff.shape[0],))
        return refit_mod.Linear(node.name, node.inputs[0].name, "rows", weff, np.array(b))
    if node.op == "MatMul":
        add = _bias_add(node)
        b = None if add is None else np.asarray(const_value(add[0].inputs[add[1]]), np.float64)
        return refit_mod.Linear(node.name, node.inputs[0].name, "rows", w.T, b)
    return None


def _bias_add(node: gs.Node) -> tuple[gs.Node, int] | None:
    """The Add of a per-output constant that alone reads a MatMul's output, and its input index."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    for i, t in enumerate(add.inputs):
        v = const_value(t)
        if t is not out and v is not None and v.ndim == 1 and v.shape[0] == const_value(node.inputs[1]).shape[1]:
            return add, i
    return None


def write_linear(node: gs.Node, w: np.ndarray, b: np.ndarray | None, namer: Namer, suffix: str) -> None:
    """Store refit weights ``W`` [N, F] (and bias) back into the layer in its own layout."""
    old = const_value(node.inputs[1])
    if node.op == "Conv":
        replace_constant(node, 1, w.reshape((w.shape[0], -1) + old.shape[2:]), namer, suffix)
        replace_constant(node, 2, b, namer, suffix)
    elif node.op == "Gemm":
        replace_constant(node, 1, w if node.attrs.get("transB", 0) else w.T, namer, suffix)
        node.attrs["alpha"], node.attrs["beta"] = 1.0, 1.0
        replace_constant(node, 2, b, namer, suffix)
    else:
        replace_constant(node, 1, w.T, namer, suffix)
        if b is not None:
            add, index = _bias_add(node)
            replace_constant(add, index, b, namer, suffix)


def reconstruct(original, graph: gs.Graph, nodes: list[gs.Node], targets: dict[str, refit_mod.Linear],
                data, namer: Namer) -> tuple[int, bool]:
    """Refit ``nodes`` (already pruned) to match ``targets`` (their original layers, rows cut to
    the outputs they keep), in stages: a layer is refit on the inputs its already refit
    predecessors give, never on inputs that a later refit would change (refit.py leaves a layer
    alone where held-out samples say refitting it hurts). Layer by layer is not the whole model:
    where the refit model's outputs end up further from the original's than the plainly pruned
    model's on the held-out samples, every refit is undone. Returns (layers refit, undone)."""
    done, saved = 0, []
    pruned = from_graph(graph)
    stages = refit_stages(graph, nodes)
    for i, layers_of in enumerate(stages, 1):
        layers = [dataclasses.replace(targets[n.name], compressed=n.inputs[0].name) for n in layers_of]
        start = {n.name: as_linear(n) for n in layers_of}
        with stage(f"reconstructing: refitting {len(layers)} layer(s), stage {i} of {len(stages)}"):
            solved = refit_mod.refit(original, from_graph(graph), layers, data, start)
        for node in layers_of:
            if node.name in solved:
                add = _bias_add(node) if node.op == "MatMul" else None
                saved += [(n, list(n.inputs), dict(n.attrs)) for n in [node] + ([add[0]] if add else [])]
                write_linear(node, *solved[node.name], namer, "_refit")
                done += 1
    if done and not refit_mod.closer(original, pruned, from_graph(graph), data):
        for node, inputs, attrs in reversed(saved):
            while len(node.inputs) > len(inputs):
                node.inputs.pop()
            for j, t in enumerate(inputs):
                node.inputs[j] = t
            node.attrs.clear()
            node.attrs.update(attrs)
        return 0, True
    return done, False


def refit_stages(graph: gs.Graph, nodes: list[gs.Node]) -> list[list[gs.Node]]:
    """``nodes`` in graph order, cut into stages of layers that do not feed one another."""
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    stages: list[list[gs.Node]] = [[]]
    for node in sorted(nodes, key=lambda n: order[id(n)]):
        above = upstream(node)
        if any(id(m) in above for m in stages[-1]):
            stages.append([])
        stages[-1].append(node)
    return [s for s in stages if s]


def upstream(node: gs.Node) -> set[int]:
    """ids of every node whose output reaches ``node``."""
    seen: set[int] = set()
    todo = [t for t in node.inputs]
    while todo:
        t = todo.pop()
        for producer in t.inputs:
            if id(producer) not in seen:
                seen.add(id(producer))
                todo.extend(producer.inputs)
    return seen


# ----------------------------------------------------------------------------- the pass

@register_pass
class PruneChannels(Pass):
    name = "prune-channels"
    summary = "remove whole channels by dependency group (structured pruning), optionally refitting the next layers"
    contract = Contract.LOSSY
    reports_changes = True
    options = {
        "ratio": Option(0.3, "fraction of each group's channels to remove, in [0, 1)", parse=parse_ratio),
        "criterion": Option("l1", "channel importance: l1, l2, bn-scale, taylor (needs calibration)", choices=CRITERIA),
        "round-to": Option(8, "keep a multiple of this many channels (1: any count)"),
        "scope": Option("per-layer", "per-layer: the ratio in every group; global: one threshold over all",
                        choices=("per-layer", "global")),
        "reconstruct": Option(False, "refit the consumers of pruned channels by least squares (needs calibration)"),
        **CALIBRATION_OPTIONS,
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        criterion, ratio, round_to = self.opts["criterion"], self.opts["ratio"], self.opts["round-to"]
        if round_to < 1:
            raise UsageError("prune-channels: round-to must be at least 1")
        needs_data = criterion == "taylor" or self.opts["reconstruct"]
        source = calibration.calibration_source(ctx.options, self.opts, f"{self.name} "
                                                f"({'criterion taylor' if criterion == 'taylor' else 'reconstruct'})"
                                                ) if needs_data else None
        analysis = channel_groups(graph)
        groups = [g for g in analysis.groups if g.prunable]
        counters = {"groups": len(analysis.groups), "prunable_groups": len(groups)}
        if not groups:
            log.warning("prune-channels: no prunable channel group (see `infoptc inspect MODEL --prune-groups`); "
                        "the model is unchanged")
            return PassResult(False, counters)
        original = from_graph(graph) if needs_data else None
        data = (calibration.CalibrationData(source, calibration.model_inputs(original), self.opts["samples"])
                if needs_data else None)
        energy: dict[str, np.ndarray] = {}
        if criterion == "taylor":
            tensors = {a.node.inputs[0].name: a.layout.axis for g in groups for a in g.actions if _linear_consumer(a)}
            energy = refit_mod.channel_energy(original, tensors, data) if tensors else {}
        scores, used = {}, {}
        for g in groups:
            scores[g.root], used[g.root] = importance(g, criterion, analysis.find, energy)
        if self.opts["scope"] == "global":
            raw = global_keep(groups, scores, ratio)
            counts = {g.root: keep_count(g.size, 1.0 - raw[g.root] / g.size, round_to, g.blocks, g.unit)
                      for g in groups}
        else:
            counts = {g.root: keep_count(g.size, ratio, round_to, g.blocks, g.unit) for g in groups}
        kept = {g.root: choose(scores[g.root], counts[g.root], g.blocks, g.unit) for g in groups
                if counts[g.root] < g.size}
        counters["pruned_groups"] = len(kept)
        counters["channels_removed"] = sum(g.size - counts[g.root] for g in groups)
        counters["fallback_l1"] = sum(1 for g in groups if used[g.root] != criterion)
        ctx.reports[self.name] = {
            "criterion": criterion, "ratio": ratio, "scope": self.opts["scope"], "round_to": round_to,
            "groups": [{"producers": g.producers, "channels": g.size, "kept": counts[g.root],
                        "criterion": used[g.root]} for g in groups],
        }
        if not kept:
            log.warning("prune-channels: no group is wide enough to remove channels at ratio %g with round-to %d; "
                        "the model is unchanged", ratio, round_to)
            return PassResult(False, counters)
        consumers = self._consumers_to_refit(analysis, kept) if self.opts["reconstruct"] else []
        namer = Namer([graph])
        apply(analysis, kept, namer, graph.opset)
        if consumers:
            targets = {}
            for node, target in consumers:
                out_idx = self._out_rows(analysis, node, kept)
                if out_idx is not None:
                    target.weight, target.bias = target.weight[out_idx], None if target.bias is None else target.bias[out_idx]
                targets[node.name] = target
            counters["refit"], undone = reconstruct(original, graph, [n for n, _ in consumers], targets, data, namer)
            counters["refit_undone"] = int(undone)
            if undone:
                log.warning("prune-channels: the refit layers put the model's outputs further from the original's "
                            "on held-out calibration samples than plain pruning does; reconstruction undone")
        return PassResult(True, counters)

    @staticmethod
    def _consumers_to_refit(analysis: Analysis, kept) -> list[tuple[gs.Node, refit_mod.Linear]]:
        """The linear layers whose inputs lose channels, with their original weights."""
        out, seen = [], set()
        for a in analysis.actions:
            if not _linear_consumer(a) or id(a.node) in seen:
                continue
            if len(kept_indices(a.layout, kept, analysis.find)) == layout_size(a.layout):
                continue
            linear = as_linear(a.node)
            if linear is not None:
                seen.add(id(a.node))
                out.append((a.node, linear))
        return out

    @staticmethod
    def _out_rows(analysis: Analysis, node: gs.Node, kept) -> np.ndarray | None:
        for a in analysis.actions:
            if a.kind == "slice" and a.role == "out" and a.node is node:
                return kept_indices(a.layout, kept, analysis.find)
        return None
