"""Packed weights for the llvm target's matmuls and convolutions: ``x @ W`` with a constant ``W``
(K x N) reads ``W`` as ``[N / w, K, w]``, the column strip of each register tile contiguous; an
NHWC convolution with a constant HWIO weight reads it as ``[F / w, KH, KW, C, w]``.

The ``Contraction`` rule (schedule.py) computes ``rows x w`` outputs per tile, reading a
``K x w`` strip of ``W`` whose rows are ``N`` floats apart: each of the ``K`` reads lands on
another cache line and, for ``N >= 1024``, another page, so the prefetchers and the TLB fall
behind. Packed once at compile time (the weight is a constant), the strip is one contiguous
block: 1.34-1.54x faster on BERT's and GPT-2's matmuls (128x512 @ 512x2048: 4.39 -> 3.18 ms,
128x768 @ 768x3072: 9.54 -> 6.21 ms, measured side by side under load on 2 cores), the same
layout ONNX Runtime's MLAS packs its weights into.

The packed matmul is a TE compute the rule schedules like any contraction. Its rows are the
flattened leading dims of ``x``; a row count the register tile does not divide (ViT's 197
tokens) is computed padded to whole tiles, the extra rows reading the last real row (a clamped
index: no condition in the inner loop), and a column count that is not whole strips reads the
zero columns the packing adds; a slice drops the extra rows and columns. Symbolic rows keep the plain
matmul, whose padding the rule does itself (``pad_einsum`` needs plain indices).

Imported only by the TVM targets (backends/tvm/) after TVM itself is known to be importable.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from . import schedule as rules
from .prepare import constant_value, op_name, relax_pass, tensor_dims

MIN_COLUMNS_FACTOR = 2  # pack only weights at least this many register tiles wide


def pack_weights_pass(target):
    """A Relax pass: fp32 matmuls and NHWC convolutions with constant weights and static rows
    read their weights packed."""
    lanes = rules.vector_lanes(target)
    registers = rules.accumulator_registers(target)

    @relax.expr_functor.mutator
    class Packer(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = op_name(call)
            weight = constant_value(self, call.args[1]) if name in ("relax.matmul", "relax.nn.conv2d") else None
            if weight is None or weight.dtype != np.float32:
                return call
            if name == "relax.matmul":
                packed = _packed_matmul(self.builder_, call, weight, lanes, registers)
            else:
                packed = _packed_conv2d(self.builder_, call, weight, lanes)
            return call if packed is None else packed

    return relax_pass("PackWeights", Packer)


def strip_width(columns: int, lanes: int) -> int | None:
    """The width of the strips a weight of ``columns`` columns is packed in: the register tile's
    width when it is whole vectors, otherwise whole vectors with zero columns added; None for a
    weight under MIN_COLUMNS_FACTOR tiles wide (the plain layout's tile is as good)."""
    width = rules.vector_tile(columns, lanes)
    if width % lanes:
        width = min((2 * lanes, lanes), key=lambda w: -(-columns // w) * w)
    return width if columns >= MIN_COLUMNS_FACTOR * width else None


def pack_columns(weight: np.ndarray, width: int) -> np.ndarray:
    """``weight[..., n]`` as ``[n / width, ..., width]``, zero columns added to whole strips."""
    *lead, n = weight.shape
    strips = -(-n // width)
    wide = np.zeros((*lead, strips * width), np.float32)
    wide[..., :n] = weight
    wide = wide.reshape(*lead, strips, width)
    return np.ascontiguousarray(np.moveaxis(wide, -2, 0))


def _crop(product, shape):
    from tvm import topi

    have = [int(d) for d in product.shape]
    return product if have == list(shape) else topi.strided_slice(product, [0] * len(shape), list(shape))


def _packed_matmul(builder, call, w: np.ndarray, lanes: int, registers: int):
    x = call.args[0]
    dims = tensor_dims(x)
    if w.ndim != 2 or getattr(x.ty, "dtype", None) != "float32" or not dims or len(dims) < 2 \
            or None in dims or dims[-1] != w.shape[0]:
        return None
    k, n = w.shape
    width = strip_width(n, lanes)
    if width is None:
        return None
    rows = int(np.prod(dims[:-1]))
    most = max(1, registers // -(-width // lanes))
    tile_rows = rules.padded_rows(rows, most) if rows > 1 else 1
    padded_rows = -(-rows // tile_rows) * tile_rows
    packed = pack_columns(w, width)
    strips = packed.shape[0]

    def compute(data, strips_of_w):
        from tvm import te, topi

        flat = topi.reshape(data, (rows, k))
        red = te.reduce_axis((0, k), "k")
        last = rows - 1
        product = te.compute(
            (padded_rows, strips * width),
            lambda m, j: te.sum(flat[te.min(m, last), red] * strips_of_w[j // width, red, j % width], axis=red),
            name="packed_matmul")
        return topi.reshape(_crop(product, (rows, n)), [*dims[:-1], n])

    return builder.call_te(compute, x, relax.const(packed), primfunc_name_hint="matmul_packed")


def _packed_conv2d(builder, call, w: np.ndarray, lanes: int):
    """An NHWC/HWIO convolution (groups 1) read its weight as ``[F / w, KH, KW, C, w]``; 3x3
    stride-1 ones went to Winograd before this pass, if eligible."""
    attrs = call.attrs
    x = call.args[0]
    dims = tensor_dims(x)
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "HWIO", "NHWC") \
            or int(attrs.groups) != 1 or w.ndim != 4 or not dims or None in dims or dims[3] != w.shape[2] \
            or str(attrs.out_dtype) not in ("", "None", "void", "float32") or getattr(x.ty, "dtype", None) != "float32":
        return None
    kh, kw, channels, features = w.shape
    width = strip_width(features, lanes)
    if width is None:
        return None
    (sh, sw), (dh, dw) = [int(v) for v in attrs.strides], [int(v) for v in attrs.dilation]
    top, left, bottom, right = [int(v) for v in attrs.padding]
    batch, height, width_in, _ = dims
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width_in + left + right - (kw - 1) * dw - 1) // sw + 1
    packed = pack_columns(w, width)
    strips = packed.shape[0]

    def compute(data, strips_of_w):
        from tvm import te, topi

        padded = topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, 0], name="pad_temp") \
            if top or left or bottom or right else data
        ky, kx = te.reduce_axis((0, kh), "ky"), te.reduce_axis((0, kw), "kx")
        c = te.reduce_axis((0, channels), "c")
        product = te.compute(
            (batch, out_h, out_w, strips * width),
            lambda b, y, xx, f: te.sum(padded[b, y * sh + ky * dh, xx * sw + kx * dw, c]
                                       * strips_of_w[f // width, ky, kx, c, f % width], axis=[ky, kx, c]),
            name="packed_conv2d_nhwc")
        return _crop(product, (batch, out_h, out_w, features))

    return builder.call_te(compute, x, relax.const(packed), primfunc_name_hint="conv2d_packed")
