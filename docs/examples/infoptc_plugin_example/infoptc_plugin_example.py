"""An example infoptc plugin: the pass `cancel-double-neg` rewrites Neg(Neg(x)) to x.

Install it (`pip install ./docs/examples/infoptc_plugin_example`) and it appears in
`infoptc passes`; use it with `infoptc model.onnx --passes "cancel-double-neg,dce"`.
Or load the file directly: `infoptc model.onnx --load-plugin infoptc_plugin_example.py ...`.
"""

import onnx_graphsurgeon as gs

from infoptc import Contract, Option, Pass, PassResult, register_pass
from infoptc.rewrite import bypass


@register_pass
class CancelDoubleNeg(Pass):
    name = "cancel-double-neg"
    summary = "rewrite Neg(Neg(x)) to x"
    contract = Contract.EXACT  # -(-x) == x bit for bit, NaN payloads aside
    options = {"max-rewrites": Option(-1, "stop after this many rewrites (-1: no limit)")}

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        rewritten = 0
        for outer in list(graph.nodes):
            if self.opts["max-rewrites"] >= 0 and rewritten >= self.opts["max-rewrites"]:
                break
            inner_out = outer.inputs[0] if outer.op == "Neg" and outer.inputs else None
            inner = inner_out.inputs[0] if inner_out is not None and len(inner_out.inputs) == 1 else None
            if inner is None or inner.op != "Neg" or len(inner_out.outputs) != 1:
                continue
            # Users of the outer Neg read x; the inner Neg becomes dead and the manager drops it.
            if bypass(graph, outer, inner.inputs[0]):
                rewritten += 1
        return PassResult(changed=rewritten > 0, counters={"rewritten": rewritten})
