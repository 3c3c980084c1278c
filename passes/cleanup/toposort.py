"""toposort: order nodes so that every value is produced before it is used."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from infoptc.pass_manager import SORTED, Contract, Pass, PassContext, PassResult, fingerprint, register_pass
from infoptc.rewrite import graphs_of, toposort


@register_pass
class TopologicalSort(Pass):
    name = "toposort"
    summary = "sort nodes topologically (subgraphs included); a stable order for deterministic output"
    contract = Contract.EXACT
    reports_changes = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.analyses.get(SORTED):  # sorted by the manager since the last change: sorting again moves nothing
            return PassResult(changed=False, counters={"moved_nodes": 0})
        # ``changed`` is what the manager's fingerprints would find: with no subgraph, any change
        # of the node order (a fingerprint is the node list's signature); else the fingerprints.
        before_fingerprint = fingerprint(graph) if len(graphs_of(graph, ctx)) > 1 else None
        before = [id(n) for n in graph.nodes]
        toposort(graph)  # graphsurgeon's graph.toposort(), in linear time
        after = [id(n) for n in graph.nodes]
        moved = sum(a != b for a, b in zip(before, after))
        if before_fingerprint is None:
            changed = before != after
        else:
            changed = moved > 0 or fingerprint(graph) != before_fingerprint
        return PassResult(changed=changed, counters={"moved_nodes": moved})
