"""ONNX -> Relax for the TVM targets: symbolic or static shapes, the frontend's gaps, typed errors.

TVM's Relax ONNX frontend stumbles on a few patterns that exported models are full of. Before
import we therefore

- either keep the symbolic input dimensions (``keep_symbolic``: each becomes a TIR variable, and
  one executable runs for every value of it; unnamed ones get a name, and names the frontend
  would parse as arithmetic are made identifiers), or bind every one of them (to 1 unless the
  driver already bound it) and report which ones we chose, so the caller can say so;
- run ONNX shape inference with data propagation and replace each ``Shape`` of a statically
  shaped tensor by a constant (the frontend cannot ``Gather`` from a Relax shape value, which
  stops GPT-style models);
- rewrite ``Clip`` with constant bounds as ``Max``/``Min``: the frontend lowers ``Clip``
  straight to TIR, which hides it from Relax's layout conversion, so every ReLU6 of a
  MobileNet would sit between two transposes.

During import, ``Range`` whose limit is a symbolic dimension (GPT's position ids) becomes
``relax.op.arange`` of that dimension: the frontend's own converter computes the length as a
tensor, so every shape after it is unknown and the first ``Reshape`` fails.
``symbolic_shapes_known`` tells whether an import kept every tensor's shape; where it did not,
the caller binds the dims and imports again.

Ops the frontend has no converter for raise ``UnsupportedOpError`` naming all of them at once.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
from infoptc.errors import CompileError, UnsupportedOpError
from infoptc.ir import iter_graphs
from onnx import TensorProto, helper, numpy_helper

DEFAULT_DIM = 1
ONNX_DOMAINS = ("", "ai.onnx")
# Ops the frontend handles outside its converter table.
DIRECTLY_HANDLED = {"If", "Constant"}


@dataclass
class Prepared:
    model: onnx.ModelProto
    defaulted_dims: dict[str, int] = field(default_factory=dict)  # "input[axis] (name)" -> value
    counters: dict[str, int] = field(default_factory=dict)
    symbolic_dims: dict[str, str] = field(default_factory=dict)  # "input[axis]" -> dim name (kept symbolic)


def prepare(model: onnx.ModelProto, default_dim: int = DEFAULT_DIM, keep_symbolic: bool = False) -> Prepared:
    model = _copy(model)
    check_supported(model)
    symbolic = name_symbolic_inputs(model) if keep_symbolic else {}
    defaulted = {} if keep_symbolic else bind_symbolic_inputs(model, default_dim)
    model = _infer(model)
    counters = {"shapes_folded": fold_static_shapes(model), "clips_split": split_constant_clips(model),
                "pows_unrolled": unroll_small_pows(model), "gathers_sliced": slice_constant_gathers(model),
                "splits_sliced": slice_splits(model), "conv_transposes_as_convs": upsample_as_conv(model)}
    return Prepared(model, defaulted, counters, symbolic)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# ----------------------------------------------------------------------------- support check


def frontend_ops() -> set[str] | None:
    """Op types TVM's ONNX frontend converts (None if this TVM hides its table)."""
    try:
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map
    except ImportError:
        return None
    return set(_get_convert_map()) | DIRECTLY_HANDLED


def _all_nodes(graph: onnx.GraphProto):
    return (node for g in iter_graphs(graph) for node in g.node)


def unsupported_ops(model: onnx.ModelProto) -> dict[str, list[str]]:
    """``{op_type: [node names]}`` of the nodes (subgraphs included) the frontend cannot convert."""
    known = frontend_ops()
    found: dict[str, list[str]] = {}
    for node in _all_nodes(model.graph):
        name = node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}::{node.op_type}"
        if node.domain not in ONNX_DOMAINS or (known is not None and node.op_type not in known):
            found.setdefault(name, []).append(node.name or f"({node.op_type} writing {node.output[0]!r})")
    return found


def _unsupported_message(ops: dict[str, list[str]]) -> str:
    def nodes(names: list[str]) -> str:
        shown = ", ".join(repr(n) for n in names[:2]) if names else ""
        more = f" and {len(names) - 2} more" if len(names) > 2 else ""
        return f" ({len(names)} node{'s' if len(names) != 1 else ''}: {shown}{more})" if names else ""

    listed = ", ".join(f"{op}{nodes(names)}" for op, names in sorted(ops.items()))
    return (f"TVM's ONNX frontend cannot lower {listed}; compile this model with --target onnx "
            f"(ONNX Runtime runs every standard op)")


def check_supported(model: onnx.ModelProto) -> None:
    ops = unsupported_ops(model)
    if ops:
        raise UnsupportedOpError(_unsupported_message(ops))


# ----------------------------------------------------------------------------- static shapes


def bind_symbolic_inputs(model: onnx.ModelProto, default_dim: int) -> dict[str, int]:
    """Give every unknown input dimension a value; the same ``dim_param`` gets one value."""
    inits = {t.name for t in model.graph.initializer}
    chosen: dict[str, int] = {}
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.tensor_type.HasField("shape"):
            continue
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            label = f"{vi.name}[{axis}]" + (f" ({dim.dim_param})" if dim.dim_param else "")
            chosen[label] = default_dim
            dim.Clear()
            dim.dim_value = default_dim
    return chosen


def symbolic_inputs(model: onnx.ModelProto) -> bool:
    """Whether some graph input has a dimension without a value."""
    inits = {t.name for t in model.graph.initializer}
    return any(not (d.HasField("dim_value") and d.dim_value > 0)
               for vi in model.graph.input if vi.name not in inits and vi.type.tensor_type.HasField("shape")
               for d in vi.type.tensor_type.shape.dim)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def name_symbolic_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Give every unknown input dimension a name the frontend takes as one variable, in place:
    an unnamed one becomes ``INPUT_AXIS`` (its own variable), and a name that is not an
    identifier (the frontend would parse ``seq-len`` as ``seq - len``) has its other characters
    replaced by ``_``. The same name keeps one variable. Returns ``{"input[axis]": name}``."""
    inits = {t.name for t in model.graph.initializer}
    dims = [(vi.name, axis, dim) for vi in model.graph.input
            if vi.name not in inits and vi.type.tensor_type.HasField("shape")
            for axis, dim in enumerate(vi.type.tensor_type.shape.dim)
            if not (dim.HasField("dim_value") and dim.dim_value > 0)]
    taken = {dim.dim_param for _, _, dim in dims if _IDENTIFIER.fullmatch(dim.dim_param)}
    renamed: dict[str, str] = {}
    named: dict[str, str] = {}
    for input_name, axis, dim in dims:
        original = dim.dim_param
        if original and _IDENTIFIER.fullmatch(original):
            name = original
        elif original and original in renamed:
            name = renamed[original]
        else:
            base = re.sub(r"\W", "_", original or f"{input_name}_{axis}")
            base = base if _IDENTIFIER.fullmatch(base) else f"d_{base}"
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}_{n}"
            taken.add(name)
            if original:
                renamed[original] = name
        dim.Clear()
        dim.dim_param = name
        named[f"{input_name}[{axis}]"] = name
    return named


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    del model.graph.value_info[:]  # symbolic facts from before binding; inference redoes them
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - e.g. a model over 2 GB: import without the extra facts
        return model


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = [d.dim_value for d in tt.shape.dim]
    return shapes


def _rewrite_nodes(model: onnx.ModelProto, rewrite) -> int:
    """Replace each top-level node for which ``rewrite(node)`` returns a list of nodes (None:
    keep it); returns how many were replaced."""
    rewritten, nodes = 0, []
    for node in model.graph.node:
        replacement = rewrite(node)
        if replacement is None:
            nodes.append(node)
        else:
            nodes.extend(replacement)
            rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 13)


def fold_static_shapes(model: onnx.ModelProto) -> int:
    """``Shape(x)`` -> a constant wherever ``x`` has a fully static shape."""
    shapes = _static_shapes(model)

    def rewrite(node):
        if node.op_type != "Shape" or node.domain not in ONNX_DOMAINS or node.input[0] not in shapes:
            return None
        dims = shapes[node.input[0]]
        attrs = {a.name: a.i for a in node.attribute}
        value = np.array(dims[attrs.get("start", 0): attrs.get("end", len(dims))], dtype=np.int64)
        return [helper.make_node("Constant", [], list(node.output), name=node.name, value=numpy_helper.from_array(value))]

    return _rewrite_nodes(model, rewrite)


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: t for t in model.graph.initializer}
    out = {name: numpy_helper.to_array(t) for name, t in values.items()}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def split_constant_clips(model: onnx.ModelProto) -> int:
    """``Clip(x, lo, hi)`` with constant bounds -> ``Min(Max(x, lo), hi)``: the same math the
    frontend emits, but as Relax ops that layout conversion can see through."""
    consts = _constants(model)

    def rewrite(node):
        bounds = list(node.input[1:3]) + [""] * (3 - len(node.input))
        if (node.op_type != "Clip" or node.domain not in ONNX_DOMAINS
                or any(b and (b not in consts or consts[b].size != 1 or np.isnan(consts[b]).any()) for b in bounds[:2])):
            return None
        lo, hi = bounds[:2]
        x = node.input[0]
        if lo and hi:
            mid = f"{node.output[0]}__clip_lo"
            return [helper.make_node("Max", [x, lo], [mid], name=f"{node.name}__max"),
                    helper.make_node("Min", [mid, hi], list(node.output), name=f"{node.name}__min")]
        if lo:
            return [helper.make_node("Max", [x, lo], list(node.output), name=f"{node.name}__max")]
        if hi:
            return [helper.make_node("Min", [x, hi], list(node.output), name=f"{node.name}__min")]
        return [helper.make_node("Identity", [x], list(node.output), name=node.name)]

    return _rewrite_nodes(model, rewrite)


def unroll_small_pows(model: onnx.ModelProto) -> int:
    """``Pow(x, 2.0)`` -> ``x*x`` and ``Pow(x, 3.0)`` -> ``x*x*x`` (GELU's tanh form, variances).
    TVM lowers other exponents to a scalar ``powf`` call per element, which LLVM cannot
    vectorize: in GPT's MLP it cost more than the matmul it is fused with."""
    consts = _constants(model)

    def rewrite(node):
        exponent = consts.get(node.input[1]) if node.op_type == "Pow" and len(node.input) == 2 else None
        if (node.domain not in ONNX_DOMAINS or exponent is None or exponent.size != 1
                or exponent.dtype.kind != "f" or float(exponent.reshape(())) not in (2.0, 3.0)):
            return None
        x, out = node.input[0], node.output[0]
        if float(exponent.reshape(())) == 2.0:
            return [helper.make_node("Mul", [x, x], [out], name=f"{node.name}__square")]
        square = f"{out}__square"
        return [helper.make_node("Mul", [x, x], [square], name=f"{node.name}__square"),
                helper.make_node("Mul", [square, x], [out], name=f"{node.name}__cube")]

    return _rewrite_nodes(model, rewrite)


def upsample_as_conv(model: onnx.ModelProto) -> int:
    """A 2-D ``ConvTranspose`` whose stride equals its square kernel, without padding (the
    learned 2x upsampling of detection and segmentation heads) -> a 1x1 ``Conv`` to
    ``O * k * k`` channels, then ``DepthToSpace`` (CRD) by ``k``: each input pixel writes its own
    ``k x k`` output block, ``y[o, k*h + i, k*w + j] = sum_c x[c, h, w] * W[c, o, i, j] + b[o]``,
    the same sums. TVM lowers conv2d_transpose with an unscheduled NCHW kernel (PP-OCRv4's text
    detector: 24 -> 24 channels from 80x80, 2.4 ms of its 8.4); the 1x1 conv takes the fast conv
    rules, in NHWC with its neighbours."""
    consts = _constants(model)
    added = []

    def rewrite(node):
        if node.op_type != "ConvTranspose" or node.domain not in ONNX_DOMAINS or node.input[1] not in consts:
            return None
        weight = consts[node.input[1]]
        bias = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k = list(weight.shape[2:])
        if (weight.ndim != 4 or weight.dtype != np.float32 or k[0] != k[1] or attrs.get("group", 1) != 1
                or list(attrs.get("strides", [1, 1])) != k or any(attrs.get("pads", [0])) or "output_shape" in attrs
                or any(attrs.get("output_padding", [0])) or any(d != 1 for d in attrs.get("dilations", [1, 1]))
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID")
                or (len(node.input) > 2 and node.input[2] and bias is None)):
            return None
        channels, outputs, block = weight.shape[0], weight.shape[1], k[0]
        names = [f"{node.output[0]}__{suffix}" for suffix in ("w1x1", "b1x1", "blocks")]
        added.append(numpy_helper.from_array(
            np.ascontiguousarray(weight.transpose(1, 2, 3, 0).reshape(outputs * block * block, channels, 1, 1)), names[0]))
        inputs = [node.input[0], names[0]]
        if bias is not None:
            added.append(numpy_helper.from_array(np.repeat(bias.astype(np.float32), block * block), names[1]))
            inputs.append(names[1])
        return [helper.make_node("Conv", inputs, [names[2]], name=f"{node.name}__1x1", kernel_shape=[1, 1]),
                helper.make_node("DepthToSpace", [names[2]], list(node.output), name=f"{node.name}__blocks",
                                 blocksize=block, mode="CRD")]

    rewritten = _rewrite_nodes(model, rewrite)
    model.graph.initializer.extend(added)
    return rewritten


def _float_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Each float tensor's dims as far as they are known (None: symbolic or unknown)."""
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    dims = {t.name: list(t.dims) for t in model.graph.initializer if t.data_type in floats}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and tt.elem_type in floats:
            dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return dims


def _axis(dims: dict, node, axis: int) -> tuple[int, int] | None:
    """``(axis, extent)`` of the float input of ``node`` along ``axis`` (negative counts from the
    end), when its rank and that extent are known; None otherwise."""
    shape = dims.get(node.input[0])
    if shape is None or not -len(shape) <= axis < len(shape) or shape[axis] is None:
        return None
    return axis % len(shape), shape[axis]


def _slice(data: str, start: int, end: int, axis: int, out: str, name: str, base: str) -> list:
    """``data[start:end]`` along ``axis`` as a Slice written to ``out``, with its constant bounds
    (``{base}_starts``, ``{base}_ends``, ``{base}_axes``)."""
    bounds = {"starts": [start], "ends": [end], "axes": [axis]}
    return [*(helper.make_node("Constant", [], [f"{base}_{key}"], name=f"{name}_{key}",
                               value=numpy_helper.from_array(np.array(value, dtype=np.int64)))
              for key, value in bounds.items()),
            helper.make_node("Slice", [data, f"{base}_starts", f"{base}_ends", f"{base}_axes"], [out], name=name)]


def slice_constant_gathers(model: onnx.ModelProto) -> int:
    """``Gather(x, i)`` with a constant scalar index -> ``Squeeze(Slice(x, i, i+1))``: the same
    elements, but as a strided slice that fuses with the reshapes and transposes around it. TVM
    lowers a Gather to ``take``, an opaque kernel with index arithmetic per element (ViT's split
    of its fused QKV: 36 such kernels, 4 ms of a 38 ms run)."""
    if _opset(model) < 13:  # Squeeze takes its axes as an input from opset 13
        return 0
    consts = _constants(model)
    dims = _float_dims(model)  # shape arithmetic (integer Gathers) the frontend evaluates itself

    def rewrite(node):
        if node.op_type != "Gather" or node.domain not in ONNX_DOMAINS or len(node.input) != 2:
            return None
        index = consts.get(node.input[1])
        found = _axis(dims, node, next((a.i for a in node.attribute if a.name == "axis"), 0))
        if (index is None or index.ndim != 0 or index.dtype.kind not in "iu" or found is None
                or not -found[1] <= int(index) < found[1]):
            return None
        axis, extent = found
        start = int(index) % extent
        base = f"{node.output[0]}__gather"
        return [*_slice(node.input[0], start, start + 1, axis, f"{base}_slice", f"{node.name}__slice", base),
                helper.make_node("Squeeze", [f"{base}_slice", f"{base}_axes"], list(node.output),
                                 name=f"{node.name}__squeeze")]

    return _rewrite_nodes(model, rewrite)


def slice_splits(model: onnx.ModelProto) -> int:
    """A float ``Split`` with known sizes -> one ``Slice`` per output: the same elements, but
    each part fuses with what reads it (GPT-2's QKV split feeds three reshape-transposes). TVM
    lowers a Split to one kernel writing every part (GPT-2: 0.6 ms per layer, run on one thread)."""
    if _opset(model) < 10:  # Slice takes its bounds as inputs from opset 10
        return 0
    consts = _constants(model)
    dims = _float_dims(model)

    def rewrite(node):
        if node.op_type != "Split" or node.domain not in ONNX_DOMAINS:
            return None
        attrs = {a.name: a for a in node.attribute}
        found = _axis(dims, node, attrs["axis"].i if "axis" in attrs else 0)
        if found is None:
            return None
        axis, extent = found
        if "split" in attrs:  # before opset 13
            sizes = list(attrs["split"].ints)
        elif len(node.input) > 1 and node.input[1]:
            sizes = consts.get(node.input[1])
            sizes = [int(v) for v in sizes.ravel()] if sizes is not None else None
        else:  # equal parts, the last one smaller when the extent does not divide (opset 18)
            part = -(-extent // len(node.output))
            sizes = [min(part, extent - i * part) for i in range(len(node.output))]
        if sizes is None or len(sizes) != len(node.output) or sum(sizes) != extent or min(sizes) < 0:
            return None
        starts = np.cumsum([0, *sizes]).tolist()
        return [n for index, out in enumerate(node.output) if out
                for n in _slice(node.input[0], starts[index], starts[index + 1], axis, out,
                                f"{node.name}__slice{index}", f"{out}__split{index}")]

    return _rewrite_nodes(model, rewrite)


# ----------------------------------------------------------------------------- import

_CONVERTING = re.compile(r"Error converting operator (\w+)")


def import_onnx(model: onnx.ModelProto):
    """The frontend, kept quiet: it prints on failure and warns through ``warnings``."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    printed = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed), _symbolic_range():
            warnings.simplefilter("ignore")
            mod = from_onnx(model, keep_params_in_input=False)
    except tvm.error.OpNotImplemented as e:
        ops = re.findall(r"[A-Za-z]\w*", str(e).split(":")[-1])
        raise UnsupportedOpError(_unsupported_message({op: [] for op in ops} or {"?": []})) from None
    except Exception as e:  # noqa: BLE001 - a converter failed on this particular node
        match = _CONVERTING.search(printed.getvalue())
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if match:
            raise UnsupportedOpError(
                f"TVM's ONNX frontend failed to convert a {match.group(1)} node ({first[:300]}); "
                "compile this model with --target onnx") from None
        raise CompileError(f"TVM's ONNX frontend failed: {first[:300]}") from None
    return fix_relax(mod)


@contextlib.contextmanager
def _symbolic_range():
    """The frontend's converter table, with ``Range`` replaced by ``SymbolicRange`` while we
    import (the frontend looks the table up for every node; it has no hook for converters)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map

    def convert_map():
        table = dict(original())
        table["Range"] = _range_converter(table["Range"])
        return table

    onnx_frontend._get_convert_map = convert_map
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


@functools.cache
def _range_converter(fallback):
    """A ``Range`` converter: ``relax.op.arange`` when the limit is a symbolic dimension and
    start and delta are integer constants (``Range(0, Shape(x)[1], 1)``), whose length Relax
    knows as ``limit - start`` (delta 1) rather than as a value computed at run time."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import get_constant

    class SymbolicRange(fallback):
        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            values = [get_constant(x, params) for x in inputs]
            start, limit, delta = values
            if (tvm.ir.is_prim_expr(limit) and not isinstance(limit, tvm.ir.GenericConst)
                    and all(_int_scalar(v) is not None for v in (start, delta)) and _int_scalar(delta) != 0
                    and str(getattr(limit, "dtype", None) or getattr(limit, "ty", "")).startswith("int")):
                dtype = str(start.value.numpy().dtype)
                return relax.op.arange(_int_scalar(start), limit, _int_scalar(delta), dtype=dtype)
            return fallback._impl_v12(bb, inputs, attr, params)

    return SymbolicRange


def _int_scalar(value) -> int | None:
    import tvm

    if not isinstance(value, tvm.ir.GenericConst):
        return None
    array = value.value.numpy()
    return int(array.reshape(())) if array.size == 1 and array.dtype.kind in "iu" else None


def symbolic_shapes_known(mod) -> str | None:
    """None if every tensor of ``main`` has a known shape (symbolic dims included); else the
    first binding whose shape the import lost (a shape computed from data at run time)."""
    from tvm import relax

    main = mod["main"]
    values = [(f"input {_var_name(p)}", p) for p in main.params]
    for block in getattr(main.body, "blocks", []):
        values += [(_var_name(b.var), b.var) for b in block.bindings]
    values.append(("output", main.body.body if hasattr(main.body, "body") else main.body))
    for name, value in values:
        for ty in _tensor_types(getattr(value, "ty", None), relax):
            if ty.shape is None:
                return name
    return None


def _var_name(var) -> str:
    return str(getattr(var, "name", None) or getattr(var, "name_hint", "?"))


def _tensor_types(ty, relax):
    if isinstance(ty, relax.TensorType):
        yield ty
    elif type(ty).__name__ == "TupleType":
        for field_ty in ty.fields:
            yield from _tensor_types(field_ty, relax)


# ----------------------------------------------------------------------------- Relax fixes


def fix_relax(mod):
    """Two rewrites of the frontend's output, then dead-code elimination:

    - ``max(stack(broadcast_to(a), broadcast_to(b)), axis=0)`` (how it imports a two-input
      Max/Min/Sum) -> ``maximum(a, b)``: no stacked copy, and layout conversion sees through it;
    - ``take(..., mode="fast")`` (Gather) -> ``mode="wrap"``: ONNX allows negative indices, and
      fast mode reads out of bounds on them or on a bad token id where ORT reports an error.
    """
    from tvm import relax

    pairwise = {"relax.max": relax.op.maximum, "relax.min": relax.op.minimum, "relax.sum": relax.op.add}

    @relax.expr_functor.mutator
    class Fixer(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = op_name(call)
            if name == "relax.take" and str(call.attrs.mode) == "fast":
                return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="wrap")
            if name in pairwise and not call.attrs.keepdims and call.attrs.axis is not None \
                    and [int(a) for a in call.attrs.axis] == [0]:
                stacked = bound_value(self, call.args[0])
                if op_name(stacked) == "relax.stack" and int(stacked.attrs.axis) == 0:
                    fields = bound_value(self, stacked.args[0])
                    if isinstance(fields, relax.Tuple) and len(fields.fields) == 2:
                        parts = []
                        for field in fields.fields:
                            b = bound_value(self, field)
                            parts.append(b.args[0] if op_name(b) == "relax.broadcast_to" else field)
                        return pairwise[name](parts[0], parts[1])
            return call

    return rewrite_functions(Fixer, mod)


def rewrite_functions(mutator_class, mod):
    """Every Relax function of ``mod`` through a ``PyExprMutator``, then dead-code elimination
    (the rewritten-away bindings)."""
    from tvm import relax

    mutator = mutator_class(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())


def op_name(expr) -> str | None:
    """The operator a Relax call applies (``relax.nn.conv2d``); None for anything else."""
    import tvm
    from tvm import relax

    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else None


def bound_value(mutator, expr):
    """What the dataflow variable ``expr`` is bound to, seen from a ``PyExprMutator``; else ``expr``."""
    from tvm import relax

    value = mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else None
    return value if value is not None else expr


def constant_value(mutator, expr):
    """The numpy value of a constant (a weight) seen from a ``PyExprMutator``, through the
    ``permute_dims`` that ConvertLayout or Gemm's transB put before it; None if not constant."""
    import numpy as np
    import tvm

    expr = bound_value(mutator, expr)
    if isinstance(expr, tvm.ir.expr.GenericConst) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()
    if op_name(expr) == "relax.permute_dims":
        inner = constant_value(mutator, expr.args[0])
        axes = expr.attrs.axes
        if inner is not None:
            return np.transpose(inner, None if axes is None else [int(a) for a in axes])
    return None


def tensor_dims(expr) -> list[int | None] | None:
    """The dims of a Relax tensor expression (None for a symbolic one); None if its shape is unknown."""
    import tvm

    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    return [int(v) if isinstance(v, (int, tvm.tirx.IntImm)) else None for v in shape.values]


def relax_pass(name: str, mutator_class):
    """``rewrite_functions`` as a module pass, for a pass list."""
    import tvm

    return tvm.transform.module_pass(lambda mod, _ctx: rewrite_functions(mutator_class, mod), opt_level=0, name=name)
