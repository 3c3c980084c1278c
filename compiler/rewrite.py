"""Graph-editing helpers shared by passes and the pattern engine (on onnx-graphsurgeon graphs).

Walking: ``all_graphs``. Facts: ``is_standard``, ``overridable``, ``numpy_dtype``,
``constant_value``, ``is_graph_io``. Editing: ``Namer`` (fresh names), ``Detacher`` /
``detach_now`` (unhook nodes in linear time), ``replace_uses``, ``bypass``,
``replace_with_constants``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

STANDARD_DOMAINS = ("", "ai.onnx", None)


# ----------------------------------------------------------------------------- walking and facts


def all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """The graph and every nested subgraph, outer first (computed once per pass run: asking a
    node for its subgraphs costs an attribute scan)."""
    found = [graph]
    for node in graph.nodes:
        for sub in node.subgraphs():
            found.extend(all_graphs(sub))
    return found


def is_standard(node: gs.Node) -> bool:
    return node.domain in STANDARD_DOMAINS


def is_graph_io(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.inputs) or any(t is tensor for t in graph.outputs)


def overridable(graphs: Iterable[gs.Graph]) -> set[int]:
    """Ids of constants that are also graph inputs: a user may feed another value at run time."""
    return {id(t) for g in graphs for t in g.inputs if isinstance(t, gs.Constant)}


def numpy_dtype(t: gs.Tensor) -> np.dtype | None:
    """The tensor's dtype when numpy represents it exactly (not bfloat16, float8, strings...)."""
    try:
        declared = t.export_dtype if isinstance(t, gs.Constant) else t.dtype
        if declared is None:
            return None
        # graphsurgeon holds either a numpy dtype or an ONNX TensorProto enum
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(declared) if isinstance(declared, int) else declared)
    except (TypeError, KeyError, ValueError):
        return None
    return dtype if dtype.kind in "biuf" else None


def constant_value(t: gs.Tensor, locked: set[int]) -> np.ndarray | None:
    """The value of an initializer, or None (a variable, an overridable input in ``locked``, an
    odd dtype). Unlike ``infoptc.pattern.constant_value`` it does not read Constant nodes."""
    if not isinstance(t, gs.Constant) or id(t) in locked or numpy_dtype(t) is None:
        return None
    values = np.asarray(t.values)
    return values if values.dtype == numpy_dtype(t) else None


# ----------------------------------------------------------------------------- editing


class Namer:
    """Fresh node and tensor names, unique in the whole model (subgraphs included).

    The names in use are collected on the first call, since most runs never need a name; with
    ``eager=True`` at once, so that names an edit frees before the first call stay taken.
    """

    def __init__(self, graphs: Iterable[gs.Graph], eager: bool = False):
        self.graphs = list(graphs)
        self.used: set[str] | None = None
        if eager:
            self._collect()

    def _collect(self) -> None:
        self.used = set()
        for g in self.graphs:
            self.used.update(n.name for n in g.nodes)
            self.used.update(g.tensors().keys())
            self.used.update(t.name for t in g.inputs)

    def __call__(self, base: str) -> str:
        if self.used is None:
            self._collect()
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


class Detacher:
    """Disconnects nodes from the tensors they read, in time linear in the edges.

    onnx-graphsurgeon unhooks a node from a tensor's consumer list with ``list.remove``, which
    compares nodes with their costly ``__eq__``: quadratic when thousands of nodes read one
    tensor (a scalar shared after dedup). Here a node's input list is emptied at once and each
    consumer list is filtered once, in ``flush()``, at the end of the pass. Until then the
    tensors still list the detached nodes as consumers.
    """

    def __init__(self):
        self.dead: set[int] = set()
        self.tensors: dict[int, gs.Tensor] = {}

    def detach(self, node: gs.Node) -> None:
        for t in node.inputs:
            self.tensors[id(t)] = t
        self.dead.add(id(node))
        list.clear(node.inputs)  # the plain list method: no per-tensor list.remove

    def flush(self) -> None:
        for t in self.tensors.values():
            kept = [c for c in t.outputs if id(c) not in self.dead]
            if len(kept) != len(t.outputs):
                list.__setitem__(t.outputs, slice(None), kept)
        self.dead.clear()
        self.tensors.clear()


def detach_now(node: gs.Node) -> None:
    """Disconnect one node from the tensors it reads, at once: graphsurgeon's ``list.remove``
    with an identity test instead of ``Node.__eq__`` (use a ``Detacher`` for many nodes)."""
    for t in node.inputs:
        consumers = t.outputs
        i = next(i for i, c in enumerate(consumers) if c is node)
        list.__delitem__(consumers, i)
    list.clear(node.inputs)


def replace_uses(old: gs.Tensor, new: gs.Tensor, exclude: gs.Node | None = None) -> None:
    """Make every consumer of ``old`` (subgraph consumers included) read ``new`` instead."""
    for consumer in list(old.outputs):
        if consumer is exclude:
            continue
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def bypass(graph: gs.Graph, node: gs.Node, src: gs.Tensor, *, detacher: Detacher | None = None) -> bool:
    """Remove ``node``, whose first output equals ``src``, by rewiring its users to ``src``.

    If the output is an output of ``graph``, the producer of ``src`` is renamed to write it
    directly, so the model's interface keeps its names. Returns False (and leaves the graph)
    where that is impossible: the value would have to flow from a graph input, a constant, an
    outer-scope value (``graph`` being a subgraph) or another output straight to the output.
    ``node`` is unhooked from its inputs by ``detacher`` when given (the caller flushes it once
    at the end: linear however many nodes go), otherwise at once.
    """
    dst = node.outputs[0]
    if any(t is dst for t in graph.outputs):
        producer = src.inputs[0] if len(src.inputs) == 1 else None
        if (producer is None or isinstance(src, gs.Constant) or is_graph_io(graph, src)
                or not any(n is producer for n in graph.nodes)):
            return False
        replace_uses(src, dst, exclude=node)
        for i, t in enumerate(producer.outputs):
            if t is src:
                producer.outputs[i] = dst
    else:
        replace_uses(dst, src)
    if detacher is None:
        detach_now(node)
    else:
        detacher.detach(node)
    node.outputs.clear()
    return True


def replace_with_constants(graph: gs.Graph, node: gs.Node, values: Sequence[np.ndarray | None],
                           namer: Namer, detacher: Detacher) -> list[gs.Node]:
    """Detach ``node`` and give its outputs the known ``values`` (None: an omitted output).

    An output that is a graph output gets a ``Constant`` node (returned, for the caller to put in
    the node list): the interface keeps its name and stays produced by a node. Every other
    output becomes an initializer in place, so all its consumers, in subgraphs too, see it.
    """
    outputs = list(node.outputs)
    detacher.detach(node)
    node.outputs.clear()
    graph_outputs = {id(t) for t in graph.outputs}
    new_nodes = []
    for out, value in zip(outputs, values):
        if value is None or not out.name:
            continue
        if id(out) in graph_outputs:
            const = gs.Constant(namer(f"{out.name}_value"), value)
            new_nodes.append(gs.Node("Constant", name=namer(f"{node.name or out.name}/Constant"),
                                     attrs={"value": const}, outputs=[out]))
        else:
            out.to_constant(value)
    return new_nodes
