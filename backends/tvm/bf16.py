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
        a pair along the reduction, the 64 bytes one ``vdpbf16ps`` reads (an odd K: a zero row;
        N not a multiple of 16: zero columns, dropped from the output; one or two rows: N padded
        to whole tiles of 4 vectors)
      depthwise conv2d NHWC, W const, C % 16 == 0
                                              -> bf16_depthwise(x, W fp32)    fp32 out
      matmul(a, b) of two activations         -> bf16_batch_matmul(a, b)      b packed at run time
      any other bf16 matmul/conv2d: out_dtype fp32, so TVM's kernel accumulates in fp32
      elementwise ops after one (bias, activation, residual), and a global pool (mean) of one:
        on the fp32 result, one rounding to bf16 at the end of the chain (``_epilogue_fp32``)
      layer_norm/rms_norm/group_norm on bf16: on fp32 copies
    Schedule (``Dot``, a dlight rule before ours):
      register tile of ``rows`` x ``vectors`` x 16 fp32 accumulators; per pair of the reduction
      one broadcast of x's two bf16 (32 bits) per row and one 64-byte load of Wp per vector,
      then ``vdpbf16ps`` (the tensor intrinsics ``dot_intrinsic``); the fused epilogue runs per
      tile on the fp32 accumulators. ``bf16_depthwise``: tiles of a row's pixels by 16 or 32
      channels, the window unrolled (each input pixel loaded and widened once per window row),
      fp32 FMAs, the epilogue and its rounding per tile

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
DEPTHWISE = "bf16_depthwise"  # kernel and block name of the depthwise conv (``depthwise``)
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
# Reductions that read a contraction's fp32 result where there is one (a squeeze-excitation's
# global pool of a depthwise conv's output): no bf16 copy of that output is written for them.
FP32_READERS = {"relax.mean"}

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


def pad_columns(weight: np.ndarray, multiple: int = LANES) -> np.ndarray:
    """``[..., K, N]`` with zero columns up to a ``multiple`` of them (MobileNet's and
    EfficientNet's 24- and 40-channel projections, a 1000-class head): the kernel computes
    the padded columns and its output drops them."""
    extra = -weight.shape[-1] % multiple
    return np.concatenate([weight, np.zeros((*weight.shape[:-1], extra), weight.dtype)], axis=-1) if extra else weight


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


def dense(data: te.Tensor, packed: te.Tensor, rows: int | None = None, columns: int | None = None) -> te.Tensor:
    """``out[..., n] = sum_k data[..., k] * W[k, n]`` in fp32, W packed by ``pack_weights``;
    ``rows``: the second-last axis computed padded to that many (``padded_rows``); ``columns``:
    the output's real width where W was padded with zero columns to whole vectors."""
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
    columns = n if columns is None else columns
    return main if rows is m and columns == n else _rows_of(main, (*lead, m, columns))


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


def conv2d(data: te.Tensor, packed: te.Tensor, strides, padding, dilation, layout: str = "NHWC",
           features: int | None = None) -> te.Tensor:
    """``data`` (NHWC, or NCHW: an RGB input read in place), weights packed from HWIO: NHWC fp32
    output. The zero padding (of the borders, and of an odd channel count to pairs), the
    transpose from NCHW and the rounding of an fp32 input are one copy stage of bf16 bits.
    ``features``: the real output channels where the weights were padded to whole vectors."""
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
    main = te.compute(
        (batch, out_h, out_w, groups * LANES),
        lambda b, y, x, f: te.sum(_dot(read(b, y * sh + ky * dh, x * sw + kx * dw, ko * PAIR + ki),
                                       packed[f // LANES, ky, kx, ko, f % LANES, ki]), axis=[ky, kx, ko, ki]),
        name=BLOCK)
    if features is None or features == groups * LANES:
        return main
    return _rows_of(main, (batch, out_h, out_w, features))


def depthwise(data: te.Tensor, weight: te.Tensor, strides, padding, dilation) -> te.Tensor:
    """A depthwise conv of NHWC bf16 ``data`` with fp32 ``weight`` ``[kh, kw, C]`` (converted at
    compile time: a few KB), fp32 output: each bf16 input widened on load (a 16-bit shift),
    fp32 multiply-adds. The zero padding is not copied (a 3x3 or 5x5 window is too short a
    reduction to pay for a copy of the input): a pixel outside reads its nearest edge pixel
    and a select makes it zero, no branch."""
    top, left, bottom, right = padding
    (sh, sw), (dh, dw) = strides, dilation
    batch, height, width, channels = (int(d) for d in data.shape)
    kh, kw = (int(d) for d in weight.shape[:2])
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    ky, kx = te.reduce_axis((0, kh), "ky"), te.reduce_axis((0, kw), "kx")

    def pixel(b, y, x, c):
        y, x = y - top, x - left
        inside = tirx.all(y >= 0, y < height, x >= 0, x < width)
        clamped = data[b, tirx.max(tirx.min(y, height - 1), 0), tirx.max(tirx.min(x, width - 1), 0), c]
        return tirx.Select(inside, clamped.astype("float32"), tirx.const(0, "float32"))

    return te.compute(
        (batch, out_h, out_w, channels),
        lambda b, y, x, c: te.sum(pixel(b, y * sh + ky * dh, x * sw + kx * dw, c) * weight[ky, kx, c], axis=[ky, kx]),
        name=DEPTHWISE)


# ----------------------------------------------------------------------------- Relax rewrite


def _dtype(expr) -> str:
    return str(getattr(getattr(expr, "ty", None), "dtype", ""))


def _void(dtype) -> bool:
    return str(dtype) in ("", "None", "void")


def _users(mod) -> dict:
    """Each variable of ``mod``'s Relax functions -> the number of bindings that read it."""
    counts = {}
    for _, func in (mod.functions_items() if mod is not None else []):
        if isinstance(func, relax.Function):
            for block in func.body.blocks:
                if isinstance(block, relax.DataflowBlock):
                    for var, users in relax.analysis.udchain(block).items():
                        counts[var] = counts.get(var, 0) + len(users)
                else:
                    for binding in block.bindings:
                        for var in relax.analysis.free_vars(binding.value):
                            counts[var] = counts.get(var, 0) + 1
    return counts


def rewrite_pass(target):
    """A Relax pass: bf16 matmul/conv2d -> packed dot-product kernels (``has_bf16``), or fp32
    accumulation for the rest; see the module docstring."""
    packing = has_bf16(target)

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self, mod=None):
            super().__init__(mod)
            self.widened = set()  # the fp32 values this pass made (a model's own Casts stay)
            self.users = _users(mod)  # the input module's vars -> how many bindings read them

        def _rounded(self, fp32):
            """``fp32`` bound to a variable the epilogues may read, rounded to bf16."""
            var = self.builder_.emit(fp32) if not isinstance(fp32, relax.Var) else fp32
            self.widened.add(var)
            return relax.op.astype(var, "bfloat16")

        def visit_call_(self, call):
            shared = bool(call.args) and self.users.get(call.args[0], 0) > 1
            call = super().visit_call_(call)
            name = op_name(call)
            if name in FP32_NORMS and _dtype(call.args[0]) == "bfloat16":
                return self._in_fp32(call)
            if name in ELEMENTWISE or name in FP32_READERS \
                    or (name == "relax.astype" and str(call.attrs.dtype) == "float32"):
                return self._epilogue_fp32(call, name)
            if name not in ("relax.matmul", "relax.nn.conv2d"):
                return call
            dtypes = {_dtype(arg) for arg in call.args}
            if dtypes != {"bfloat16"} or not (_void(call.attrs.out_dtype) or str(call.attrs.out_dtype) == "bfloat16"):
                return call
            fp32 = (self._depthwise(call) if name == "relax.nn.conv2d" else None) if packing else None
            fp32 = fp32 if fp32 is not None else self._packed(call, name, shared) if packing else None
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

        def _depthwise(self, call):
            """A depthwise conv (one group per channel, NHWC/HWIO, channels in whole vectors)
            -> ``depthwise``, else None."""
            a = call.attrs
            dims, weight = tensor_dims(call.args[0]), constant_value(self, call.args[1])
            if weight is None or dims is None or None in dims or len(dims) != 4 or weight.ndim != 4 \
                    or (a.data_layout, a.kernel_layout, a.out_layout) != ("NHWC", "HWIO", "NHWC") \
                    or int(a.groups) != dims[3] or weight.shape[2:] != (1, dims[3]) or dims[3] % LANES:
                return None
            return self.builder_.call_te(depthwise, call.args[0], relax.const(weight[:, :, 0].astype(np.float32)),
                                         [int(v) for v in a.strides], [int(v) for v in a.padding],
                                         [int(v) for v in a.dilation], primfunc_name_hint=DEPTHWISE,
                                         primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})

        def _packed(self, call, name, shared=False):
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
            features = weight.shape[-1]
            # A row or two (a classifier at batch 1): a tile's independent accumulators are
            # its vectors, so whole tiles of 4 (1000 classes: 1024 columns, not 63 vectors of 1)
            few_rows = name == "relax.matmul" and None not in dims and int(np.prod(dims[:-1])) < 4
            weight = pad_columns(weight, 4 * LANES if few_rows and features > 2 * LANES else LANES)
            packed = relax.const(pack_weights(weight))
            attrs = {"op_pattern": OUT_ELEMWISE_FUSABLE}
            data, value = call.args[0], bound_value(self, call.args[0])
            rows = None if None in dims or name != "relax.matmul" else padded_rows(dims[-2], weight.shape[-1])
            copies = dims[-1] % PAIR or (rows is None or rows != dims[-2] if name == "relax.matmul" else
                                         any(int(v) for v in a.padding) or a.data_layout != "NHWC")
            if op_name(value) == "relax.astype" and _dtype(value.args[0]) == "float32" \
                    and (copies or shared or not any(value.args[0].same_as(v) for v in self.widened)):
                # An fp32 input (the model's), a kernel that copies its input anyway, or an input
                # that others read too (a residual sum: its rounding would be a kernel of its own,
                # as the fp32 value stays for them): the kernel rounds as it copies. Else the
                # producer's epilogue rounds: half the bytes to write and read, and no copy.
                data = value.args[0]
            if name == "relax.matmul":
                return self.builder_.call_te(dense, data, packed, rows, features,
                                             primfunc_name_hint=DENSE, primfunc_attrs=attrs)
            return self.builder_.call_te(conv2d, data, packed, [int(v) for v in a.strides],
                                         [int(v) for v in a.padding], [int(v) for v in a.dilation], str(a.data_layout),
                                         features, primfunc_name_hint=CONV, primfunc_attrs=attrs)

    return relax_pass("Bf16Contractions", Rewriter)


# ----------------------------------------------------------------------------- schedule


def register_tile(rows_extent: int, vectors_extent: int) -> tuple[int, int]:
    """``(rows, vectors)``: the tile with the most dot products per load that divides both
    extents within ``ACCUMULATORS`` registers (``schedule.dot_register_tile``, as int8's)."""
    return rules.dot_register_tile(rows_extent, vectors_extent, ACCUMULATORS)


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
        mains = [info for info in infos if sch.get(info.block_rv).name_hint.startswith((BLOCK, DEPTHWISE))]
        if len(mains) != 1:
            return None
        schedule = self._depthwise if sch.get(mains[0].block_rv).name_hint.startswith(DEPTHWISE) else self._schedule
        try:
            return schedule(sch, infos, mains[0], target)
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
        if rules._extent(sch, reduction[-1]) != PAIR:
            return None
        if not row_loops:  # one row (a classifier at batch 1): normalization dropped its unit loop
            row_loops = [sch.add_unit_loop(channel)]
            loops = sch.get_loops(block)
            spatial, reduction = loops[:n_spatial + 1], loops[n_spatial + 1:]
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

        local = self._accumulate(sch, block, tile, reduction[0], work)
        operands = [str(region.source.dtype) for region in sch.get(block).reads]
        sch.tensorize(ch_lane, dot_intrinsic(*[d for d in operands if d in STORAGE]))
        sch.unroll(row_inner)
        sch.unroll(ch_vec)
        self._epilogue(sch, epilogue, local, tile)
        for info in reversed(prologue):  # the padding: one parallel pass
            rules._parallelize_vectorize(sch, info.block_rv, LANES)
        return sch

    def _depthwise(self, sch, infos, main, _target):
        """``depthwise``: parallel over tiles of ``pixels`` output pixels along a row by
        ``vectors`` x 16 channels; per tile the window's loops outside the fp32 accumulators,
        unrolled, so LLVM loads each input pixel once per window row for the tile's pixels
        that share it; the epilogue (bias, activation, the rounding to bf16) per tile."""
        index = infos.index(main)
        epilogue = infos[index + 1:]
        block = main.block_rv
        loops = sch.get_loops(block)
        kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
        n_spatial = kinds.index(tirx.IterVar.CommReduce)
        spatial, reduction = loops[:n_spatial], loops[n_spatial:]
        if len(spatial) < 2:
            return None
        *others, pixel, channel = spatial
        pixels_extent, channels = rules._extent(sch, pixel), rules._extent(sch, channel)
        vectors = 2 if (channels // LANES) % 2 == 0 else 1
        pixels = rules._largest_divisor(pixels_extent, ACCUMULATORS // vectors)
        work = rules._work([rules._extent(sch, loop) for loop in loops])
        pixel_outer, pixel_inner = sch.split(pixel, factors=[None, pixels])
        ch_outer, ch_vec, ch_lane = sch.split(channel, factors=[None, vectors, LANES])
        sch.reorder(*others, ch_outer, pixel_outer, *reduction, pixel_inner, ch_vec, ch_lane)
        tile = sch.fuse(*others, ch_outer, pixel_outer)
        local = self._accumulate(sch, block, tile, reduction[0], work)
        sch.vectorize(ch_lane)
        sch.unroll(ch_vec)
        sch.unroll(pixel_inner)
        sch.unroll(reduction[-1])
        self._epilogue(sch, epilogue, local, tile)
        return sch

    @staticmethod
    def _accumulate(sch, block, tile, first_reduction, work):
        """The tile loop parallel (enough work), the block's fp32 accumulators in a local buffer
        per tile, zeroed in vectors; returns that buffer's copy-out block."""
        if work >= PARALLEL_MIN_WORK and rules._extent(sch, tile) != 1:
            sch.parallel(tile)
        local = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(local, tile, preserve_unit_loops=True)
        init = sch.decompose_reduction(block, first_reduction)
        sch.vectorize(sch.split(sch.get_loops(init)[-1], factors=[None, LANES])[1])
        return local

    def _epilogue(self, sch, epilogue, local, tile) -> None:
        """The fused epilogue (bias, activation, residual, the rounding to bf16) per tile, in
        vectors, folded into the accumulators' copy-out where it is one block."""
        remaining = try_inline(sch, list(epilogue))
        if len(remaining) == 1 and rules._try(sch.reverse_compute_inline, local):
            local = None
        for info in remaining:
            try:
                sch.reverse_compute_at(info.block_rv, tile, preserve_unit_loops=True)
                self._vectorize_lanes(sch, info.block_rv)
            except Exception:  # noqa: BLE001 - a layout change: scheduled on its own
                rules._parallelize_vectorize(sch, info.block_rv, LANES)
        if local is not None:
            self._vectorize_lanes(sch, local)

    @staticmethod
    def _vectorize_lanes(sch, block) -> None:
        inner = sch.get_loops(block)[-1]
        extent = rules._extent(sch, inner)
        # columns padded to whole vectors: the store of the real ones is guarded, which TVM's
        # vectorizer would make scalar; LLVM vectorizes the plain loop
        if extent and extent % LANES == 0 and not rules._guarded_by(sch, block, inner):
            sch.vectorize(sch.split(inner, factors=[None, LANES])[1])
