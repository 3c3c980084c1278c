"""Winograd F(2x2, 3x3) convolutions for the TVM ``llvm`` target.

A 3x3 stride-1 conv computes each 2x2 block of outputs from a 4x4 patch of input with 16
multiplies per input/output channel pair instead of 36 (Lavin and Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016):

    U = G g G^T        the weights, 3x3 -> 4x4, once at compile time (numpy, float64)
    V = B^T d B        each 4x4 input patch (adds only)          block ``winograd_input``
    M[e] = V[e] @ U[e]  16 independent matmuls over channels      block ``winograd_matmul``
    Y = A^T M A        each 2x2 output block (adds only)         block ``winograd_output``

All three are one kernel (``winograd_conv2d``), and the bias, ReLU and residual add that follow
fuse into it as into a direct conv (FuseOps sees an out-elementwise-fusable op). The Transform
rule computes V and M per row of 2x2 blocks inside the parallel loop over output rows, so the
transformed patches and products of a row (28 KB for a 56-wide, 16-channel conv) stay in the L1
and L2 caches between the stages. The transforms multiply by 0, +-1 and +-1/2 only, so the
result differs from the direct conv by rounding: relative error ~1e-7 on ResNet's convs.

Measured on ResNet's 3x3 convs (Zen 4, 2 threads, each kernel alone, with bias and ReLU), direct
-> three kernels (session 3) -> one: 56x56x16 73 -> 57 -> 41 us, 28x28x32 70 -> 48 -> 34 us,
14x14x64 67 -> 40 -> 35 us. As three kernels the 16-channel convs gained nothing inside the whole
model (800 KB of patches and products left the L2 cache between kernels); as one they do.

Large rows stay ahead although a row's stages outgrow the L2 cache: 112x112x64 2.0 ms against
4.4 direct, 224x224x32 2.2 against 4.5 (computing them per 28 blocks of a row instead: 2-4%).

Applies to: NHWC/HWIO conv2d, 3x3, stride 1, dilation 1, padding 1, one group, constant
weights, static even height and width, at least ``MIN_CHANNELS`` out and a vector's worth (and
``MIN_CHANNELS``) in. Everything else keeps the direct conv. Imported only after TVM is known
to be importable.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, s_tir, te, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from . import schedule as rules
from .prepare import constant_value, op_name, relax_pass, tensor_dims

# Fewer output channels than this: untested. Fewer input channels than a vector holds: the
# transforms run on part-vectors and lose (8 -> 8 on AVX-512: 132 us against 24 direct).
MIN_CHANNELS = 8
KERNEL = "winograd_conv2d"
INPUT_BLOCK, MATMUL_BLOCK, OUTPUT_BLOCK = "winograd_input", "winograd_matmul", "winograd_output"
OUT_ELEMWISE_FUSABLE = 4  # relax OpPatternKind::kOutEWiseFusable, as conv2d: the epilogue fuses in
ROW_TILE_MAX = 8  # 2x2 blocks per register tile of the matmul (times one vector of channels)

# F(2x2, 3x3): weights G (4x3), input B^T (4x4), output A^T (2x4).
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)


def transform_weights(weight: np.ndarray) -> np.ndarray:
    """HWIO 3x3 weights -> ``U[4*a + b, ci, co] = (G g G^T)[a, b]``, float32."""
    u = np.einsum("ai,ijco,bj->abco", G, weight.astype(np.float64), G)
    return u.reshape(16, weight.shape[2], weight.shape[3]).astype(weight.dtype)


def _bt_rows(value, a):
    """Row ``a`` of ``B^T @ value`` for a 4-vector ``value(i)``:
    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]."""
    return tirx.Select(a == 0, value(0) - value(2),
                       tirx.Select(a == 1, value(1) + value(2),
                                   tirx.Select(a == 2, value(2) - value(1), value(1) - value(3))))


def _at_rows(value, r):
    """Row ``r`` of ``A^T @ value``: A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]."""
    return tirx.Select(r == 0, value(0) + value(1) + value(2), value(1) - value(2) - value(3))


def input_transform(data: te.Tensor) -> te.Tensor:
    """NHWC ``data`` -> ``V[e, p, c]``: e = 4a + b over the 4x4 patch, p over the 2x2 output
    blocks (n, block row, block column); the zero padding of 1 is read through a condition."""
    batch, height, width, channels = (int(d) for d in data.shape)
    rows, cols = height // 2, width // 2
    dtype = data.dtype

    def patch(p, c, i, j):
        h = p % (rows * cols) // cols * 2 + i - 1
        w = p % cols * 2 + j - 1
        inside = tirx.all(h >= 0, h < height, w >= 0, w < width)
        return tirx.if_then_else(inside, data[p // (rows * cols), h, w, c], tirx.const(0, dtype))

    def compute(e, p, c):
        row = lambda j: _bt_rows(lambda i: patch(p, c, i, j), e // 4)  # noqa: E731
        return _bt_rows(row, e % 4)

    return te.compute((16, batch * rows * cols, channels), compute, name=INPUT_BLOCK)


def output_transform(products: te.Tensor, batch: int, height: int, width: int) -> te.Tensor:
    """``M[e, p, co]`` -> NHWC output: each 2x2 block is ``A^T M A`` of its 4x4 products."""
    rows, cols = height // 2, width // 2

    def compute(n, h, w, o):
        p = n * rows * cols + h // 2 * cols + w // 2
        column = lambda a: _at_rows(lambda b: products[4 * a + b, p, o], w % 2)  # noqa: E731
        return _at_rows(column, h % 2)

    return te.compute((batch, height, width, int(products.shape[2])), compute, name=OUTPUT_BLOCK)


def conv2d(data: te.Tensor, weights: te.Tensor) -> te.Tensor:
    """NHWC ``data`` and transformed weights ``U[e, ci, co]`` -> NHWC output, as three stages."""
    batch, height, width, channels = (int(d) for d in data.shape)
    patches = input_transform(data)
    ci = te.reduce_axis((0, channels), name="ci")
    products = te.compute((16, int(patches.shape[1]), int(weights.shape[2])),
                          lambda e, p, co: te.sum(patches[e, p, ci] * weights[e, ci, co], axis=ci),
                          name=MATMUL_BLOCK)
    return output_transform(products, batch, height, width)


def rewrite_pass(lanes: int):
    """A Relax pass: eligible conv2d -> one ``winograd_conv2d`` kernel (see ``conv2d``)."""

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if op_name(call) != "relax.nn.conv2d":
                return call
            attrs = call.attrs
            if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "HWIO", "NHWC") \
                    or int(attrs.groups) != 1 or [int(v) for v in attrs.strides] != [1, 1] \
                    or [int(v) for v in attrs.dilation] != [1, 1] or [int(v) for v in attrs.padding] != [1, 1, 1, 1]:
                return call
            shape = tensor_dims(call.args[0])
            weight = constant_value(self, call.args[1])
            if shape is None or None in shape or weight is None or weight.shape[:2] != (3, 3) or weight.dtype != np.float32:
                return call
            batch, height, width, channels = shape
            if height % 2 or width % 2 or channels < max(MIN_CHANNELS, lanes) or weight.shape[3] < MIN_CHANNELS:
                return call
            if str(attrs.out_dtype) not in ("", "None", "void", "float32"):
                return call
            return self.builder_.call_te(conv2d, call.args[0], relax.const(transform_weights(weight)),
                                         primfunc_name_hint=KERNEL,
                                         primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})

    return relax_pass("WinogradConv2d", Rewriter)


def row_tile(blocks: int) -> int:
    """2x2 blocks per register tile of the matmul, for a row of ``blocks``: the whole row if it
    fits, else the widest divisor from 4 up, else ``ROW_TILE_MAX`` with a shorter last tile (a
    26-wide conv has 13 blocks: tiles of 1 ran 73 us, no faster than the direct conv's 78; tiles
    of 8 with a tail of 5, 32 us)."""
    if blocks <= ROW_TILE_MAX:
        return blocks
    divisors = [d for d in range(4, ROW_TILE_MAX + 1) if blocks % d == 0]
    return max(divisors) if divisors else ROW_TILE_MAX


def _written_shape(sch: s_tir.Schedule, block) -> list:
    return [rules._static(d) for d in sch.get(block).writes[0].source.shape]


class Transform(CPUScheduleRule):
    """A ``winograd_conv2d`` kernel with its fused epilogue: parallel over rows of 2x2 output
    blocks; per row, the input transform (one loop per channel vector, the 16 transform elements
    unrolled so that their index selects fold to constants and the patch loads are shared), the
    16 matmuls (register tiles of up to ``ROW_TILE_MAX`` blocks times one channel vector), then
    the output transform and epilogue (2x2 unrolled, channels in vectors)."""

    def apply(self, func: tirx.PrimFunc, target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        stages = {INPUT_BLOCK, MATMUL_BLOCK, OUTPUT_BLOCK}
        if not stages <= {sch.get(info.block_rv).name_hint for info in infos}:
            return None
        try:
            return self._schedule(sch, infos, target)
        except Exception:  # noqa: BLE001 - an unexpected loop nest: the other rules try
            return None

    @staticmethod
    def _channel_split(sch, loop, target):
        extent = rules._extent(sch, loop)
        lanes = rules.vector_lanes(target)
        width = lanes if extent % lanes == 0 else rules.vector_tile(extent, lanes)
        return sch.split(loop, factors=[None, width])

    def _schedule(self, sch, infos, target):
        patches, products = sch.get_sblock(INPUT_BLOCK), sch.get_sblock(MATMUL_BLOCK)
        shape = _written_shape(sch, sch.get_sblock(OUTPUT_BLOCK))
        epilogue = [info for info in infos if sch.get(info.block_rv).name_hint not in (INPUT_BLOCK, MATMUL_BLOCK)]
        remaining = try_inline(sch, epilogue)
        # one loop nest over the output's own NHWC shape (not a transpose of it)
        if len(remaining) != 1 or _written_shape(sch, remaining[0].block_rv) != shape:
            return None
        out = remaining[0].block_rv
        loops = sch.get_loops(out)  # [n,] h, w, o: a batch of 1 has no loop of its own
        if len(loops) not in (3, 4):
            return None
        batch, (h, w, o) = loops[:-3], loops[-3:]
        h_outer, h_inner = sch.split(h, factors=[None, 2])
        w_outer, w_inner = sch.split(w, factors=[None, 2])
        o_outer, o_inner = self._channel_split(sch, o, target)
        sch.reorder(*batch, h_outer, w_outer, o_outer, h_inner, w_inner, o_inner)
        row = sch.fuse(*batch, h_outer) if batch else h_outer
        sch.compute_at(products, row)
        sch.compute_at(patches, row)
        sch.parallel(row)
        sch.unroll(h_inner)
        sch.unroll(w_inner)
        sch.vectorize(o_inner)

        e, p, co, ci = sch.get_loops(products)[-4:]
        blocks = rules._extent(sch, p)
        tile = row_tile(blocks)
        p_outer, p_inner = sch.split(p, factors=[None, tile])
        co_outer, co_inner = self._channel_split(sch, co, target)
        sch.reorder(e, p_outer, co_outer, ci, p_inner, co_inner)
        sch.unroll(p_inner)
        sch.vectorize(co_inner)
        init = sch.decompose_reduction(products, ci)
        sch.vectorize(sch.get_loops(init)[-1])

        e, p, c = sch.get_loops(patches)[-3:]
        c_outer, c_inner = self._channel_split(sch, c, target)
        sch.reorder(p, c_outer, e, c_inner)
        sch.unroll(e)
        sch.vectorize(c_inner)
        return sch
