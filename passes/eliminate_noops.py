"""eliminate-noops: remove ops that pass their input through unchanged.

Identity; Dropout at inference (its mask output unused); Cast to the type it already has.
More no-op patterns (Reshape to the same shape, identity Transpose, ...) live here too.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from infoptc.pass_manager import Contract, Pass, PassContext, PassResult, register_pass
from infoptc.rewrite import bypass


def _dropout_is_noop(node: gs.Node) -> bool:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        return False  # the mask is used
    if len(node.inputs) > 2 and node.inputs[2].name:
        training = node.inputs[2]
        return isinstance(training, gs.Constant) and not bool(np.asarray(training.values).any())
    return True


def _cast_is_noop(node: gs.Node) -> bool:
    src = node.inputs[0]
    if src.dtype is None:
        return False
    try:
        from onnx.helper import tensor_dtype_to_np_dtype

        return np.dtype(src.dtype) == np.dtype(tensor_dtype_to_np_dtype(node.attrs["to"]))
    except (KeyError, TypeError):
        return False


NOOPS = {
    "Identity": lambda node: True,
    "Dropout": _dropout_is_noop,
    "Cast": _cast_is_noop,
}


@register_pass
class EliminateNoops(Pass):
    name = "eliminate-noops"
    summary = "remove Identity, inference Dropout and same-type Cast nodes"
    contract = Contract.EXACT

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counters: dict[str, int] = {}
        for g in [graph, *_subgraphs(graph)]:
            for node in list(g.nodes):
                check = NOOPS.get(node.op) if node.domain in ("", "ai.onnx", None) else None
                if check and node.inputs and node.outputs and check(node) and bypass(g, node, node.inputs[0]):
                    key = f"removed_{node.op.lower()}" if node.op else "removed"
                    counters[key] = counters.get(key, 0) + 1
        return PassResult(changed=bool(counters), counters=counters)


def _subgraphs(graph: gs.Graph):
    for node in graph.nodes:
        for sub in node.subgraphs():
            yield sub
            yield from _subgraphs(sub)
