"""toposort: order nodes so that every value is produced before it is used."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from infoptc.pass_manager import Contract, Pass, PassContext, PassResult, register_pass


@register_pass
class TopologicalSort(Pass):
    name = "toposort"
    summary = "sort nodes topologically (subgraphs included); a stable order for deterministic output"
    contract = Contract.EXACT

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = [id(n) for n in graph.nodes]
        graph.toposort(recurse_subgraphs=True)
        moved = sum(a != b for a, b in zip(before, (id(n) for n in graph.nodes)))
        return PassResult(changed=moved > 0, counters={"moved_nodes": moved})
