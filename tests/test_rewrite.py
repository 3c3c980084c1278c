"""infoptc.rewrite: the graph-editing helpers passes and the pattern engine share."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from infoptc.rewrite import Detacher, Namer, all_graphs, bypass


def var(name):
    return gs.Variable(name, dtype=np.float32, shape=[3])


def test_bypass_rewires_consumers_and_unhooks_the_node():
    x, t, y = var("x"), var("t"), var("y")
    ident = gs.Node("Identity", "id", inputs=[x], outputs=[t])
    relu = gs.Node("Relu", "relu", inputs=[t], outputs=[y])
    g = gs.Graph(nodes=[ident, relu], inputs=[x], outputs=[y])
    assert bypass(g, ident, x)
    assert relu.inputs[0] is x
    assert not ident.inputs and not ident.outputs
    assert [c.name for c in x.outputs] == ["relu"]


def test_bypass_of_a_graph_output_renames_the_producer():
    x, h, y = var("x"), var("h"), var("y")
    neg = gs.Node("Neg", "neg", inputs=[x], outputs=[h])
    ident = gs.Node("Identity", "id", inputs=[h], outputs=[y])
    g = gs.Graph(nodes=[neg, ident], inputs=[x], outputs=[y])
    assert bypass(g, ident, h)
    assert neg.outputs[0] is y and g.outputs[0] is y
    assert not h.outputs


def test_bypass_refuses_outer_value_to_subgraph_output():
    outer, out = var("outer"), var("branch_out")
    ident = gs.Node("Identity", "id", inputs=[outer], outputs=[out])
    gs.Node("Relu", "producer", inputs=[var("x")], outputs=[outer])  # lives in the outer graph
    branch = gs.Graph(nodes=[ident], inputs=[], outputs=[out])
    assert not bypass(branch, ident, outer)
    assert ident.inputs[0] is outer and ident.outputs[0] is out  # left as it was


def test_bypass_refuses_input_or_constant_to_output():
    x, y = var("x"), var("y")
    ident = gs.Node("Identity", "id", inputs=[x], outputs=[y])
    g = gs.Graph(nodes=[ident], inputs=[x], outputs=[y])
    assert not bypass(g, ident, x)
    c, y2 = gs.Constant("c", np.ones(3, np.float32)), var("y2")
    ident2 = gs.Node("Identity", "id2", inputs=[c], outputs=[y2])
    assert not bypass(gs.Graph(nodes=[ident2], outputs=[y2]), ident2, c)


def test_bypass_keeps_lookalike_readers_apart():
    # graphsurgeon compares nodes by value when unhooking them: two identical Identity nodes
    # would be confused. bypass goes by identity, with or without a shared Detacher.
    for shared in (None, Detacher()):
        x = var("x")
        idents = [gs.Node("Identity", "same", inputs=[x], outputs=[var(f"t{i}")]) for i in range(3)]
        relus = [gs.Node("Relu", f"r{i}", inputs=[n.outputs[0]], outputs=[var(f"y{i}")]) for i, n in enumerate(idents)]
        g = gs.Graph(nodes=idents + relus, inputs=[x], outputs=[r.outputs[0] for r in relus])
        assert bypass(g, idents[1], x, detacher=shared)
        if shared is not None:
            shared.flush()
        assert [id(c) for c in x.outputs] == [id(idents[0]), id(idents[2]), id(relus[1])]


def test_bypass_many_readers_of_one_tensor_with_a_detacher():
    x = var("x")
    idents = [gs.Node("Identity", f"id{i}", inputs=[x], outputs=[var(f"t{i}")]) for i in range(2000)]
    relus = [gs.Node("Relu", f"r{i}", inputs=[n.outputs[0]], outputs=[var(f"y{i}")]) for i, n in enumerate(idents)]
    g = gs.Graph(nodes=idents + relus, inputs=[x], outputs=[r.outputs[0] for r in relus])
    detacher = Detacher()
    assert all(bypass(g, n, x, detacher=detacher) for n in idents)
    detacher.flush()
    assert [id(c) for c in x.outputs] == [id(r) for r in relus]


def test_namer_avoids_names_of_every_subgraph():
    then_g = gs.Graph(nodes=[gs.Node("Relu", "inner", inputs=[var("a")], outputs=[var("b")])], outputs=[var("b")])
    else_g = gs.Graph(nodes=[gs.Node("Neg", "other", inputs=[var("a")], outputs=[var("c")])], outputs=[var("c")])
    x, y = var("x"), var("y")
    g = gs.Graph(nodes=[gs.Node("If", "if", attrs={"then_branch": then_g, "else_branch": else_g},
                                inputs=[x], outputs=[y])], inputs=[x], outputs=[y])
    assert [id(s) for s in all_graphs(g)] == [id(g), id(then_g), id(else_g)]
    namer = Namer(all_graphs(g))
    assert [namer("inner"), namer("c"), namer("c"), namer("fresh")] == ["inner_1", "c_1", "c_2", "fresh"]


def test_eager_namer_keeps_names_freed_before_its_first_use():
    def model():
        x, t, y = var("x"), var("t"), var("y")
        return gs.Graph(nodes=[gs.Node("Relu", "relu", inputs=[x], outputs=[t]),
                               gs.Node("Neg", "neg", inputs=[t], outputs=[y])], inputs=[x], outputs=[y])

    for eager, expected in ((True, "neg_1"), (False, "neg")):
        g = model()
        namer = Namer([g], eager=eager)
        g.nodes.pop()
        assert namer("neg") == expected
