"""Graph-editing helpers shared by passes and the pattern engine (on onnx-graphsurgeon graphs).

Walking: ``all_graphs`` (``graphs_of``: kept per pass context), ``node_subgraphs``,
``tensor_map``. Upkeep: ``cleanup``, ``toposort`` (graphsurgeon's, in linear time). Facts:
``is_standard``, ``overridable``, ``numpy_dtype``, ``constant_value``, ``is_graph_io``. Editing: ``Namer`` (fresh names), ``Detacher`` /
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
        if node.attrs:
            for sub in node_subgraphs(node):
                found.extend(all_graphs(sub))
    return found


def graphs_of(graph: gs.Graph, ctx) -> list[gs.Graph]:
    """``all_graphs(graph)``, kept as an analysis of the pass context ``ctx`` until a pass
    changes the graph (the walk costs a look at every node)."""
    return ctx.analysis(f"all_graphs:{id(graph)}", lambda: all_graphs(graph))


def tensor_map(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """``graph.tensors()``: the named tensors of the graph's inputs, nodes and outputs by name,
    in first-seen order (a later tensor of the same name wins), without its per-tensor calls."""
    found: dict[str, gs.Tensor] = {}
    for t in graph.inputs:
        if t.name != "":
            found[t.name] = t
    for node in graph.nodes:
        for t in node.inputs:
            if t.name != "":
                found[t.name] = t
        for t in node.outputs:
            if t.name != "":
                found[t.name] = t
    for t in graph.outputs:
        if t.name != "":
            found[t.name] = t
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
    except (TypeError, KeyError, ValueError):
        return None
    try:
        return _NUMPY_DTYPES[declared]
    except KeyError:
        found = _NUMPY_DTYPES[declared] = _as_numpy_dtype(declared)
        return found
    except TypeError:  # an unhashable dtype
        return _as_numpy_dtype(declared)


_NUMPY_DTYPES: dict = {}  # declared dtype -> numpy_dtype: passes ask for tensor after tensor


def _as_numpy_dtype(declared) -> np.dtype | None:
    if declared is None:
        return None
    try:
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
    ``eager=True`` at once, or by ``collect()`` before a first edit, so that names an edit frees
    before the first call stay taken.
    """

    def __init__(self, graphs: Iterable[gs.Graph], eager: bool = False):
        self.graphs = list(graphs)
        self.used: set[str] | None = None
        if eager:
            self.collect()

    def collect(self) -> None:
        """Take the names in use now (once): node names, tensor names, graph inputs."""
        if self.used is not None:
            return
        used: set[str] = set()
        for g in self.graphs:
            used.update(t.name for t in g.inputs)  # unnamed inputs too, as ever
            for node in g.nodes:
                used.add(node.name)
                used.update(t.name for t in node.inputs if t.name != "")
                used.update(t.name for t in node.outputs if t.name != "")
            used.update(t.name for t in g.outputs if t.name != "")
        self.used = used

    def __call__(self, base: str) -> str:
        if self.used is None:
            self.collect()
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


# ----------------------------------------------------------------------------- cleanup and order
# The pass manager runs these after every changing pass. They compute exactly what
# graphsurgeon's ``Graph.cleanup(remove_unused_graph_inputs=False)`` and ``Graph.toposort()``
# compute (the same nodes kept, in the same order, the same edits to tensors), in linear time:
# graphsurgeon rebuilds tensor maps, walks ``node.subgraphs()`` generators for every node, and
# unhooks each removed node with ``list.remove``, which calls ``Node.__eq__`` on every consumer
# it passes. Graphs with local functions are left to graphsurgeon itself.


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    """``list(node.subgraphs())``, without the generator and import it costs on every call."""
    if not node.attrs:
        return []
    found: list[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph) and not any(value is g for g in found):
            found.append(value)
    return found


def _local_names(graph: gs.Graph) -> set[str]:
    """Names graphsurgeon's ``Graph._local_tensors`` holds: node outputs, graph inputs, constants."""
    names = {t.name for t in graph.inputs}
    add = names.add
    for node in graph.nodes:
        for t in node.outputs:
            if t.name != "":
                add(t.name)
        for t in node.inputs:
            if t.name != "" and isinstance(t, gs.Constant):
                add(t.name)
    names.update(t.name for t in graph.outputs if t.name != "" and isinstance(t, gs.Constant))
    return names


def _foreign_names(graph: gs.Graph, nested: bool) -> set[str]:
    """Names whose producers graphsurgeon's walks do not follow in ``graph``: the names it reads
    that are not local (``_local_names``), i.e. values of enclosing graphs, and the empty name
    unless a graph input has it. The main graph only needs the empty name listed: any other name
    there is local, or names a value with no producer in the graph (nothing to follow) or with
    one outside it (which the walks hand over to graphsurgeon, ``_Fallback``). That spares
    collecting the local names, a look at every node."""
    if not nested:
        return set() if any(t.name == "" for t in graph.inputs) else {""}
    read = {t.name for t in graph.outputs}
    for node in graph.nodes:
        read.update(t.name for t in _reads(node))
    read.add("")
    return read - _local_names(graph)


def _reads(node: gs.Node) -> list[gs.Tensor]:
    """The node's inputs, and the outer values its subgraphs read (graphsurgeon's order)."""
    if not node.attrs:
        return node.inputs
    reads = list(node.inputs)
    for sub in node_subgraphs(node):
        reads += list(sub._foreign_tensors().values())
    return reads


class _Fallback(Exception):
    """Something graphsurgeon reports as an error (a cycle, a producer outside the graph):
    let graphsurgeon itself run, and raise, as it would have."""


def cleanup(graph: gs.Graph) -> int:
    """``graph.cleanup(remove_unused_graph_inputs=False)``: drop nodes no graph output depends
    on, subgraphs first; removed nodes are unhooked from their tensors. Returns how many went."""
    if graph.functions:
        before = _node_total(graph)
        graph.cleanup(remove_unused_graph_inputs=False)
        return before - _node_total(graph)
    gone: list = []  # removed nodes and the tensors only they used
    keep: set[int] = set()  # every graph's inputs and outputs
    removed = _cleanup(graph, gone, keep, nested=False)
    _release(gone, keep)
    return removed


def _node_total(graph: gs.Graph) -> int:
    return sum(len(g.nodes) for g in all_graphs(graph))


def _cleanup(graph: gs.Graph, gone: list, keep: set[int], nested: bool) -> int:
    removed = 0
    keep.update(id(t) for t in graph.inputs)
    keep.update(id(t) for t in graph.outputs)
    for node in graph.nodes:
        if node.attrs:
            for sub in node_subgraphs(node):
                removed += _cleanup(sub, gone, keep, nested=True)
    for t in graph.inputs:
        if t.inputs:  # a graph input has no producer; graphsurgeon unhooks any
            t.inputs.clear()
    try:
        used = _used_nodes(graph, nested)
    except _Fallback:
        before = _node_total(graph)
        graph.cleanup(remove_unused_graph_inputs=False, recurse_functions=False)
        return removed + before - _node_total(graph)
    nodes = graph.nodes
    if len(used) == len(nodes):  # every node is used (and listed once)
        return removed
    dead = [n for n in nodes if id(n) not in used]
    if dead:
        gone += dead
        gone += _unhook(dead)
    graph.nodes = [n for n in nodes if id(n) in used]
    return removed + len(dead)


def _release(gone: list, keep: set[int]) -> None:
    """Let reference counting free removed nodes, their attribute tensors, and tensors left with
    no producer and no consumer (``keep``: graph inputs and outputs stay). Each holds itself
    through its SynchronizedLists' ``parent_obj``; with the collector paused during a compile
    they would pile up, and the passes after would walk memory strewn with them. A released
    object's lists are empty and can no longer be appended to (AttributeError)."""
    for obj in gone:
        if id(obj) in keep or obj.inputs or obj.outputs:
            continue
        if isinstance(obj, gs.Node):
            for value in obj.attrs.values():
                if isinstance(value, gs.Tensor) and not value.inputs and not value.outputs:
                    _release_one(value)
        _release_one(obj)


def _release_one(obj) -> None:
    for synced in (obj.inputs, obj.outputs):
        vars(synced).pop("parent_obj", None)


def _used_nodes(graph: gs.Graph, nested: bool) -> set[int]:
    """Ids of the nodes the graph outputs depend on: graphsurgeon's walk, tensor by tensor
    from the outputs (each local name once, unnamed tensors always, outer values never)."""
    seen = _foreign_names(graph, nested)  # names not to follow (again)
    used: set[int] = set()
    queue: list[gs.Tensor] = []
    for t in graph.outputs:
        if t.name == "":
            queue.append(t)
        elif t.name not in seen:
            seen.add(t.name)
            queue.append(t)
    append, see, use = queue.append, seen.add, used.add
    for t in queue:  # grows while it is read
        for node in t.inputs:
            use(id(node))
            for r in (_reads(node) if node.attrs else node.inputs):
                name = r.name
                if name == "":
                    append(r)
                elif name not in seen:
                    see(name)
                    append(r)
    if not used.issubset(map(id, graph.nodes)):
        raise _Fallback  # a producer outside the graph
    return used


def _unhook(dead: list[gs.Node]) -> list[gs.Tensor]:
    """``node.inputs.clear(); node.outputs.clear()`` for each dead node, in order, as
    graphsurgeon does it, but each tensor's consumer (producer) list is filtered once.

    graphsurgeon's ``list.remove`` takes the first element that *equals* the node; a different
    node can only be equal with the same name, op and domain. Lists where that could happen are
    edited by ``list.remove`` itself, at the moment graphsurgeon would. Returns the tensors it
    touched."""
    readers: dict[int, tuple[gs.Tensor, list[gs.Node]]] = {}
    writers: dict[int, tuple[gs.Tensor, list[gs.Node]]] = {}
    for node in dead:
        for t in node.inputs:
            entry = readers.get(id(t))
            if entry is None:
                readers[id(t)] = (t, [node])
            else:
                entry[1].append(node)
        for t in node.outputs:
            entry = writers.get(id(t))
            if entry is None:
                writers[id(t)] = (t, [node])
            else:
                entry[1].append(node)
    exact_readers = {k for k, (t, nodes) in readers.items() if _equal_possible(t.outputs, nodes)}
    exact_writers = {k for k, (t, nodes) in writers.items() if _equal_possible(t.inputs, nodes)}
    for node in dead:
        if exact_readers:
            for t in node.inputs:
                if id(t) in exact_readers:
                    list.remove(t.outputs, node)
        list.clear(node.inputs)
        if exact_writers:
            for t in node.outputs:
                if id(t) in exact_writers:
                    list.remove(t.inputs, node)
        list.clear(node.outputs)
    for k, (t, nodes) in readers.items():
        if k not in exact_readers:
            _remove_each(t.outputs, nodes)
    for k, (t, nodes) in writers.items():
        if k not in exact_writers:
            _remove_each(t.inputs, nodes)
    return [t for t, _ in readers.values()] + [t for t, _ in writers.values()]


def _node_key(node: gs.Node) -> tuple:
    return node.name, node.op, node.domain


def _equal_possible(members: list[gs.Node], removed: list[gs.Node]) -> bool:
    """Could ``list.remove(members, r)`` hit a node other than ``r`` itself?"""
    if len(members) == 1 and len(removed) == 1:
        return members[0] is not removed[0]
    keys: dict[tuple, set[int]] = {}
    for r in removed:
        keys.setdefault(_node_key(r), set()).add(id(r))
    if any(len(ids) > 1 for ids in keys.values()):
        return True
    for m in members:
        ids = keys.get(_node_key(m))
        if ids is not None and id(m) not in ids:
            return True
    return False


def _remove_each(members: list[gs.Node], removed: list[gs.Node]) -> None:
    """Remove one occurrence per entry of ``removed`` (by identity; the first ones)."""
    if len(removed) == 1:  # the usual case: one node leaves this list
        for i, m in enumerate(members):
            if m is removed[0]:
                list.__delitem__(members, i)
                return
        raise ValueError("list.remove(x): x not in list")
    left: dict[int, int] = {}
    for r in removed:
        left[id(r)] = left.get(id(r), 0) + 1
    kept = []
    for m in members:
        if left.get(id(m)):
            left[id(m)] -= 1
        else:
            kept.append(m)
    if any(left.values()):
        raise ValueError("list.remove(x): x not in list")
    list.__setitem__(members, slice(None), kept)


def toposort(graph: gs.Graph) -> gs.Graph:
    """``graph.toposort()``: each node sorted by its depth (longest path from the graph's
    inputs), ties in the order of a depth-first walk from the nodes in their current order;
    subgraphs first."""
    if graph.functions:
        return graph.toposort()
    _toposort(graph, full=True)
    return graph


def _toposort(graph: gs.Graph, full: bool) -> None:
    has_subgraphs = False
    for node in graph.nodes:
        if node.attrs:
            for sub in node_subgraphs(node):
                has_subgraphs = True
                _toposort(sub, full=False)
    try:
        graph.nodes = _sorted_nodes(graph, nested=not full)
    except _Fallback:
        if full:
            graph.toposort()
        else:
            graph.toposort(recurse_subgraphs=True, recurse_functions=False, mode="nodes")
        return
    if full and has_subgraphs:
        graph._merge_subgraph_functions()  # graphsurgeon's full mode shares the function list


def _sorted_nodes(graph: gs.Graph, nested: bool) -> list[gs.Node]:
    foreign = _foreign_names(graph, nested)
    in_graph: set[int] = set()  # taken when the walk first needs it (a sorted list never does)

    def producers(node: gs.Node) -> list[gs.Node]:
        if not in_graph:
            in_graph.update(map(id, graph.nodes))
        found: dict[int, gs.Node] = {}
        for t in _reads(node):
            if t.name not in foreign:
                for p in t.inputs:
                    if id(p) not in in_graph:
                        raise _Fallback
                    found[id(p)] = p
        return list(found.values())

    # A depth-first walk from each node in list order; ``order`` is its post-order, as with
    # graphsurgeon's recursion. A node whose producers all have their level already (the usual
    # case: the list is mostly sorted) gets its level at once.
    levels: dict[int, int] = {}
    order: list[gs.Node] = []
    order_levels: list[int] = []
    for root in graph.nodes:
        if id(root) in levels:
            continue
        if not root.attrs or not node_subgraphs(root):
            deepest, ready = -1, True
            for t in root.inputs:
                if t.name not in foreign:
                    for p in t.inputs:
                        level = levels.get(id(p))
                        if level is None:
                            ready = False
                        elif level > deepest:
                            deepest = level
            if ready:
                levels[id(root)] = deepest + 1
                order.append(root)
                order_levels.append(deepest + 1)
                continue
        on_path = {id(root)}
        stack = [[root, producers(root), 0, -1]]  # node, producers, next producer, deepest so far
        while stack:
            frame = stack[-1]
            node, prods, i = frame[0], frame[1], frame[2]
            if i < len(prods):
                frame[2] = i + 1
                p = prods[i]
                level = levels.get(id(p))
                if level is None:
                    if id(p) in on_path:
                        raise _Fallback  # a cycle
                    on_path.add(id(p))
                    stack.append([p, producers(p), 0, -1])
                elif level > frame[3]:
                    frame[3] = level
                continue
            stack.pop()
            on_path.discard(id(node))
            levels[id(node)] = level = frame[3] + 1
            order.append(node)
            order_levels.append(level)
            if stack and level > stack[-1][3]:
                stack[-1][3] = level
    ranked = sorted(range(len(order)), key=order_levels.__getitem__)  # stable: ties keep the walk's order
    return [order[i] for i in ranked]
