"""reorder-for-memory: a topological order of the top-level nodes with a lower memory peak.

The candidates are the given order, two greedy list schedules and each of them refined by exact
search on its small regions (``infoptc.memory.best_order``); the one with the lowest lower bound
(most bytes live at one step) wins, ties keep the given order. Only the order changes, so the
outputs are bit-identical. With ``memory-limit`` the planned arena of the order found must fit:
when no order found does, the pass fails with the best order's figures (VerificationError).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from infoptc import ir, memory
from infoptc.errors import VerificationError
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, parse_size, register_pass


@register_pass
class ReorderForMemory(Pass):
    name = "reorder-for-memory"
    summary = "order nodes to lower the peak of live activation memory (greedy and exact search)"
    contract = Contract.EXACT
    reports_changes = True
    keeps_order = True
    options = {
        "memory-limit": Option(0, "fail (exit 3) when the best order's planned arena exceeds this many bytes; 0: none",
                               parse=parse_size),
        "exact-max-nodes": Option(20, "largest region (nodes) searched exactly"),
        "exact-max-states": Option(20000, "give up the exact search of a region after this many states"),
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        model = ir.from_graph(graph)
        prog = memory.program_of(model, ctx.input_shapes)
        if len(prog.ops) != len(graph.nodes):
            return PassResult(False, {"moved_nodes": 0})
        before = memory.lower_bound(prog)
        order = memory.best_order(prog, self.opts["exact-max-nodes"], self.opts["exact-max-states"])
        rep = memory.report(prog, order)
        moved = sum(a != b for a, b in enumerate(order))
        limit = self.opts["memory-limit"]
        if limit and rep.planned > limit:
            raise VerificationError(
                f"a memory limit of {limit} bytes cannot be met: the best order found needs a {rep.planned}-byte arena "
                f"(lower bound {rep.lower_bound}, given order {before})")
        if moved:
            nodes = list(graph.nodes)
            graph.nodes = [nodes[i] for i in order]
        ctx.reports[self.name] = {"lower_bound_before": before, "lower_bound_after": rep.lower_bound,
                                  "planned": rep.planned, "no_reuse": rep.no_reuse}
        ctx.metadata[memory.METADATA_KEY] = memory.metadata_value(rep)
        return PassResult(moved > 0, {"moved_nodes": moved, "lower_bound_saved": before - rep.lower_bound})
