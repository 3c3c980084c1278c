"""Loading, validating and saving ONNX models; conversion to and from onnx-graphsurgeon.

The pass pipeline works on an ``onnx_graphsurgeon.Graph``. Everything the graph does not carry
(metadata, doc strings, model version, training info) is copied back from the source model on
export, so a round trip through ``to_graph``/``from_graph`` loses nothing a user would notice.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import re
import sys
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper
from onnx_graphsurgeon.util.misc import SynchronizedList

from .errors import InvalidModelError, UsageError
from .progress import stage
from .rewrite import all_graphs, node_subgraphs, tensor_map

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]

# graphsurgeon prints its warnings on stdout; library code must stay quiet (its errors still raise).
gs.logger.G_LOGGER.severity = max(gs.logger.G_LOGGER.severity, gs.logger.G_LOGGER.ERROR)

# Protobuf cannot serialize a message above 2 GiB; big models go to a side file.
PROTOBUF_LIMIT = 2**31 - 1
# Above this total initializer size ``save_model`` writes external data by default.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

# Domains we accept without a schema check: ONNX Runtime's contrib ops.
RUNTIME_DOMAINS = {"com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc"}
ONNX_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"}


# ----------------------------------------------------------------------------- loading


def load_model(source: ModelSource, *, validate: bool = True) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ``ModelProto`` (which is copied, never modified).

    External data is loaded after checking that every location stays inside the model's folder.
    Raises ``InvalidModelError`` with a one-line message for anything malformed.
    """
    base_dir: Path | None = None
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
    elif isinstance(source, (bytes, bytearray)):
        model = _parse(bytes(source), "<bytes>")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InvalidModelError(f"{path}: no such file")
        if path.is_dir():
            raise InvalidModelError(f"{path}: is a directory, expected an .onnx file")
        with stage(f"loading {path}"):
            try:
                data = path.read_bytes()
            except OSError as e:
                raise InvalidModelError(f"{path}: cannot read: {e.strerror}") from None
            model = _parse(data, str(path))
        base_dir = path.resolve().parent
    else:
        raise TypeError(f"cannot load a model from {type(source).__name__}")

    graphs, tensors = _graphs_and_tensors(model.graph)  # for external data and validation
    if any(external_data_helper.uses_external_data(t) for t in tensors):
        if base_dir is None:
            raise InvalidModelError(
                "model refers to external data but was not loaded from a file; pass its path"
            )
        load_external_data(model, base_dir)
    name_unknown_dims(model)
    if validate:
        _validate(model, graphs, tensors)
    return model


def name_unknown_dims(model: onnx.ModelProto) -> list[str]:
    """Give each ``dim_value: -1`` of the graph's inputs, outputs and value_info a symbolic name,
    ``TENSOR_dimAXIS``: PaddlePaddle writes -1 for a dynamic dimension, where ONNX says
    ``dim_param`` (ONNX Runtime reads it the same way). Each gets its own name, since nothing
    says two of them are equal. Other negative values stay errors. Returns the names given."""
    named = []
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value == -1:
                d.dim_param = f"{vi.name}_dim{axis}"  # clears dim_value (a oneof)
                named.append(d.dim_param)
    return named


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise InvalidModelError(f"{where}: empty file, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise InvalidModelError(f"{where}: not an ONNX model (protobuf parse failed; truncated or wrong file?)") from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise InvalidModelError(f"{where}: not an ONNX model (no graph or ir_version)")
    return model


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers and Constant-node/attribute values."""
    return _graph_tensors(iter_graphs(model.graph))


def _graph_tensors(graphs: Iterable[onnx.GraphProto]) -> Iterator[onnx.TensorProto]:
    for g in graphs:
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def _graphs_and_tensors(graph: onnx.GraphProto) -> tuple[list[onnx.GraphProto], list[onnx.TensorProto]]:
    """``list(iter_graphs(graph))`` and ``list(_graph_tensors(...))`` of them, in one look at each
    node's attributes (a model of 100k nodes takes 40 ms a look)."""
    graphs: list[onnx.GraphProto] = []
    owned: list[list[onnx.TensorProto]] = []  # each graph's tensors, in the order of graphs

    def visit(g: onnx.GraphProto) -> None:
        tensors = list(g.initializer)
        graphs.append(g)
        owned.append(tensors)
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    tensors.append(attr.t)
                elif attr.type == onnx.AttributeProto.TENSORS:
                    tensors.extend(attr.tensors)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        visit(sub)

    visit(graph)
    return graphs, [t for tensors in owned for t in tensors]


def _safe_location(base_dir: Path, location: str) -> Path:
    """Resolve an external-data location, refusing anything that leaves ``base_dir``."""
    if not location:
        raise InvalidModelError("external data entry has an empty location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise InvalidModelError(f"external data location {location!r} is absolute; refused")
    parts = Path(location).parts
    if ".." in parts:
        raise InvalidModelError(f"external data location {location!r} leaves the model's folder; refused")
    path = base_dir / location
    # Refuse links anywhere on the way (a link could point outside the folder).
    probe = base_dir
    for part in parts:
        probe = probe / part
        if probe.is_symlink():
            raise InvalidModelError(f"external data location {location!r} is a symbolic link; refused")
    if not path.resolve().is_relative_to(base_dir.resolve()):
        raise InvalidModelError(f"external data location {location!r} leaves the model's folder; refused")
    if not path.is_file():
        raise InvalidModelError(f"external data file {location!r} is missing (looked in {base_dir})")
    return path


def load_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read every external tensor into memory after checking its location, offset and length."""
    for tensor in iter_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        path = _safe_location(base_dir, info.location)
        size = path.stat().st_size
        offset = int(info.offset or 0)
        expected = _tensor_nbytes(tensor)
        length = int(info.length) if info.length else (expected if expected is not None else size - offset)
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidModelError(
                f"external data for tensor {tensor.name!r} runs past the end of {info.location!r} "
                f"(offset {offset} + length {length} > {size} bytes)"
            )
        with open(path, "rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    itemsize = _itemsize(tensor.data_type)
    if itemsize is None:
        return None
    if not tensor.dims:
        return itemsize
    count = math.prod(tensor.dims)
    if not -2**63 <= count < 2**63:
        count = int(np.prod(tensor.dims, dtype=np.int64))  # as int64 arithmetic wraps it
    return count * itemsize


@functools.cache
def _itemsize(data_type: int) -> int | None:
    """Bytes per element of an ONNX dtype; None for strings and dtypes numpy lacks."""
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return None if data_type == onnx.TensorProto.STRING else itemsize


# ----------------------------------------------------------------------------- validation


def validate_model(model: onnx.ModelProto) -> None:
    """Structural checks with one-line messages, then the ONNX checker."""
    _validate(model, *_graphs_and_tensors(model.graph))


def _validate(model: onnx.ModelProto, graphs: list[onnx.GraphProto], tensors: Iterable[onnx.TensorProto]) -> None:
    """``validate_model`` given the model's graphs (``iter_graphs``) and their tensors."""
    graph = model.graph
    if len(graph.node) == 0:
        raise InvalidModelError("graph is empty: it has no nodes")
    if len(graph.output) == 0:
        raise InvalidModelError("graph has no outputs")
    _check_opsets(model)
    _check_ops(model, graphs)
    order = [_check_names_and_cycles(g, subgraphs=len(graphs) > 1) for g in graphs][0]
    _check_tensor_sizes(tensors)
    for vi in list(graph.input) + list(graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value < 0:
                raise InvalidModelError(f"tensor {vi.name!r} has a negative dimension {d.dim_value}")
    checked = _without_raw_data(model) if is_large(model) else model
    if order != sorted(order):  # unsorted but acyclic: the checker insists on order, we don't
        if checked is model:
            checked = onnx.ModelProto()
            checked.CopyFrom(model)
        nodes = [onnx.NodeProto() for _ in order]
        for dst, i in zip(nodes, order):
            dst.CopyFrom(model.graph.node[i])
        del checked.graph.node[:]
        checked.graph.node.extend(nodes)
    try:
        onnx.checker.check_model(checked)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise InvalidModelError(f"ONNX checker: {first}") from None


def _without_raw_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with initializer payloads dropped: small enough for the checker."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for t in iter_tensors(light):
        if t.raw_data:
            t.ClearField("raw_data")
            t.dims[:] = [0]
    return light


def _opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return imp.version
    return 0


def _check_opsets(model: onnx.ModelProto) -> None:
    supported = onnx.defs.onnx_opset_version()
    version = _opset_version(model, "")
    if version > supported:
        raise InvalidModelError(
            f"model uses ONNX opset {version}, newer than the installed onnx {onnx.__version__} supports ({supported}); "
            "upgrade onnx or export with an older opset"
        )


def _check_ops(model: onnx.ModelProto, graphs: list[onnx.GraphProto]) -> None:
    imports = {imp.domain or "": imp.version for imp in model.opset_import}
    local_functions = {(f.domain, f.name) for f in model.functions}
    function_domains = {f.domain for f in model.functions}
    bodies = [g.node for g in graphs] + [f.node for f in model.functions]
    checked: set[tuple[str, str]] = set()  # (domain, op) pairs: a schema look-up per distinct op
    for nodes in bodies:
        for node in nodes:
            op = (node.domain, node.op_type)
            if op not in checked:
                _check_op(node, imports, local_functions, function_domains)
                checked.add(op)


def _check_op(node: onnx.NodeProto, imports: dict[str, int], local_functions: set[tuple[str, str]],
              function_domains: set[str]) -> None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    if (domain, node.op_type) in local_functions:
        return
    if domain in ONNX_DOMAINS:
        version = imports.get(domain, imports.get("ai.onnx", 0) if domain == "" else 0)
        if not onnx.defs.has(node.op_type, max_inclusive_version=max(version, 1), domain=domain):
            where = f"domain {domain!r}" if domain else "the ONNX standard"
            raise InvalidModelError(
                f"unknown op {node.op_type!r} (node {node.name or '<unnamed>'!r}) in {where} at opset {version}"
            )
    elif domain not in RUNTIME_DOMAINS and domain not in function_domains:
        raise InvalidModelError(
            f"unknown op domain {node.domain!r} (op {node.op_type!r}, node {node.name or '<unnamed>'!r})"
        )


def _check_names_and_cycles(graph: onnx.GraphProto, subgraphs: bool = True) -> list[int]:
    """Check SSA names and acyclicity; return a topological order of the node indices.
    ``subgraphs=False`` says that no node has a subgraph (whose reads count as its inputs)."""
    produced: dict[str, str] = {}
    for vi in graph.input:
        produced.setdefault(vi.name, "graph input")
    for init in graph.initializer:
        if init.name in produced and produced[init.name] != "graph input":
            raise InvalidModelError(f"duplicate tensor name {init.name!r}: initializer defined twice")
        produced[init.name] = "initializer"
    names = Counter(vi.name for vi in graph.input)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise InvalidModelError(f"duplicate tensor name {dup[0]!r}: graph input listed twice")
    nodes = list(graph.node)
    producer_of: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if not out:
                continue
            if out in produced or out in producer_of:
                other = produced.get(out) or f"node {graph.node[producer_of[out]].name!r}"
                raise InvalidModelError(
                    f"duplicate tensor name {out!r}: produced by node {node.name or node.op_type!r} and by {other}"
                )
            producer_of[out] = i
    if _in_order(nodes, producer_of, subgraphs):  # the usual list: its own order is topological
        return list(range(len(nodes)))
    # Kahn's algorithm over the node list; whatever remains sits on (or behind) a cycle.
    users: list[list[int]] = [[] for _ in nodes]
    indeg = [0] * len(nodes)
    for i, node in enumerate(nodes):
        deps = {producer_of[x] for x in node.input if x in producer_of}
        for attr in node.attribute:  # what its subgraphs read from outside (_node_inputs)
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                deps.update(producer_of[x] for x in _outer_scope_reads(sub) if x in producer_of)
        for j in deps:
            users[j].append(i)
        indeg[i] = len(deps)
    ready = [i for i, n in reversed(list(enumerate(indeg))) if n == 0]
    order: list[int] = []
    while ready:
        i = ready.pop()
        order.append(i)
        for u in reversed(users[i]):
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) != len(graph.node):
        stuck = [graph.node[i].name or graph.node[i].op_type for i, n in enumerate(indeg) if n > 0]
        raise InvalidModelError(f"graph contains a cycle (through nodes {', '.join(map(repr, stuck[:4]))})")
    return order


def _in_order(nodes: list[onnx.NodeProto], producer_of: dict[str, int], subgraphs: bool) -> bool:
    """Whether every node reads only values of the nodes before it (subgraph reads included)."""
    get = producer_of.get
    for i, node in enumerate(nodes):
        for x in node.input:
            if get(x, -1) >= i:
                return False
        for attr in (node.attribute if subgraphs else ()):
            if attr.type in _SUBGRAPH_ATTRIBUTES:
                if any(get(x, -1) >= i for x in _node_inputs(node)):
                    return False
                break
    return True


_SUBGRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _node_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """Inputs of a node including outer-scope names its subgraphs read."""
    yield from (x for x in node.input if x)
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            yield from _outer_scope_reads(g)


def _outer_scope_reads(graph: onnx.GraphProto) -> set[str]:
    local = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    local |= {o for n in graph.node for o in n.output}
    reads = set()
    for n in graph.node:
        reads.update(x for x in _node_inputs(n) if x)
    reads.update(o.name for o in graph.output)
    return reads - local


def _check_tensor_sizes(tensors: Iterable[onnx.TensorProto]) -> None:
    for t in tensors:
        if t.dims and min(t.dims) < 0:
            raise InvalidModelError(f"tensor {t.name!r} has a negative dimension {list(t.dims)}")
        size = len(t.raw_data)  # (each read of raw_data copies the bytes)
        if size:
            expected = _tensor_nbytes(t)
            if expected is not None and expected != size:
                raise InvalidModelError(
                    f"tensor {t.name!r} has shape {list(t.dims)} ({expected} bytes) but holds {size} bytes"
                )


# ----------------------------------------------------------------------------- graph conversion


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with ONNX shape inference applied, so passes see dtypes and shapes; the model
    itself when inference fails (passes then work with what the model declares).

    Inference runs strict first: a node whose inputs cannot go together (a MatMul of [2, 3]
    by [4, 5]) makes the model invalid (``InvalidModelError`` naming the node and its input
    shapes). Ops onnx does not know and declared shapes that disagree with the inferred ones
    are left to the runtime, as ONNX Runtime does."""
    if is_large(model):
        return model
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        strict_error = str(e)
    except Exception:  # noqa: BLE001 - the checker inside inference raises others on odd models
        strict_error = ""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001
        inferred = model
    _refuse_inconsistent_node(inferred, strict_error)
    return inferred


_INFERENCE_ERROR = re.compile(r"\(op_type:([\w.]+), node name: ([^)]*)\): \[(?:Shape|Type)InferenceError\] ([^\n]*)")


def _refuse_inconsistent_node(model: onnx.ModelProto, strict_error: str) -> None:
    """Raise ``InvalidModelError`` for the first node that strict inference found inconsistent,
    with the shapes of its inputs (from ``model``, inferred leniently)."""
    for op_type, name, message in _INFERENCE_ERROR.findall(strict_error):
        if "existing" in message or "is null" in message:  # a declared shape that disagrees (ONNX Runtime
            continue  # warns and goes on), or an input not typed yet (nodes out of order): not a conflict
        node = next((n for n in model.graph.node if n.op_type == op_type and n.name == name), None)
        shapes = _declared_shapes(model)
        inputs = ", ".join(f"{i} {shapes.get(i, '?')}" for i in (node.input if node is not None else []) if i)
        message = message.strip().rstrip(".")
        raise InvalidModelError(f"node {name or '<unnamed>'!r} ({op_type}): {message[:1].lower()}{message[1:]}"
                                + (f"; inputs {inputs}" if inputs else ""))


def _declared_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Shapes known for the main graph's values: ``[2, 'seq']``, '?' for an unknown dim."""
    shapes: dict[str, list] = {t.name: list(t.dims) for t in model.graph.initializer}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes.setdefault(vi.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                        for d in tt.shape.dim])
    return shapes


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import into onnx-graphsurgeon, the IR the passes work on.

    Old exporters list weights among the graph inputs (a caller may feed other values);
    graphsurgeon drops those from ``graph.inputs``, so they are put back, in their order, as
    the constants they are. Passes must not fold them (see fold-constants' option).
    """
    graph = _import_plain(model) or gs.import_onnx(_wrap_foreign_attributes(model))
    inits = {t.name for t in model.graph.initializer}
    if any(vi.name in inits for vi in model.graph.input):
        tensors = graph.tensors()
        graph.inputs = [tensors[vi.name] for vi in model.graph.input if vi.name in tensors]
    return graph


# graphsurgeon's importer spends most of its time in the Node and Tensor constructors, whose
# __setattr__ hooks raise and catch an AttributeError for each list they create. For the usual
# model (no local functions, subgraphs, sparse initializers or attribute references),
# ``_import_plain`` builds the very objects ``gs.import_onnx`` builds (the same attributes, in
# the same order, the same sharing of tensors) without those hooks; other models, and a
# graphsurgeon whose objects look different (``_plain_objects_match``), take the importer.
_PLAIN_ATTRIBUTES = {onnx.AttributeProto.FLOAT: "f", onnx.AttributeProto.INT: "i", onnx.AttributeProto.STRING: "s",
                     onnx.AttributeProto.TENSOR: "t", onnx.AttributeProto.FLOATS: "floats",
                     onnx.AttributeProto.INTS: "ints", onnx.AttributeProto.STRINGS: "strings"}


def _import_plain(model: onnx.ModelProto) -> gs.Graph | None:
    """``gs.import_onnx(_wrap_foreign_attributes(model))`` for plain models, else None."""
    from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

    g = model.graph
    if model.functions or len(g.sparse_initializer) or not _plain_objects_match():
        return None
    node_attrs = []
    for node in g.node:
        attrs = OrderedDict()
        for a in node.attribute:
            kind = _PLAIN_ATTRIBUTES.get(a.type)
            if a.ref_attr_name or (kind is None and a.type not in _FOREIGN_ATTRIBUTES):
                return None  # a subgraph, an attribute reference, a kind graphsurgeon skips
            if kind is None:  # as _wrap_foreign_attributes wraps it
                attrs[_WRAPPED + a.name] = base64.b64encode(a.SerializeToString()).decode()
                continue
            value = getattr(a, kind)
            if kind == "s":
                value = value.decode()
            elif kind == "t":
                value = _constant(value)
            elif kind in ("floats", "ints"):
                value = list(value)
            elif kind == "strings":
                value = [v.decode() for v in value]
            attrs[a.name] = value
        node_attrs.append(attrs)

    # The importer's order: initializers, value_info (which only adds dtype and shape to a
    # tensor seen before), graph inputs that are no initializers, outputs, then the nodes.
    tensors: dict[str, gs.Tensor] = {}
    types: dict[bytes, tuple] = {}
    for t in g.initializer:
        if t.name not in tensors:
            tensors[t.name] = _constant(t)
    for vi in g.value_info:
        old = tensors.get(vi.name)
        if old is None:
            tensors[vi.name] = _variable_of(vi, types)
        elif isinstance(old, gs.Variable):
            new = _variable_of(vi, types)
            old.dtype = old.dtype or new.dtype
            old.shape = old.shape or new.shape

    def io(vi: onnx.ValueInfoProto) -> gs.Tensor:
        if vi.name not in tensors:
            tensors[vi.name] = _variable_of(vi, types)
        return tensors[vi.name]

    def named(name: str) -> gs.Tensor:
        if name not in tensors:
            if not name:
                return _variable("")  # an omitted optional input or output: never shared
            tensors[name] = _variable(name)
        return tensors[name]

    initializers = {t.name for t in g.initializer}
    inputs = [io(vi) for vi in g.input if vi.name not in initializers]
    outputs = [io(vi) for vi in g.output]
    nodes = [_node(node.op_type, node.name, attrs, [named(x) for x in node.input], [named(x) for x in node.output],
                   node.domain if node.HasField("domain") else None)
             for node, attrs in zip(g.node, node_attrs)]
    # The nodes go in after construction: the constructor would look through each for subgraphs
    # (to merge their function lists), and a plain model has none.
    graph = gs.Graph(nodes=[], inputs=inputs, outputs=outputs, name=g.name, doc_string=g.doc_string,
                     producer_name=model.producer_name, producer_version=model.producer_version,
                     opset=OnnxImporter.get_opset(model), import_domains=OnnxImporter.get_import_domains(model),
                     functions=[], ir_version=model.ir_version)
    graph.nodes = nodes
    return graph


def _constant(t: onnx.TensorProto) -> gs.Constant:
    """``gs.Constant(t.name, LazyValues(t), data_location)``, its attributes set without the hooks."""
    c = object.__new__(gs.Constant)
    setattr_ = object.__setattr__
    setattr_(c, "name", t.name)
    setattr_(c, "inputs", _synced(c, "outputs", ()))
    setattr_(c, "outputs", _synced(c, "inputs", ()))
    setattr_(c, "_values", gs.ir.tensor.LazyValues(t))
    setattr_(c, "data_location", _data_location(t))
    setattr_(c, "_export_dtype", None)
    return c


def _data_location(t: onnx.TensorProto) -> int | None:
    return int(t.data_location) if t.HasField("data_location") else None


def _variable_of(vi: onnx.ValueInfoProto, types: dict[bytes, tuple]) -> gs.Variable:
    """``_variable`` with the dtype and shape ``vi`` declares. ``types`` keeps what each distinct
    TypeProto (by its bytes) makes: a model has few, and reading one field by field costs more
    than building the Variable."""
    key = vi.type.SerializeToString()
    found = types.get(key)
    if found is None:
        found = types[key] = _type_of(vi)
    dtype, shape, kind = found
    return _variable(vi.name, dtype, None if shape is None else list(shape), kind)


def _type_of(vi: onnx.ValueInfoProto) -> tuple:
    """(dtype, shape or None, type) as graphsurgeon's importer reads them from ``vi``."""
    from onnx_graphsurgeon.importers import onnx_importer as importer

    if vi.type.ByteSize() == 0:
        return None, None, "tensor_type"
    shape = importer.get_onnx_tensor_shape(vi)
    return (importer.get_onnx_tensor_dtype(vi), None if shape is None else tuple(shape),
            importer.get_onnx_tensor_type(vi))


def _variable(name: str, dtype=None, shape=None, type: str = "tensor_type") -> gs.Variable:
    """``gs.Variable(name, dtype, shape, type)``, its attributes set without the hooks."""
    v = object.__new__(gs.Variable)
    setattr_ = object.__setattr__  # (not __dict__.update: that would give each object a dict)
    setattr_(v, "name", name)
    setattr_(v, "inputs", _synced(v, "outputs", ()))
    setattr_(v, "outputs", _synced(v, "inputs", ()))
    setattr_(v, "dtype", dtype)
    setattr_(v, "shape", shape)
    setattr_(v, "type", type)
    return v


def _node(op: str, name: str, attrs: OrderedDict, inputs: list, outputs: list, domain: str | None) -> gs.Node:
    """``gs.Node(op, name, attrs, inputs, outputs, domain)``, its attributes set without the hooks."""
    n = object.__new__(gs.Node)
    setattr_ = object.__setattr__
    setattr_(n, "op", op)
    setattr_(n, "name", name)
    setattr_(n, "attrs", attrs)
    setattr_(n, "inputs", _synced(n, "outputs", inputs))
    setattr_(n, "outputs", _synced(n, "inputs", outputs))
    setattr_(n, "domain", domain)
    return n


# CPython 3.11+ gives the attributes of a list subclass, set one by one, a table sized for the
# class's shared keys: 420 bytes a list, against 260 with a dict of its own (3.10 shares keys
# compactly: 180 bytes, against 310). Each node and tensor has two lists and a graph walk
# touches them all: the smaller graph is also the faster one.
_DICT_PER_LIST = sys.version_info >= (3, 11)


def _synced(parent, field_name: str, items) -> SynchronizedList:
    """``SynchronizedList(parent, field_name, items)``: each item lists ``parent`` in its own
    ``field_name`` list, as the constructor's ``extend`` does."""
    synced = list.__new__(SynchronizedList)
    if _DICT_PER_LIST:
        synced.__dict__ = {"parent_obj": parent, "field_name": field_name}
    else:
        synced.parent_obj = parent
        synced.field_name = field_name
    if items:
        list.extend(synced, items)
        for item in items:
            list.append(getattr(item, field_name), parent)
    return synced


@functools.cache
def _plain_objects_match() -> bool:
    """Whether ``_variable``, ``_node`` and ``_constant`` build what this graphsurgeon's
    constructors build."""
    def layout(obj) -> list:
        return [(k, list(vars(v)), v.field_name, v.parent_obj is obj, len(v)) if isinstance(v, SynchronizedList)
                else (k, type(v), vars(v) if isinstance(v, gs.ir.tensor.LazyValues) else v)
                for k, v in vars(obj).items() if k != "attrs"]

    def gs_constant(t: onnx.TensorProto) -> gs.Constant:
        return gs.Constant(name=t.name, values=gs.ir.tensor.LazyValues(t), data_location=_data_location(t))

    proto = onnx.numpy_helper.from_array(np.zeros((2, 3), np.float32), "c")
    made = []
    for variable, node, constant in ((gs.Variable, gs.Node, gs_constant), (_variable, _node, _constant)):
        x, y, c = variable("x", np.dtype(np.float32), [1, "n"]), variable("y"), constant(proto)
        n = node("Op", "n", OrderedDict(), [x, c], [y], None)
        made.append([layout(x), layout(y), layout(c), layout(n), x.outputs[0] is n, c.outputs[0] is n,
                     y.inputs[0] is n, type(n.attrs)])
    return made[0] == made[1]


# Attribute kinds graphsurgeon's importer skips (with a warning): losing them changes the
# model (Optional's `type`), so they travel through the IR as opaque strings.
_FOREIGN_ATTRIBUTES = {onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS,
                       onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS}
_WRAPPED = "__infoptc_attr__"


def _wrap_foreign_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose foreign attributes are base64 strings graphsurgeon keeps (or the model)."""
    if not any(a.type in _FOREIGN_ATTRIBUTES for g in iter_graphs(model.graph) for n in g.node for a in n.attribute):
        return model
    import base64

    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    for g in iter_graphs(wrapped.graph):
        for node in g.node:
            for attr in node.attribute:
                if attr.type in _FOREIGN_ATTRIBUTES:
                    text = base64.b64encode(attr.SerializeToString()).decode()
                    attr.CopyFrom(onnx.helper.make_attribute(_WRAPPED + attr.name, text))
    return wrapped


def _unwrap_foreign_attributes(model: onnx.ModelProto) -> None:
    import base64

    for g in iter_graphs(model.graph):
        for node in g.node:
            for attr in node.attribute:
                if attr.name.startswith(_WRAPPED):
                    attr.ParseFromString(base64.b64decode(attr.s))


def from_graph(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a graph, restoring model-level fields of ``template`` that graphsurgeon drops."""
    kwargs = {}
    if template is not None:
        kwargs["opset_imports"] = _merged_opsets(graph, template)
    # Protobuf cannot copy a >2 GiB message into a list (graphsurgeon's exporter does), so big
    # constants are exported as empty placeholders and their payload is attached afterwards.
    tensors = _all_tensors(graph)
    big = [t for t in tensors if isinstance(t, gs.Constant) and _constant_nbytes(t) > LARGE_TENSOR]
    saved = [t._values for t in big]
    # graphsurgeon cannot write optional (or map) types: export them untyped, restore below.
    odd = [t for t in tensors if isinstance(t, gs.Variable) and t.dtype is not None
           and getattr(t, "type", "tensor_type") not in ("tensor_type", "sequence_type", "sparse_tensor_type")]
    odd_dtypes = [t.dtype for t in odd]
    # value_info the template does not declare is dropped below: not writing it at all saves
    # exporting (and deleting) an entry per tensor. Graph inputs and outputs keep their types.
    declared = _declared_value_info(template) if template is not None else None
    hidden = _undeclared(graph, tensors, declared) if template is not None else []
    hidden_types = [(t.dtype, t.shape) for t in hidden]
    try:
        for t in big:
            t._values = np.zeros((0,), dtype=t.dtype)
        for t in odd:
            t.dtype = None
        for t in hidden:
            t.dtype = t.shape = None
        model = gs.export_onnx(graph, do_type_check=False, **kwargs)
    finally:
        for t, values in zip(big, saved):
            t._values = values
        for t, dtype in zip(odd, odd_dtypes):
            t.dtype = dtype
        for t, (dtype, shape) in zip(hidden, hidden_types):
            t.dtype, t.shape = dtype, shape
    if odd and template is not None:
        _restore_types(model, template, {t.name for t in odd})
    _unwrap_foreign_attributes(model)
    if big:
        by_name = {t.name: t for g in iter_graphs(model.graph) for t in g.initializer}
        for t in big:
            proto = t._values.tensor if isinstance(t._values, gs.ir.tensor.LazyValues) else \
                onnx.numpy_helper.from_array(np.asarray(t.values), t.name)
            by_name[t.name].CopyFrom(proto)
            by_name[t.name].name = t.name
    if template is not None:
        model.ir_version = template.ir_version
        model.producer_name = template.producer_name
        model.producer_version = template.producer_version
        model.domain = template.domain
        model.model_version = template.model_version
        model.doc_string = template.doc_string
        model.graph.doc_string = template.graph.doc_string
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
        del model.training_info[:]
        model.training_info.extend(template.training_info)
        _keep_declared_value_info(model, declared)
    return model


def _declared_value_info(template: onnx.ModelProto) -> set[str]:
    return {vi.name for g in iter_graphs(template.graph) for vi in g.value_info}


def _undeclared(graph: gs.Graph, tensors: list[gs.Tensor], declared: set[str]) -> list[gs.Variable]:
    """Typed variables that are no graph's input or output and that ``declared`` lacks."""
    io = {id(t) for g in all_graphs(graph) for t in g.inputs + g.outputs}
    return [t for t in tensors if isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None)
            and t.name not in declared and id(t) not in io]


def _keep_declared_value_info(model: onnx.ModelProto, declared: set[str]) -> None:
    """Keep value_info only for the values the source model annotated. The shapes the driver
    inferred stay internal: written out, they let ONNX Runtime pick different (here slower)
    fusions than on the original model, and they grow the file."""
    for g in iter_graphs(model.graph):
        kept = [vi for vi in g.value_info if vi.name in declared]
        if len(kept) != len(g.value_info):
            del g.value_info[:]
            g.value_info.extend(kept)


LARGE_TENSOR = 64 * 2**20  # bytes; above this a constant is attached after export


def _all_tensors(graph: gs.Graph) -> list[gs.Tensor]:
    found = list(tensor_map(graph).values())
    for node in graph.nodes:
        for sub in node_subgraphs(node):
            found.extend(_all_tensors(sub))
    return found


def _value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    yield from graph.input
    yield from graph.output
    yield from graph.value_info


def _restore_types(model: onnx.ModelProto, template: onnx.ModelProto, names: set[str]) -> None:
    types = {vi.name: vi.type for g in iter_graphs(template.graph) for vi in _value_infos(g) if vi.name in names}
    for g in iter_graphs(model.graph):
        for vi in _value_infos(g):
            if vi.name in types:
                vi.type.CopyFrom(types[vi.name])


def _constant_nbytes(t: gs.Constant) -> int:
    return int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize if t.shape is not None else 0


def _merged_opsets(graph: gs.Graph, template: onnx.ModelProto) -> list[onnx.OperatorSetIdProto]:
    """Keep the template's opset imports, adding domains that passes introduced."""
    versions = {imp.domain: imp.version for imp in template.opset_import}
    default = "ai.onnx" if "ai.onnx" in versions and "" not in versions else ""
    if graph.opset and graph.opset > versions.get(default, 0):  # a pass upgraded the model (quantize-int4)
        versions[default] = graph.opset
    for imp in gs_domains(graph):
        versions.setdefault(imp, 1)
    return [onnx.helper.make_opsetid(d, v) for d, v in versions.items()]


def gs_domains(graph: gs.Graph) -> set[str]:
    domains = set()
    for node in graph.nodes:
        if node.domain and node.domain != "ai.onnx":
            domains.add(node.domain)
        for sub in node_subgraphs(node):
            domains |= gs_domains(sub)
    return domains


# ----------------------------------------------------------------------------- saving


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in iter_tensors(model))


def is_large(model: onnx.ModelProto) -> bool:
    """Too big to serialize as one protobuf (``ByteSize`` itself fails above 2 GiB)."""
    try:  # a message no larger than the limit has tensors no larger: no need to sum them in Python
        if model.ByteSize() <= EXTERNAL_DATA_THRESHOLD:
            return False
    except Exception:  # too big to size at all
        return initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    return initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size, counting tensor payloads without serializing them."""
    if not is_large(model):
        return model.ByteSize()
    return _without_raw_data(model).ByteSize() + initializer_bytes(model)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place, so a reader
    never sees half a file and a failure leaves no partial output."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.resolve().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` atomically: into a temporary folder beside ``path``, then rename into place.

    ``external_data=None`` decides by size: models whose tensors exceed ~1.8 GB (protobuf's limit
    is 2 GiB) get their tensors in ``<name>.data`` next to the model. Returns the files written.
    """
    with stage(f"writing {path}"):
        return _save_model(model, Path(path), external_data)


def _save_model(model: onnx.ModelProto, path: Path, external_data: bool | None) -> list[Path]:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {path}: folder {folder} does not exist")
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a directory")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {path}: folder {folder} is not writable")
    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
    written: list[Path] = []
    try:
        if external_data:
            data_name = path.name + ".data"
            out = onnx.ModelProto()
            out.CopyFrom(model)  # conversion mutates tensors; the caller's model stays intact
            _write_external(out, tmp / data_name, data_name)
            (tmp / path.name).write_bytes(out.SerializeToString(deterministic=True))
            pairs = [(tmp / data_name, folder / data_name), (tmp / path.name, path)]
        else:
            (tmp / path.name).write_bytes(model.SerializeToString(deterministic=True))
            pairs = [(tmp / path.name, path)]
        for src, dst in pairs:
            os.replace(src, dst)
            written.append(dst)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
    except ValueError as e:  # protobuf refuses >2 GiB messages
        raise UsageError(f"cannot write {path}: {e}; use external data") from None
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()
    return written


def _write_external(model: onnx.ModelProto, data_path: Path, location: str, threshold: int = 1024) -> None:
    """Move every tensor payload above ``threshold`` bytes into one side file, 64-byte aligned."""
    offset = 0
    with open(data_path, "wb") as f:
        for t in iter_tensors(model):
            if not t.HasField("raw_data") or len(t.raw_data) < threshold:
                continue
            pad = (-offset) % 64
            f.write(b"\0" * pad)
            offset += pad
            data = t.raw_data
            f.write(data)
            external_data_helper.set_external_data(t, location=location, offset=offset, length=len(data))
            t.data_location = onnx.TensorProto.EXTERNAL
            t.ClearField("raw_data")
            offset += len(data)
