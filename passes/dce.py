"""dce: remove nodes and initializers that no graph output depends on."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from infoptc.pass_manager import Contract, Pass, PassContext, PassResult, register_pass


def _count(graph: gs.Graph) -> tuple[int, int]:
    nodes = len(graph.nodes) + sum(_count(s)[0] for n in graph.nodes for s in n.subgraphs())
    consts = sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant))
    return nodes, consts


@register_pass
class DeadCodeElimination(Pass):
    name = "dce"
    summary = "remove nodes and initializers no output depends on (graph inputs are kept)"
    contract = Contract.EXACT

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes, consts = _count(graph)
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
        after_nodes, after_consts = _count(graph)
        removed = {"removed_nodes": nodes - after_nodes, "removed_initializers": consts - after_consts}
        return PassResult(changed=any(removed.values()), counters=removed)
