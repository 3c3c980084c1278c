"""cse: common-subexpression elimination.

Two nodes compute the same value when they have the same op, domain, attributes and inputs;
the later one is removed and its users read the earlier one's outputs. One sweep in
topological order catches whole duplicated chains, since the users of a merged node then have
identical inputs too. Constants count as identical inputs when their dtype, shape and bytes
match, so ``Add(x, c1)`` and ``Add(x, c2)`` with equal ``c1``/``c2`` merge, and Constant nodes
with identical values merge.

Left alone: non-deterministic ops (two RandomNormal nodes draw different numbers), ops outside
the standard domains (a custom op may keep state), and nodes with subgraph attributes (graphs
are not compared). Each subgraph is processed on its own. Where both duplicates are graph
outputs both stay. Contract: ``exact``.
"""

from __future__ import annotations

import struct
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from infoptc.pass_manager import Contract, Pass, PassContext, PassResult, register_pass
from infoptc.passes.cleanup.dedup_initializers import ConstantPool, constant_bytes
from infoptc.passes.fold.fold_constants import NONDETERMINISTIC_OPS
from infoptc.rewrite import Detacher, graphs_of, numpy_dtype, overridable, replace_uses

CSE_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", None)


class _Unhashable(Exception):
    """An attribute we do not compare (a subgraph): the node is not a candidate."""


def _attr_key(value):
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, np.integer)):
        return ("i", int(value))
    if isinstance(value, (float, np.floating)):
        return ("f", struct.pack("<d", float(value)))  # by bits: NaN == NaN, 0.0 != -0.0
    if isinstance(value, (str, bytes)):
        return ("s", value)
    if isinstance(value, (list, tuple)):
        return ("l", tuple(_attr_key(v) for v in value))
    if isinstance(value, gs.Constant):
        dtype = numpy_dtype(value)
        if dtype is None:
            raise _Unhashable
        return ("t", dtype.str, tuple(value.shape), bytes(constant_bytes(value)))
    if isinstance(value, np.ndarray):
        return ("a", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, onnx.TypeProto):
        return ("type", value.SerializeToString())
    if isinstance(value, gs.Node.AttributeRef):
        return ("ref", value.name, str(value.type))
    raise _Unhashable  # gs.Graph and anything we do not know


@register_pass
class CommonSubexpressionElimination(Pass):
    name = "cse"
    summary = "merge nodes with the same op, attributes and inputs, and constants with identical values"
    contract = Contract.EXACT
    reports_changes = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counters = Counter({"merged_nodes": 0})
        graphs = graphs_of(graph, ctx)
        locked = overridable(graphs)
        pool, detacher = ConstantPool(max_bytes=None), Detacher()
        for g in graphs:
            self._run_graph(g, pool, locked, detacher, counters)
        detacher.flush()
        return PassResult(changed=counters["merged_nodes"] > 0, counters=dict(counters))

    def _run_graph(self, graph: gs.Graph, pool: ConstantPool, locked: set[int], detacher: Detacher,
                   counters: Counter) -> None:
        outputs = {id(t) for t in graph.outputs}
        table: dict[tuple, gs.Node] = {}
        input_key = self._input_key
        for node in list(graph.nodes):
            if not node.outputs or node.domain not in CSE_DOMAINS or node.op in NONDETERMINISTIC_OPS:
                continue
            try:
                key = (node.op, node.domain or "",
                       tuple([input_key(t, pool, locked) for t in node.inputs]),
                       tuple(sorted([(k, _attr_key(v)) for k, v in node.attrs.items()])) if node.attrs else (),
                       tuple([bool(o.name) for o in node.outputs]))
            except _Unhashable:
                continue
            rep = table.get(key)
            if rep is None:
                table[key] = node
            elif self._merge(node, rep, outputs, detacher):
                counters["merged_nodes"] += 1
                counters[f"merged_{node.op.lower()}"] += 1

    @staticmethod
    def _input_key(t: gs.Tensor, pool: ConstantPool, locked: set[int]):
        if not t.name:
            return ""
        if isinstance(t, gs.Constant) and id(t) not in locked:
            return ("c", id(pool.canonical(t)))
        return ("v", id(t))

    @staticmethod
    def _merge(dup: gs.Node, rep: gs.Node, outputs: set[int], detacher: Detacher) -> bool:
        pairs = [(d, r) for d, r in zip(dup.outputs, rep.outputs) if d.name]
        if any(id(d) in outputs and id(r) in outputs for d, r in pairs):
            return False  # two graph outputs with one value: both names must stay
        for d, r in pairs:
            if id(d) in outputs:
                # The duplicate's output is a graph output: the representative takes its name.
                replace_uses(r, d)
                rep.outputs[rep.outputs.index(r)] = d
            else:
                replace_uses(d, r)
        detacher.detach(dup)
        dup.outputs.clear()
        return True
