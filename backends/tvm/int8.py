"""int8 kernels for the TVM ``llvm`` target: the QDQ graphs of ``--quantize int8`` as integer
contractions on the CPU's u8 x s8 dot-product instructions.

TVM's ONNX frontend imports QuantizeLinear / DequantizeLinear as ``R.quantize`` /
``R.dequantize``; left alone, every DQ becomes fp32 arithmetic and the model runs its Conv,
MatMul and Gemm in fp32 with conversions around them. Two Relax passes change that:

``DecomposeActivationQDQ`` (before ConvertLayout): a Q or DQ of an activation with one scale and
one zero point becomes elementwise arithmetic (``clip(round(x / s) + zp)`` cast to u8;
``(float(q) - zp) * s``), which ConvertLayout sees through, so a quantized CNN runs NHWC from
the first conv to the last without a transpose per layer.

``Int8Contractions`` (after ConvertLayout): ``conv2d(DQ(x_u8), DQ(W_s8))`` (NHWC/HWIO, one
group) and ``matmul(DQ(x_u8), DQ(W_s8))`` with constant weights of zero point 0 become

    acc[.., f] = sum_k x_u8[.., k] * W_s8[k, f]              int32, the ``int8_*`` kernel
    y[.., f]   = float(acc - zx * sum_k W[k, f]) * (sx * sw[f])  fp32, as the DQ -> op gave it

The zero-point term ``zx * sum_k W`` is a constant computed here, and the padding of a conv is
``zx`` (a real 0), so the term is the same at the borders. The weights are packed at compile
time as ``[F / L, (kh, kw,) K / 4, L, 4]`` (L = 16 or 8 output channels per vector), what the
instruction reads. The dequantization, bias, residual add and the next Q are elementwise, and
FuseOps fuses them into the kernel's epilogue: a quantized conv writes u8 for the next one.

The ``Int8Contraction`` schedule rule tiles the kernel (a register block of output rows x one to
four vectors of channels, accumulators in registers) and tensorizes the innermost ``L x 4``
dot product, by the host's features (never assumed):

- AVX512_VNNI: ``vpdpbusd`` zmm (16 channels), ymm where the channels are a multiple of 8 only;
- AVX_VNNI (or AVX512_VNNI + VL): ``vpdpbusd`` ymm;
- AVX-512BW / AVX2 without VNNI: ``vpmaddubsw`` + ``vpmaddwd``. ``vpmaddubsw`` adds pairs of
  u8 x s8 products in saturating int16, exact only while ``|w| <= 63`` (2 * 255 * 63 < 2^15):
  the quantizer's AVX2 recipe (7-bit weights, docs/quantization.md). A layer with larger
  weights keeps its fp32 conv on such a host, with a warning, rather than saturate.

Not covered (they keep the fp32 op between DQ and Q): depthwise and grouped convs, a MatMul of
two activations (attention), int8 (signed) activations, weights with a nonzero zero point,
output channels that are not a multiple of 8.

Imported only after TVM is known to be importable.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, s_tir, te, tirx, topi
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.script import tirx as T
from tvm.target.codegen import llvm_cpu_has_features

from . import schedule as rules
from .prepare import bound_value, constant_value, op_name, relax_pass, tensor_dims

log = logging.getLogger("infoptc.backends.tvm")

CONV_BLOCK, DENSE_BLOCK, DEPTHWISE_BLOCK = "int8_conv2d", "int8_dense", "int8_depthwise"
OUT_ELEMWISE_FUSABLE = 4  # relax OpPatternKind::kOutEWiseFusable: the epilogue fuses in
PMADD_WEIGHT_MAX = 63  # |w| for which vpmaddubsw's int16 pair sums cannot saturate
MAX_VECTORS = 4  # vectors of output channels per register tile


# ----------------------------------------------------------------------------- instructions


def _dot_desc(lanes: int):
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    return desc


def _vnni_impl(lanes: int):
    """``c += dot4(a, b)`` per lane: one ``vpdpbusd`` (this LLVM types its operands as bytes)."""
    name = f"llvm.x86.avx512.vpdpbusd.{lanes * 32}"
    i32, i8 = f"int32x{lanes}", f"int8x{lanes * 4}"

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            a_i8 = T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"), lanes), dtype=i8)
            c[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(name), c.vload([0], dtype=i32), a_i8, b.vload([0, 0], dtype=i8), dtype=i32)

    return impl


def _pmadd_impl(lanes: int):
    """``c += dot4(a, b)`` per lane without VNNI: ``vpmaddubsw`` (u8 x s8 pairs -> int16,
    saturating) then ``vpmaddwd`` by ones (int16 pairs -> int32)."""
    if lanes == 16:
        pairs, quads = "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"
    else:
        pairs, quads = "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"
    i32, i16, i8, u8 = f"int32x{lanes}", f"int16x{lanes * 2}", f"int8x{lanes * 4}", f"uint8x{lanes * 4}"

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            a_u8 = T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"), lanes), dtype=u8)
            sums = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(pairs), a_u8, b.vload([0, 0], dtype=i8),
                                           dtype=i16)
            c[T.ramp(T.int32(0), 1, lanes)] = c.vload([0], dtype=i32) + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(quads), sums, T.broadcast(T.int16(1), lanes * 2), dtype=i32)

    return impl


INTRINSICS = {}  # (kind, lanes) -> registered tensor intrinsic name
for _lanes in (16, 8):
    for _kind, _impl in (("vnni", _vnni_impl), ("pmadd", _pmadd_impl)):
        INTRINSICS[_kind, _lanes] = f"infoptc_dot_{_lanes}x4_u8i8i32_{_kind}"
        s_tir.TensorIntrin.register(INTRINSICS[_kind, _lanes], _dot_desc(_lanes), _impl(_lanes), override=True)


def _has(target, *features: str) -> bool:
    try:
        return bool(llvm_cpu_has_features(list(features), target))
    except Exception:  # noqa: BLE001 - a target this LLVM cannot query (another architecture)
        return False


def instruction(target, lanes: int) -> str | None:
    """``"vnni"``, ``"pmadd"`` or None: how this target computes an ``lanes x 4`` u8 x s8 dot."""
    if target.kind.name != "llvm" or not _has(target, "avx2"):
        return None
    if lanes == 16:
        return "vnni" if _has(target, "avx512vnni", "avx512bw") else "pmadd" if _has(target, "avx512bw") else None
    if _has(target, "avxvnni") or _has(target, "avx512vnni", "avx512vl"):
        return "vnni"
    return "pmadd"


def choose_lanes(target, channels: int, weight_max: int) -> tuple[int, str] | str | None:
    """Output channels per vector and the instruction for a layer; ``"saturates"`` where only
    ``vpmaddubsw`` is available and the weights exceed its exact range; None where neither fits
    (both: the layer stays fp32)."""
    for lanes in (16, 8):
        kind = instruction(target, lanes) if channels % lanes == 0 else None
        if kind == "pmadd" and weight_max > PMADD_WEIGHT_MAX:
            return "saturates"
        if kind is not None:
            return lanes, kind
    return None


# ----------------------------------------------------------------------------- kernels


def pack_weights(weight: np.ndarray, lanes: int) -> np.ndarray:
    """``[..., K, F]`` int8 (HWIO, or a matmul's ``[K, F]``) -> ``[F / lanes, ..., K4 / 4, lanes, 4]``,
    K padded with zeros to a multiple of 4 (K4)."""
    *window, k, f = weight.shape
    k4 = -(-k // 4) * 4
    padded = np.zeros((*window, k4, f), np.int8)
    padded[..., :k, :] = weight
    blocks = padded.reshape(*window, k4 // 4, 4, f // lanes, lanes)
    n = len(window)
    order = [n + 2] + list(range(n)) + [n, n + 3, n + 1]
    return np.ascontiguousarray(blocks.transpose(order))


def conv2d_te(data: te.Tensor, packed: te.Tensor, strides, padding, dilation, zero_point: int):
    """NHWC u8 ``data`` and packed weights ``[F/L, kh, kw, C4/4, L, 4]`` -> NHWC int32. The
    padding (and the channels up to C4) hold ``zero_point``: the real value 0."""
    batch, height, width, channels = data.shape
    blocks, kh, kw, c4, lanes, _ = (int(d) for d in packed.shape)
    top, left, bottom, right = (int(v) for v in padding)
    (sh, sw), (dh, dw) = [int(v) for v in strides], [int(v) for v in dilation]
    zero_point = int(zero_point)
    extra = c4 * 4 - int(channels)
    if top or left or bottom or right or extra:
        data = topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, extra], pad_value=zero_point, name="pad_u8")
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    ky, kx = te.reduce_axis((0, kh), "ky"), te.reduce_axis((0, kw), "kx")
    c = te.reduce_axis((0, c4 * 4), "c")
    return te.compute(
        (batch, out_h, out_w, blocks * lanes),
        lambda n, y, x, f: te.sum(data[n, y * sh + ky * dh, x * sw + kx * dw, c].astype("int32")
                                  * packed[f // lanes, ky, kx, c // 4, f % lanes, c % 4].astype("int32"),
                                  axis=[ky, kx, c]),
        name=CONV_BLOCK)


def depthwise_te(data: te.Tensor, weight: te.Tensor, strides, padding, dilation, zero_point: int):
    """NHWC u8 ``data`` and ``weight [kh, kw, C]`` (int8 values as fp32) -> NHWC fp32 sums of
    ``(x - zero_point) * w``: exact integers (9 taps of 255 x 127 are far below 2^24), read from
    the u8 tensor the previous kernel wrote. The padding holds ``zero_point`` (a real 0)."""
    kh, kw, _ = (int(d) for d in weight.shape)
    top, left, bottom, right = (int(v) for v in padding)
    (sh, sw), (dh, dw) = [int(v) for v in strides], [int(v) for v in dilation]
    zero_point = int(zero_point)
    batch, height, width, channels = data.shape
    if top or left or bottom or right:
        data = topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, 0], pad_value=zero_point, name="pad_u8")
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    ky, kx = te.reduce_axis((0, kh), "ky"), te.reduce_axis((0, kw), "kx")
    return te.compute(
        (batch, out_h, out_w, channels),
        lambda n, y, x, c: te.sum((data[n, y * sh + ky * dh, x * sw + kx * dw, c].astype("float32")
                                   - tirx.const(zero_point, "float32")) * weight[ky, kx, c], axis=[ky, kx]),
        name=DEPTHWISE_BLOCK)


def dense_te(data: te.Tensor, packed: te.Tensor):
    """u8 ``data [..., K]`` and packed weights ``[F/L, K4/4, L, 4]`` -> int32 ``[..., F]``."""
    *lead, k = data.shape
    blocks, k4, lanes, _ = (int(d) for d in packed.shape)
    if k4 * 4 != int(k):
        data = topi.nn.pad(data, [0] * (len(lead) + 1), [0] * len(lead) + [k4 * 4 - int(k)], name="pad_u8")
    r = te.reduce_axis((0, k4 * 4), "k")
    return te.compute(
        (*lead, blocks * lanes),
        lambda *i: te.sum(data[(*i[:-1], r)].astype("int32")
                          * packed[i[-1] // lanes, r // 4, i[-1] % lanes, r % 4].astype("int32"), axis=r),
        name=DENSE_BLOCK)


# ----------------------------------------------------------------------------- Relax passes


def _is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.expr.GenericConst) and hasattr(expr.value, "numpy")


def _scalar(expr) -> float | None:
    """The value of a constant holding one number; None otherwise."""
    if _is_const(expr):
        value = expr.value.numpy()
        if value.size == 1:
            return value.reshape(()).item()
    return None


def decompose_qdq_pass():
    """A pass: per-tensor Q/DQ of activations -> elementwise ops (see the module docstring)."""

    @relax.expr_functor.mutator
    class Decompose(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = op_name(call)
            if name not in ("relax.quantize", "relax.dequantize") or _is_const(call.args[0]):
                return call
            scale, zero = _scalar(call.args[1]), _scalar(call.args[2])
            dims = tensor_dims(call.args[0])
            if scale is None or zero is None or dims is None:
                return call
            out_dtype = str(call.attrs.out_dtype)
            f32 = lambda v: relax.const(np.float32(v))  # noqa: E731
            if name == "relax.dequantize":
                if out_dtype != "float32" or str(call.args[0].ty.dtype) not in ("uint8", "int8"):
                    return call
                value = self.builder_.emit(relax.op.astype(call.args[0], "float32"))
                if zero:
                    value = self.builder_.emit(relax.op.subtract(value, f32(zero)))
                return relax.op.multiply(value, f32(scale))
            if out_dtype not in ("uint8", "int8") or str(call.args[0].ty.dtype) != "float32":
                return call
            info = np.iinfo(out_dtype)
            # times 1/s, as ONNX Runtime's fused int8 kernels requantize: a division per element
            # cost more than the rest of a 1x1 conv's epilogue (MobileNetV2's expansions)
            value = self.builder_.emit(relax.op.round(relax.op.multiply(call.args[0], f32(1 / np.float32(scale)))))
            value = self.builder_.emit(relax.op.add(value, f32(zero)))
            value = self.builder_.emit(relax.op.minimum(relax.op.maximum(value, f32(info.min)), f32(info.max)))
            return relax.op.astype(value, out_dtype)

    return relax_pass("DecomposeActivationQDQ", Decompose)


def fold_requantization_pass():
    """A pass: ``(float(acc) * A + B) * C`` with constants ``A``, ``B``, ``C`` (an int8 kernel's
    dequantization, the bias, the next quantization's ``1 / scale``) -> ``float(acc) * (A * C) +
    B * C``: one multiply-add per element in the kernel's epilogue instead of a multiply-add and a
    multiply, as ONNX Runtime's int8 kernels requantize with one scale per output channel. fp32
    reassociation before the rounding: the u8 result can differ on a tie, within one step."""

    @relax.expr_functor.mutator
    class Fold(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            c = constant_value(self, call.args[1]) if op_name(call) == "relax.multiply" else None
            shifted = bound_value(self, call.args[0]) if c is not None else None
            b = constant_value(self, shifted.args[1]) if op_name(shifted) == "relax.add" else None
            scaled = bound_value(self, shifted.args[0]) if b is not None else None
            a = constant_value(self, scaled.args[1]) if op_name(scaled) == "relax.multiply" else None
            cast = bound_value(self, scaled.args[0]) if a is not None else None
            if (op_name(cast) != "relax.astype" or str(cast.args[0].ty.dtype) != "int32"  # an integer accumulator's
                    or any(v.dtype != np.float32 for v in (a, b, c)) or c.size != 1):
                return call
            return relax.op.add(relax.op.multiply(scaled.args[0], relax.const((a * c).astype(np.float32))),
                                relax.const((b * c).astype(np.float32)))

    return relax_pass("FoldRequantization", Fold)


def rewrite_pass(target):
    """A pass: conv2d / matmul of dequantized u8 activations and int8 constant weights ->
    ``int8_conv2d`` / ``int8_dense`` / ``int8_depthwise`` kernels with the dequantization after
    them; one warning names the layers a saturating instruction keeps in fp32."""
    saturating: list[int] = []  # per layer kept fp32 for vpmaddubsw's range: its largest |w|

    def lanes_for(channels: int, values: np.ndarray):
        weight_max = int(np.abs(values.astype(np.int32)).max(initial=0))
        choice = choose_lanes(target, channels, weight_max)
        if choice == "saturates":
            saturating.append(weight_max)
            return None
        return choice

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def _dequantized(self, expr):
            """``(q, scale, zero_point, axes)`` of ``(float(q) - zp) * s`` (DecomposeActivationQDQ's
            DQ) with q uint8, seen through a permute_dims (its axes; None: none); else None."""
            expr = bound_value(self, expr)
            axes = None
            if op_name(expr) == "relax.permute_dims" and expr.attrs.axes is not None:
                axes = [int(a) for a in expr.attrs.axes]
                expr = bound_value(self, expr.args[0])
            if op_name(expr) != "relax.multiply" or _scalar(expr.args[1]) is None:
                return None
            scale, inner = _scalar(expr.args[1]), bound_value(self, expr.args[0])
            zero = 0.0
            if op_name(inner) == "relax.subtract" and _scalar(inner.args[1]) is not None:
                zero, inner = _scalar(inner.args[1]), bound_value(self, inner.args[0])
            if op_name(inner) != "relax.astype" or str(inner.args[0].ty.dtype) != "uint8" \
                    or str(inner.attrs.dtype) != "float32" or zero != int(zero):
                return None
            return inner.args[0], float(scale), int(zero), axes

        def _weight(self, expr):
            """``(int8 values, scale)`` of a dequantized constant (through permute_dims), the
            scale broadcast to the values' rank; None unless its zero points are all 0."""
            expr = bound_value(self, expr)
            if op_name(expr) == "relax.permute_dims" and expr.attrs.axes is not None:
                inner = self._weight(expr.args[0])
                if inner is None:
                    return None
                axes = [int(a) for a in expr.attrs.axes]
                return np.transpose(inner[0], axes), np.transpose(inner[1], axes)
            if op_name(expr) != "relax.dequantize" or not all(_is_const(a) for a in expr.args):
                return None
            values, scale, zero = (a.value.numpy() for a in expr.args)
            if values.dtype != np.int8 or np.any(zero != 0) or str(expr.attrs.out_dtype) != "float32":
                return None
            shape = [1] * values.ndim
            if scale.size > 1:
                shape[int(expr.attrs.axis) % values.ndim] = -1
            return values, scale.astype(np.float32).reshape(shape)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = op_name(call)
            try:
                new = self._conv2d(call) if name == "relax.nn.conv2d" else \
                    self._matmul(call) if name == "relax.matmul" else None
                if new is not None:
                    return new
            except Exception as e:  # noqa: BLE001 - a layer this pass does not understand stays fp32
                log.debug("int8: %s kept in fp32: %s", name, e, exc_info=True)
            return call

        def _per_output(self, scale: np.ndarray, channels: int) -> np.ndarray | None:
            """A weight scale that varies only along the last (output channel) axis, as [F]."""
            if any(d != 1 for d in scale.shape[:-1]):
                return None
            return np.broadcast_to(scale.reshape(-1), (channels,)).astype(np.float32)

        def _finish(self, acc, values: np.ndarray, scale: np.ndarray, activation) -> relax.Expr:
            """``float(acc - zx * sum_k W) * (sx * sw)``: the op's fp32 output."""
            _, sx, zx, _ = activation
            channels = values.shape[-1]
            acc = self.builder_.emit(acc)
            if zx:
                sums = values.reshape(-1, channels).astype(np.int64).sum(axis=0)
                acc = self.builder_.emit(relax.op.subtract(acc, relax.const((zx * sums).astype(np.int32))))
            value = self.builder_.emit(relax.op.astype(acc, "float32"))
            return relax.op.multiply(value, relax.const((np.float64(sx) * scale).astype(np.float32)))

        def _conv2d(self, call):
            attrs = call.attrs
            if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "HWIO", "NHWC"):
                return None
            activation, weight = self._dequantized(call.args[0]), self._weight(call.args[1])
            if activation is None or weight is None or weight[0].ndim != 4:
                return None
            q, sx, zx, axes = activation
            if axes not in (None, [0, 2, 3, 1]):
                return None
            values, scale = weight
            channels = values.shape[3]
            per_output = self._per_output(scale, channels)
            groups = int(attrs.groups)
            if groups != 1:
                if groups != channels or values.shape[2] != 1 or per_output is None:
                    return None  # grouped, not depthwise: fp32
                if axes is not None:
                    q = self.builder_.emit(relax.op.permute_dims(q, axes))
                sums = self.builder_.emit(self.builder_.call_te(
                    depthwise_te, q, relax.const(values[:, :, 0, :].astype(np.float32)),
                    [int(v) for v in attrs.strides], [int(v) for v in attrs.padding], [int(v) for v in attrs.dilation],
                    zx, primfunc_name_hint=DEPTHWISE_BLOCK, primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE}))
                return relax.op.multiply(sums, relax.const((np.float64(sx) * per_output).astype(np.float32)))
            if per_output is None:
                return None
            choice = lanes_for(channels, values)
            if choice is None:
                return None
            if axes is not None:
                q = self.builder_.emit(relax.op.permute_dims(q, axes))
            acc = self.builder_.call_te(
                conv2d_te, q, relax.const(pack_weights(values, choice[0])), [int(v) for v in attrs.strides],
                [int(v) for v in attrs.padding], [int(v) for v in attrs.dilation], zx,
                primfunc_name_hint=CONV_BLOCK, primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
            return self._finish(acc, values, per_output, activation)

        def _matmul(self, call):
            activation, weight = self._dequantized(call.args[0]), self._weight(call.args[1])
            if activation is None or weight is None or weight[0].ndim != 2 or activation[3] is not None:
                return None
            dims = tensor_dims(activation[0])
            if dims is None or len(dims) < 2 or str(call.attrs.out_dtype) not in ("", "None", "void", "float32"):
                return None
            values, scale = weight
            channels = values.shape[1]
            per_output = self._per_output(scale, channels)
            choice = lanes_for(channels, values)
            if per_output is None or choice is None:
                return None
            acc = self.builder_.call_te(dense_te, activation[0], relax.const(pack_weights(values, choice[0])),
                                        primfunc_name_hint=DENSE_BLOCK,
                                        primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
            return self._finish(acc, values, per_output, activation)

    rewrite = relax_pass("Int8Contractions", Rewriter)

    def run(mod, _ctx):
        saturating.clear()
        mod = rewrite(mod)
        if saturating:
            log.warning("%d int8 layer(s) kept in fp32: this CPU has no VNNI, and its u8 x s8 instruction "
                        "(vpmaddubsw) saturates with weights beyond +-%d (these reach %d); quantize with --isa avx2 "
                        "for 7-bit weights", len(saturating), PMADD_WEIGHT_MAX, max(saturating))
        return mod

    return tvm.transform.module_pass(run, opt_level=0, name="Int8ContractionsReported")


# ----------------------------------------------------------------------------- schedule


class Int8Contraction(CPUScheduleRule):
    """An ``int8_conv2d`` / ``int8_dense`` kernel with its fused epilogue: parallel over tiles of
    (output channel vectors) x (rows: output pixels or matrix rows); per tile, a register block of
    ``rows x vectors`` int32 accumulators over the whole reduction, whose innermost ``L x 4`` dot
    is the target's instruction (``vpdpbusd``, or ``vpmaddubsw`` + ``vpmaddwd``); then the
    epilogue (dequantize, bias, residual, requantize) on the tile while it is in cache."""

    def apply(self, func: tirx.PrimFunc, target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        names = {CONV_BLOCK, DENSE_BLOCK}
        found = []
        tvm_ffi.structural_walk(func.body, (s_tir.SBlock, lambda b: found.append(b.name_hint) if b.name_hint in names
                                            else None))
        if len(found) != 1:
            return None
        try:
            return self._schedule(s_tir.Schedule(func), found[0], target)
        except Exception as e:  # noqa: BLE001 - an unexpected loop nest: the other rules try
            log.debug("int8 schedule failed: %s", e, exc_info=True)
            return None

    def _schedule(self, sch, name: str, target):
        infos = normalize_prim_func(sch)
        main = sch.get_sblock(name)
        index = [sch.get(i.block_rv).name_hint for i in infos].index(name)
        prologue, epilogue = infos[:index], infos[index + 1:]
        stmt = sch.get(main)
        reads = [region.source for region in stmt.reads]
        packed = next(b for b in reads if str(b.dtype) == "int8")
        data = next(b for b in reads if str(b.dtype) == "uint8")
        lanes = int(packed.shape[-2])
        kind = instruction(target, lanes)
        if kind is None:
            return None
        # The loops by role (normalize_prim_func drops unit loops: a 1x1 window, a batch of 1):
        # output channels last of the spatial ones, the row axis (output x, or a matrix row)
        # before them; the input channels last of the reductions, the window's before them.
        info = infos[index]
        spatial = [it.loop_rv for it in info.iters if it.kind == "S"]
        reduction = [it.loop_rv for it in info.iters if it.kind == "R"]
        if len(spatial) + len(reduction) != len(info.iters) or not reduction:
            return None
        *outer, f = spatial
        x = outer.pop() if outer else None
        *window, c = reduction
        features = rules._extent(sch, f)
        registers = 24 if lanes == 16 or rules.vector_bits(target) >= 512 else 12
        rows_extent = rules._extent(sch, x) if x is not None else None
        rows, vectors = rules.dot_register_tile(rows_extent, features // lanes, registers, MAX_VECTORS)
        fo, fb, fi = sch.split(f, factors=[None, vectors, lanes])
        co, ci = sch.split(c, factors=[None, 4])
        if x is not None and rows > 1:
            xo, xi = sch.split(x, factors=[None, rows])
            inner = [xi]
        else:
            xo, inner = x, []
        # Weights heavier than the input: each thread keeps its slice of the weights in cache
        # while it sweeps the rows; else the rows are outer and the input tile stays.
        weight_bytes = int(np.prod([int(d) for d in packed.shape]))
        data_bytes = rules._work(rules._static(d) for d in data.shape)
        row_loops = [lp for lp in [*outer, xo] if lp is not None]
        tiles = [fo, *row_loops] if weight_bytes > data_bytes else [*row_loops, fo]
        sch.reorder(*tiles, *window, co, *inner, fb, fi, ci)
        fused = sch.fuse(*tiles) if len(tiles) > 1 else tiles[0]
        work = rules._work(rules._static(d) for d in stmt.writes[0].source.shape) \
            * rules._work(rules._static(d) for d in packed.shape[1:-2])
        if work >= rules.PARALLEL_MIN_WORK and rules._extent(sch, fused) != 1:
            sch.parallel(fused)
        local = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(local, fused, preserve_unit_loops=True)
        init = sch.decompose_reduction(main, ([*window, co])[0])
        sch.vectorize(sch.get_loops(init)[-1])
        for loop in [*inner, fb]:
            sch.unroll(loop)
        sch.tensorize(fi, INTRINSICS[kind, lanes])

        remaining = try_inline(sch, list(epilogue))
        out_lanes = rules.vector_lanes(target)
        local = rules.epilogue_per_tile(sch, remaining, local, fused, out_lanes)
        rules.Contraction._vectorize_tail(sch, local, out_lanes)
        for info in reversed(prologue):
            try:
                sch.compute_inline(info.block_rv)  # a transpose or cast before the pad
                continue
            except Exception:  # noqa: BLE001
                pass
            rules._parallelize_vectorize(sch, info.block_rv, out_lanes)
        return sch
