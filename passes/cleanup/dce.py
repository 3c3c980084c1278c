"""dce: remove nodes and initializers that no graph output depends on."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from infoptc.pass_manager import Contract, Pass, PassContext, PassResult, register_pass
from infoptc.rewrite import cleanup, node_subgraphs, tensor_map


def _count(graph: gs.Graph) -> tuple[int, int]:
    nodes = len(graph.nodes) + sum(_count(s)[0] for n in graph.nodes for s in node_subgraphs(n))
    consts = sum(1 for t in tensor_map(graph).values() if isinstance(t, gs.Constant))
    return nodes, consts


@register_pass
class DeadCodeElimination(Pass):
    name = "dce"
    summary = "remove nodes and initializers no output depends on (graph inputs are kept)"
    contract = Contract.EXACT
    reports_changes = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes, consts = _count(graph)
        # graphsurgeon's cleanup(remove_unused_graph_inputs=False), in linear time; where no node
        # went, every tensor is still in use and the counts stand
        if cleanup(graph):
            after_nodes, after_consts = _count(graph)
        else:
            after_nodes, after_consts = nodes, consts
        removed = {"removed_nodes": nodes - after_nodes, "removed_initializers": consts - after_consts}
        return PassResult(changed=any(removed.values()), counters=removed)
