"""bf16 matmuls and convolutions for the TVM ``llvm`` target: AVX512_BF16 dot products.

``--quantize bf16`` (convert-float) leaves MatMul/Gemm/Conv with bf16 inputs and outputs. TVM's
own lowering legalizes every bf16 op to fp32 arithmetic with a rounding after each, runs the
contractions as the fp32 rules' loop nests converting each element, and has no bf16 LayerNorm.
Here instead (docs/targets/tvm.md, "bf16 kernels"):

    Relax (after ConvertLayout, before LegalizeOps):      ``rewrite_pass``
      matmul(x, W const [K, N])               -> bf16_dense(x, Wp)            fp32 out (symbolic
                                                 rows: padded to whole tiles in the kernel)
      conv2d NHWC or NCHW-in, W const         -> bf16_conv2d(x, Wp)           fp32 out
        Wp: the weights packed at compile time as [N/16, ..., K/2, 16, 2]: 16 output channels by
        a pair along the reduction, the 64 bytes one ``vdpbf16ps`` reads (an odd K: a zero row)
      matmul(a, b) of two activations         -> bf16_batch_matmul(a, b)      b packed at run time
      any other bf16 matmul/conv2d (depthwise, N not a multiple of 16): out_dtype fp32, so TVM's
        kernel accumulates in fp32
      elementwise ops after one (bias, activation, residual): on the fp32 result, one rounding
        to bf16 at the end of the chain (``_epilogue_fp32``)
      layer_norm/rms_norm/group_norm on bf16: on fp32 copies
    Schedule (``Dot``, a dlight rule before ours):
      register tile of ``rows`` x ``vectors`` x 16 fp32 accumulators; per pair of the reduction
      one broadcast of x's two bf16 (32 bits) per row and one 64-byte load of Wp per vector,
      then ``vdpbf16ps`` (the tensor intrinsics ``dot_intrinsic``); the fused epilogue runs per
      tile on the fp32 accumulators

The intrinsic: TVM legalizes every bf16 value to fp32 (compute) or uint16 (storage) before LLVM
sees it, so it cannot pass the ``<32 x bfloat>`` operands LLVM's
``llvm.x86.avx512bf16.dpbf16ps.512`` takes. A three-line LLVM function (``DPBF16PS_LL``) does
the bitcast from ``<16 x i32>``; the intrinsic's body imports it (``pragma_import_llvm``) and
calls it, and LLVM inlines it to one instruction. A kernel's own buffers of bf16 would become
fp32 ones, so its copies (padding, run-time packing) hold uint16 bits.

Only where the target has ``avx512bf16`` (``has_bf16``): elsewhere the rewrite only makes the
accumulation and the epilogues fp32. Imported only after TVM is known to be importable.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, s_tir, te, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.script import tirx as T

from . import schedule as rules
from .prepare import bound_value, constant_value, op_name, relax_pass, tensor_dims

LANES = 16  # fp32 accumulators per zmm register
PAIR = 2  # bf16 values per fp32 lane that vdpbf16ps multiplies and adds
DENSE, CONV, BATCH = "bf16_dense", "bf16_conv2d", "bf16_batch_matmul"  # kernel names (primfunc_name_hint)
BLOCK = "bf16_dot"  # the reduction block the schedule rule looks for
OUT_ELEMWISE_FUSABLE = 4  # relax OpPatternKind::kOutEWiseFusable: the epilogue fuses in
ACCUMULATORS = 24  # zmm registers for the tile's accumulators (of 32; the rest: loads, broadcasts)
STORAGE = ("bfloat16", "uint16")  # bf16 values, or their bits in uint16 (``bits``)
PARALLEL_MIN_WORK = rules.PARALLEL_MIN_WORK
# Normalizations whose TOPI kernels take fp32 and fp16 only: computed on fp32 copies (their
# statistics are then fp32, as convert-float wants; the copies fuse into the kernel).
FP32_NORMS = {"relax.nn.layer_norm", "relax.nn.rms_norm", "relax.nn.group_norm"}
# Elementwise ops an epilogue is made of, computed in fp32 after a contraction (``_epilogue_fp32``).
ELEMENTWISE = {f"relax.{op}" for op in ("add", "subtract", "multiply", "divide", "maximum", "minimum", "erf", "tanh",
                                         "sigmoid", "clip", "negative", "nn.relu", "nn.gelu", "nn.gelu_tanh",
                                         "nn.silu")}

DPBF16PS_LL = """
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define linkonce_odr <16 x float> @infoptc_dpbf16ps(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) alwaysinline {
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %r
}
"""


def has_bf16(target) -> bool:
    """Whether the LLVM target has AVX512_BF16 (vdpbf16ps)."""
    try:
        return target.kind.name == "llvm" and bool(rules.llvm_cpu_has_features(["avx512bf16"], target))
    except Exception:  # noqa: BLE001 - a triple this LLVM cannot query
        return False


# ----------------------------------------------------------------------------- the intrinsic


def dot_intrinsic(a_dtype: str, b_dtype: str) -> str:
    """The name of the ``vdpbf16ps`` intrinsic for x and packed-weight buffers of these dtypes."""
    return f"infoptc_dot_16x2_{a_dtype}_{b_dtype}_f32"


def _intrinsic(a_dtype: str, b_dtype: str):
    """(description, implementation) of one ``vdpbf16ps``: 16 fp32 accumulators += a pair of x
    times 16 pairs of packed weights, each held as bf16 or as bf16 bits in uint16."""
    pair, block = f"{a_dtype}x2", f"{b_dtype}x32"

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((2,), a_dtype, offset_factor=1, align=2),
             B: T.Buffer((16, 2), b_dtype, offset_factor=1, align=2),
             C: T.Buffer((16,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(T.reinterpret(A[vk], dtype="bfloat16"), "float32") \
                            * T.cast(T.reinterpret(B[vi, vk], dtype="bfloat16"), "float32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), a_dtype, offset_factor=1, align=2),
             B: T.Buffer((16, 2), b_dtype, offset_factor=1, align=2),
             C: T.Buffer((16,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            with T.attr(0, "pragma_import_llvm", DPBF16PS_LL):
                bits = T.reinterpret(A.vload([0], pair), dtype="int32")
                C[T.ramp(T.int32(0), 1, 16)] = T.call_pure_extern(
                    "float32x16", "infoptc_dpbf16ps", C.vload([0], "float32x16"), T.broadcast(bits, 16),
                    T.reinterpret(B.vload([0, 0], block), dtype="int32x16"))

    return desc, impl


# Operands read from a kernel's own buffers (the conv's padded copy, a matmul's operands packed at
# run time) are held as uint16 bits: TVM's bf16 legalization turns a kernel's own bf16 buffers
# into fp32 ones, whose pairs are no longer the 32 bits vdpbf16ps broadcasts.
for _a in STORAGE:
    for _b in STORAGE:
        s_tir.TensorIntrin.register(dot_intrinsic(_a, _b), *_intrinsic(_a, _b), override=True)


# ----------------------------------------------------------------------------- compute


def pack_weights(weight: np.ndarray) -> np.ndarray:
    """``[..., K, N]`` (N a multiple of 16) -> ``[N/16, ..., K/2, 16, 2]`` bf16, an odd K padded
    with a zero row (the input gets a zero channel to match: RGB stems)."""
    if weight.shape[-2] % PAIR:
        weight = np.concatenate([weight, np.zeros_like(weight[..., :1, :])], axis=-2)
    *window, k, n = weight.shape
    packed = weight.reshape(*window, k // PAIR, PAIR, n // LANES, LANES)
    order = [len(window) + 2, *range(len(window)), len(window), len(window) + 3, len(window) + 1]
    return np.ascontiguousarray(packed.transpose(order))


def _dot(a, b):
    return a.astype("float32") * b.astype("float32")


def _bits(tensor: te.Tensor, shape, index, inside, name: str) -> te.Tensor:
    """A uint16 copy of a bf16 ``tensor``'s bits in ``shape``: ``tensor[index(*i)]`` where
    ``inside(*i)``, else zero (padding); an fp32 ``tensor`` (the model's input) rounded to bf16
    on the way, so its Cast needs no kernel of its own."""
    zero = tirx.const(0, "uint16")

    def value(*i):
        v = tensor[index(*i)]
        return tirx.reinterpret("uint16", v) if v.dtype == "bfloat16" else round_to_bf16_bits(v)

    return te.compute(shape, lambda *i: tirx.if_then_else(inside(*i), value(*i), zero), name=name)


def round_to_bf16_bits(value):
    """The bf16 bits of an fp32 ``value``, rounded to nearest even (a NaN stays a quiet NaN), in
    integer arithmetic: TVM's bf16 legalization computes a bf16 value as fp32, so the bits of a
    rounded value cannot be had by reinterpreting it."""
    bits = tirx.reinterpret("uint32", value)
    rounded = (bits + tirx.const(0x7FFF, "uint32") + ((bits >> tirx.const(16, "uint32")) & tirx.const(1, "uint32"))) \
        >> tirx.const(16, "uint32")
    nan = (bits & tirx.const(0x7FFFFFFF, "uint32")) > tirx.const(0x7F800000, "uint32")
    return tirx.Select(nan, tirx.const(0x7FC0, "uint16"), rounded.astype("uint16"))


def _as_bf16(bits: te.Tensor):
    return lambda *index: tirx.reinterpret("bfloat16", bits[index])


def _rows_of(main: te.Tensor, shape) -> te.Tensor:
    """The first ``shape`` of ``main`` (padded rows and columns dropped): part of the epilogue."""
    return te.compute(shape, lambda *i: main[i], name="bf16_rows")


def padded_rows(rows: int, channels: int) -> int:
    """Rows to compute for ``rows`` when the register tile wants padding (``register_tile``:
    a prime count such as ViT's 197 tokens leaves tiles of one row), else ``rows``."""
    tile, vectors = register_tile(rows, channels // LANES)
    if tile >= 4 or rows <= 4:
        return rows
    tile = ACCUMULATORS // vectors
    return -(-rows // tile) * tile


def dense(data: te.Tensor, packed: te.Tensor, rows: int | None = None) -> te.Tensor:
    """``out[..., n] = sum_k data[..., k] * W[k, n]`` in fp32, W packed by ``pack_weights``;
    ``rows``: the second-last axis computed padded to that many (``padded_rows``)."""
    pairs = int(packed.shape[1])
    ko, ki = te.reduce_axis((0, pairs), "ko"), te.reduce_axis((0, PAIR), "ki")
    n = int(packed.shape[0]) * LANES
    *lead, m, k = (d if rules._static(d) is None else int(d) for d in data.shape)
    if any(rules._static(d) is None for d in data.shape):  # rows known at run time: padded to tiles
        tile = ACCUMULATORS // next(v for v in (4, 2, 1) if (n // LANES) % v == 0)
        rows = tirx.floordiv(m + tile - 1, tile) * tile
    read = lambda *i: data[i]  # noqa: E731
    rows = m if rows is None or rows == m else rows
    if rows is not m or k % PAIR or data.dtype != "bfloat16":
        read = _as_bf16(_bits(data, (*lead, rows, pairs * PAIR), lambda *i: i,
                              lambda *i: tirx.all(i[-2] < m, i[-1] < k), "bf16_bits"))
    main = te.compute((*lead, rows, n), lambda *i: te.sum(
        _dot(read(*i[:-1], ko * PAIR + ki), packed[i[-1] // LANES, ko, i[-1] % LANES, ki]), axis=[ko, ki]), name=BLOCK)
    return main if rows is m else _rows_of(main, (*lead, m, n))


def batch_matmul(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """``a @ b`` of two bf16 activations (attention's scores and context), fp32: b packed at run
    time as the weights are at compile time, the reduction padded to pairs, the columns to
    vectors and the rows to whole tiles (``padded_rows``)."""
    *lead, m, k = (int(d) for d in a.shape)
    n = int(b.shape[-1])
    pairs, vectors = -(-k // PAIR), -(-n // LANES)
    rows = padded_rows(m, vectors * LANES)
    x = _bits(a, (*lead, rows, pairs * PAIR), lambda *i: i, lambda *i: tirx.all(i[-2] < m, i[-1] < k), "bf16_bits")
    packed = _bits(b, (*lead, vectors, pairs, LANES, PAIR),
                   lambda *i: (*i[:-4], i[-3] * PAIR + i[-1], i[-4] * LANES + i[-2]),
                   lambda *i: tirx.all(i[-3] * PAIR + i[-1] < k, i[-4] * LANES + i[-2] < n), "bf16_packed")
    ko, ki = te.reduce_axis((0, pairs), "ko"), te.reduce_axis((0, PAIR), "ki")
    main = te.compute((*lead, rows, vectors * LANES), lambda *i: te.sum(
        _dot(_as_bf16(x)(*i[:-1], ko * PAIR + ki), _as_bf16(packed)(*i[:-2], i[-1] // LANES, ko, i[-1] % LANES, ki)),
        axis=[ko, ki]), name=BLOCK)
    return main if (rows, vectors * LANES) == (m, n) else _rows_of(main, (*lead, m, n))


def conv2d(data: te.Tensor, packed: te.Tensor, strides, padding, dilation, layout: str = "NHWC") -> te.Tensor:
    """``data`` (NHWC, or NCHW: an RGB input read in place), weights packed from HWIO: NHWC fp32
    output. The zero padding (of the borders, and of an odd channel count to pairs), the
    transpose from NCHW and the rounding of an fp32 input are one copy stage of bf16 bits."""
    top, left, bottom, right = padding
    (sh, sw), (dh, dw) = strides, dilation
    if layout == "NCHW":
        batch, channels, height, width = (int(d) for d in data.shape)
    else:
        batch, height, width, channels = (int(d) for d in data.shape)
    groups, kh, kw, pairs = (int(d) for d in packed.shape[:4])
    read = lambda *i: data[i]  # noqa: E731
    if any(padding) or channels % PAIR or layout != "NHWC" or data.dtype != "bfloat16":
        read = _as_bf16(_bits(
            data, (batch, height + top + bottom, width + left + right, pairs * PAIR),
            lambda b, y, x, c: (b, c, y - top, x - left) if layout == "NCHW" else (b, y - top, x - left, c),
            lambda b, y, x, c: tirx.all(y >= top, y < height + top, x >= left, x < width + left, c < channels),
            "pad_temp"))
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    ky, kx = te.reduce_axis((0, kh), "ky"), te.reduce_axis((0, kw), "kx")
    ko, ki = te.reduce_axis((0, pairs), "ko"), te.reduce_axis((0, PAIR), "ki")
    return te.compute(
        (batch, out_h, out_w, groups * LANES),
        lambda b, y, x, f: te.sum(_dot(read(b, y * sh + ky * dh, x * sw + kx * dw, ko * PAIR + ki),
                                       packed[f // LANES, ky, kx, ko, f % LANES, ki]), axis=[ky, kx, ko, ki]),
        name=BLOCK)


# ----------------------------------------------------------------------------- Relax rewrite


def _dtype(expr) -> str:
    return str(getattr(getattr(expr, "ty", None), "dtype", ""))


def _void(dtype) -> bool:
    return str(dtype) in ("", "None", "void")


def rewrite_pass(target):
    """A Relax pass: bf16 matmul/conv2d -> packed dot-product kernels (``has_bf16``), or fp32
    accumulation for the rest; see the module docstring."""
    packing = has_bf16(target)

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self, mod=None):
            super().__init__(mod)
            self.widened = set()  # the fp32 values this pass made (a model's own Casts stay)

        def _rounded(self, fp32):
            """``fp32`` bound to a variable the epilogues may read, rounded to bf16."""
            var = self.builder_.emit(fp32) if not isinstance(fp32, relax.Var) else fp32
            self.widened.add(var)
            return relax.op.astype(var, "bfloat16")

        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = op_name(call)
            if name in FP32_NORMS and _dtype(call.args[0]) == "bfloat16":
                return self._in_fp32(call)
            if name in ELEMENTWISE or (name == "relax.astype" and str(call.attrs.dtype) == "float32"):
                return self._epilogue_fp32(call, name)
            if name not in ("relax.matmul", "relax.nn.conv2d"):
                return call
            dtypes = {_dtype(arg) for arg in call.args}
            if dtypes != {"bfloat16"} or not (_void(call.attrs.out_dtype) or str(call.attrs.out_dtype) == "bfloat16"):
                return call
            fp32 = self._packed(call, name) if packing else None
            if fp32 is None:  # TVM's own kernel, accumulating in fp32
                if name == "relax.matmul":
                    fp32 = relax.op.matmul(call.args[0], call.args[1], out_dtype="float32")
                else:
                    a = call.attrs
                    fp32 = relax.op.nn.conv2d(call.args[0], call.args[1], a.strides, a.padding, a.dilation, a.groups,
                                              a.data_layout, a.kernel_layout, a.out_layout, "float32")
            return self._rounded(fp32)

        def _fp32_source(self, arg):
            """``x`` where ``arg`` is ``astype(x, bf16)`` of an fp32 ``x`` this pass made (a
            contraction's result, an epilogue's)."""
            value = bound_value(self, arg)
            if op_name(value) == "relax.astype" and str(value.attrs.dtype) == "bfloat16" \
                    and any(value.args[0].same_as(v) for v in self.widened):
                return value.args[0]
            return None

        def _epilogue_fp32(self, call, name):
            """An elementwise op on a contraction's rounded result computes on its fp32 value
            instead (the other bf16 operands widened: constants fold), rounded once after it.
            A chain (bias, activation, residual) peels one op at a time: one rounding at its
            end, fp32 math in the fused kernel; a cast back to fp32 drops the rounding."""
            sources = [self._fp32_source(arg) for arg in call.args]
            if not any(s is not None for s in sources):
                return call
            if name == "relax.astype":
                return sources[0]
            emit = self.builder_.emit
            args = [src if src is not None else emit(relax.op.astype(arg, "float32")) if _dtype(arg) == "bfloat16"
                    else arg for arg, src in zip(call.args, sources)]
            return self._rounded(relax.Call(call.op, args, call.attrs))

        def _in_fp32(self, call):
            """A normalization TOPI has no bf16 kernel for, on fp32 copies of its bf16 inputs."""
            emit = self.builder_.emit
            args = [emit(relax.op.astype(arg, "float32")) if _dtype(arg) == "bfloat16" else arg
                    for arg in call.args]
            return self._rounded(relax.Call(call.op, args, call.attrs))

        def _packed(self, call, name):
            weight = constant_value(self, call.args[1])
            dims = tensor_dims(call.args[0])
            if dims is None or dims[-1] is None or (None in dims and (weight is None or name != "relax.matmul")):
                return None  # symbolic dims: only a dense (its rows)
            if weight is None:
                other = tensor_dims(call.args[1])
                if name != "relax.matmul" or other is None or None in other or len(dims) < 3 \
                        or dims[:-2] != other[:-2] or dims[-1] != other[-2]:
                    return None
                return self.builder_.call_te(batch_matmul, call.args[0], call.args[1], primfunc_name_hint=BATCH,
                                             primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
            if name == "relax.matmul":
                if weight.ndim != 2 or len(dims) < 2 or dims[-1] != weight.shape[0]:
                    return None
            else:
                a = call.attrs
                if a.data_layout not in ("NHWC", "NCHW") or (a.kernel_layout, a.out_layout) != ("HWIO", "NHWC") \
                        or int(a.groups) != 1 or len(dims) != 4:
                    return None
            if weight.shape[-1] % LANES:
                return None
            packed = relax.const(pack_weights(weight))
            attrs = {"op_pattern": OUT_ELEMWISE_FUSABLE}
            data, value = call.args[0], bound_value(self, call.args[0])
            if op_name(value) == "relax.astype" and _dtype(value.args[0]) == "float32":
                data = value.args[0]  # an fp32 input (the model's): the kernel rounds it as it copies
            if name == "relax.matmul":
                rows = None if None in dims else padded_rows(dims[-2], weight.shape[-1])
                return self.builder_.call_te(dense, data, packed, rows,
                                             primfunc_name_hint=DENSE, primfunc_attrs=attrs)
            return self.builder_.call_te(conv2d, data, packed, [int(v) for v in a.strides],
                                         [int(v) for v in a.padding], [int(v) for v in a.dilation], str(a.data_layout),
                                         primfunc_name_hint=CONV, primfunc_attrs=attrs)

    return relax_pass("Bf16Contractions", Rewriter)


# ----------------------------------------------------------------------------- schedule


def register_tile(rows_extent: int, vectors_extent: int) -> tuple[int, int]:
    """``(rows, vectors)``: vectors of 16 output channels per tile (4, 2 or 1, dividing the
    channel vectors), rows the widest divisor of the row extent that keeps the accumulators
    within ``ACCUMULATORS`` registers."""
    vectors = next(v for v in (4, 2, 1) if vectors_extent % v == 0)
    rows = rules._largest_divisor(rows_extent, ACCUMULATORS // vectors)
    if vectors > 1 and rows < 4:  # few rows (a 7x7 map has 49 = 7 x 7): narrower and taller
        vectors = 1 if vectors == 2 else 2
        rows = rules._largest_divisor(rows_extent, ACCUMULATORS // vectors)
    return rows, vectors


class Dot(CPUScheduleRule):
    """A ``bf16_dense``/``bf16_conv2d`` kernel with its fused epilogue: parallel over output
    tiles; per tile, the reduction loops outside a ``rows x vectors x 16`` block of fp32
    accumulators fed by ``vdpbf16ps``; the epilogue per tile, in vectors."""

    def apply(self, func: tirx.PrimFunc, target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target) or not has_bf16(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        mains = [info for info in infos if sch.get(info.block_rv).name_hint.startswith(BLOCK)]
        if len(mains) != 1:
            return None
        try:
            return self._schedule(sch, infos, mains[0], target)
        except Exception:  # noqa: BLE001 - an unexpected loop nest: the other rules try (fp32 accumulation)
            return None

    def _schedule(self, sch, infos, main, target):
        index = infos.index(main)
        prologue, epilogue = infos[:index], infos[index + 1:]
        block = main.block_rv
        loops = sch.get_loops(block)
        kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
        n_spatial = kinds.index(tirx.IterVar.CommReduce)
        spatial, reduction = loops[:n_spatial], loops[n_spatial:]
        row_loops, channel = spatial[:-1], spatial[-1]
        if not row_loops or rules._extent(sch, reduction[-1]) != PAIR:
            return None
        # The tile's rows along the last row axis (an output row's pixels; a matrix's rows): a
        # split of fused axes (y, x) maps to the output by division, which tensorize cannot
        # blockize.
        *others, row = row_loops
        work = rules._work([rules._extent(sch, loop) for loop in loops])
        rows_extent, channels = rules._extent(sch, row), rules._extent(sch, channel)
        if rows_extent is None:  # symbolic rows, padded to whole tiles of this many (``dense``)
            vectors = next(v for v in (4, 2, 1) if (channels // LANES) % v == 0)
            rows = ACCUMULATORS // vectors
        else:
            rows, vectors = register_tile(rows_extent, channels // LANES)
        row_outer, row_inner = sch.split(row, factors=[None, rows])
        ch_outer, ch_vec, ch_lane = sch.split(channel, factors=[None, vectors, LANES])
        # Column tiles outside row tiles: a tile's weights (vectors x K x 32 bytes, 256 KB for
        # BERT's 2048-long FFN reduction) stay in cache across the rows (BERT-small's
        # FFN-down kernel: 35 -> 2.6 ms in 4 calls, under load)
        sch.reorder(ch_outer, *others, row_outer, *reduction[:-1], row_inner, ch_vec, ch_lane, reduction[-1])
        tile = sch.fuse(ch_outer, *others, row_outer)

        if work >= PARALLEL_MIN_WORK and rules._extent(sch, tile) != 1:
            sch.parallel(tile)
        local = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(local, tile, preserve_unit_loops=True)
        init = sch.decompose_reduction(block, reduction[0])
        sch.vectorize(sch.split(sch.get_loops(init)[-1], factors=[None, LANES])[1])
        operands = [str(region.source.dtype) for region in sch.get(block).reads]
        sch.tensorize(ch_lane, dot_intrinsic(*[d for d in operands if d in STORAGE]))
        sch.unroll(row_inner)
        sch.unroll(ch_vec)

        remaining = try_inline(sch, list(epilogue))
        if len(remaining) == 1:
            try:
                sch.reverse_compute_inline(local)
                local = None
            except Exception:  # noqa: BLE001 - not inlinable: keep the copy block
                pass
        for info in remaining:
            try:
                sch.reverse_compute_at(info.block_rv, tile, preserve_unit_loops=True)
                self._vectorize_lanes(sch, info.block_rv)
            except Exception:  # noqa: BLE001 - a layout change: scheduled on its own
                rules._parallelize_vectorize(sch, info.block_rv, LANES)
        if local is not None:
            self._vectorize_lanes(sch, local)
        for info in reversed(prologue):  # the padding: one parallel pass
            rules._parallelize_vectorize(sch, info.block_rv, LANES)
        return sch

    @staticmethod
    def _vectorize_lanes(sch, block) -> None:
        inner = sch.get_loops(block)[-1]
        extent = rules._extent(sch, inner)
        if extent and extent % LANES == 0:
            sch.vectorize(sch.split(inner, factors=[None, LANES])[1])
