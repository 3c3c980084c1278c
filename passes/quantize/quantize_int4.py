"""quantize-int4: block-wise int4 weights for MatMul/Gemm (weight-only; activations stay fp32).

    format=ort       MatMul(x, w)  ->  MatMulNBits(x, w_packed[N, K/bs, bs/2], scales[N, K/bs], zp)   com.microsoft
    format=standard  MatMul(x, w)  ->  MatMul(x, DequantizeLinear(w_int4[K, N], scale[K/bs, N], zp, axis=0, block_size=bs))
    Gemm(x, w, c)    ->  the same on w (transposed for transB), then Add(c)

Each block of ``block-size`` weights along K (one output column) gets its own scale: asymmetric
(uint4 with a zero point, the range [min(w, 0), max(w, 0)] over 15 steps) or symmetric (the
block's largest-magnitude value maps to -8). The rounding is ONNX Runtime's MLAS quantizer's, so
``method=rtn`` writes what ``MatMulNBitsQuantizer`` writes. ``method=gptq`` compensates each
rounding error in the weights still to be quantized, weighted by the inverse Hessian of the
layer's calibration activations (GPTQ, Frantar et al. 2022), with the same block scales.

The ``standard`` form needs ONNX opset 21 (int4 types, blocked DequantizeLinear): the model is
converted to opset 21 when it imports an older one (counter ``opset_upgraded``). ONNX Runtime fuses
DequantizeLinear(int4) -> MatMul into MatMulNBits at load time, so both forms run the same kernel
there. ``format=auto`` takes the ``ops`` policy of the compile (``ort`` or ``standard``) when one is
set, else ``ort``. The onnx target only: TVM's ONNX importer reads no int4 tensors.

Embedding tables (Gather of 4096+ elements) are stored in int8 with a scale per row, as
quantize-int8-dynamic does (``embeddings=false`` keeps them fp32).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from infoptc.errors import UsageError
from infoptc import op_policy
from infoptc.ir import from_graph, to_graph
from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from infoptc.verify import sqnr_db

from . import calibration
from .common import (CALIBRATION_OPTIONS, const_float, excluded, is_float_activation, parse_exclude,
                     refuse_quantized, upgrade_opset)
from .qdq import Builder, quantize_embeddings

log = logging.getLogger("infoptc")

METHODS = ("rtn", "gptq")
FORMATS = ("auto", "ort", "standard")
STANDARD_OPSET = 21  # int4/uint4 and DequantizeLinear's block_size
QMAX, MID = 15, 8


# ----------------------------------------------------------------------------- the numbers


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] -> [N, K/bs, bs], zero-padded along K (as ONNX Runtime pads)."""
    k, n = w.shape
    kb = -(-k // block_size)
    return np.pad(w.astype(np.float32), ((0, kb * block_size - k), (0, 0))).T.reshape(n, kb, block_size)


def block_params(blocks: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per block of ``[..., bs]`` values, as MLAS computes them."""
    lo, hi = blocks.min(-1), blocks.max(-1)
    if symmetric:
        extreme = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        return (extreme / -MID).astype(np.float32), np.full(extreme.shape, MID, np.uint8)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scale = ((hi - lo) / QMAX).astype(np.float32)
    safe = np.where(scale != 0, scale, 1)
    zp = np.where(scale != 0, np.clip(np.round(-lo / safe), 0, QMAX), 0)
    return scale, zp.astype(np.uint8)


def _codes(values: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """values * (1 / scale) in fp32 rounded half away from zero (C's roundf, as MLAS), plus zp."""
    inv = np.where(scale != 0, 1 / np.where(scale != 0, scale, 1), 0).astype(np.float32)
    v = (values.astype(np.float32) * inv).astype(np.float64)
    return np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5) + zp, 0, QMAX).astype(np.uint8)


def quantize_rtn(w: np.ndarray, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest: (codes uint8 [N, K/bs, bs] in 0..15, scales [N, K/bs], zero points [N, K/bs])."""
    blocks = _blocks(w, block_size)
    scale, zp = block_params(blocks, symmetric)
    codes = _codes(blocks, scale[..., None], zp[..., None])
    _clear_padding(codes, w.shape[0])
    return codes, scale, zp


def _clear_padding(codes: np.ndarray, k: int) -> None:
    """Codes past K are 0, as ONNX Runtime's quantizer leaves them (no kernel reads them)."""
    flat = codes.reshape(codes.shape[0], -1)
    flat[:, k:] = 0


def quantize_gptq(w: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool, damp: float = 0.01,
                  lazy: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ: quantize the rows of ``w`` [K, N] (its inputs) one at a time, each block's scale taken
    when its first row is reached, and spread each row's rounding error over the rows not yet
    quantized through the inverse Hessian ``X^T X`` of the layer's inputs. Same outputs as
    ``quantize_rtn``."""
    k, n = w.shape
    kb = -(-k // block_size)
    W = w.astype(np.float64).copy()
    H = hessian.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[dead, :] = 0
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper Cholesky factor of H^-1
    codes = np.zeros((n, kb * block_size), np.uint8)
    scale = np.zeros((n, kb), np.float32)
    zp = np.zeros((n, kb), np.uint8)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1 = W[i1:i2].copy()
        err = np.zeros_like(W1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            g = row // block_size
            if row % block_size == 0:  # the block's scale, from the weights as compensated so far
                end = min(g * block_size + block_size, k)
                block = np.concatenate([W1[i:end - i1], W[i2:end]]) if end > i2 else W1[i:end - i1]
                s, z = block_params(np.pad(block.T, ((0, 0), (0, block_size - block.shape[0]))).astype(np.float32),
                                    symmetric)
                scale[:, g], zp[:, g] = s, z
            q = _codes(W1[i].astype(np.float32), scale[:, g], zp[:, g])
            codes[:, row] = q
            deq = (q.astype(np.float32) - zp[:, g]) * scale[:, g]
            e = (W1[i] - deq) / h1[i, i]
            W1[i:] -= np.outer(h1[i, i:], e)
            err[i] = e
        W[i2:] -= hinv[i1:i2, i2:].T @ err
    return codes.reshape(n, kb, block_size), scale, zp


def dequantize(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray, k: int) -> np.ndarray:
    """Codes [N, K/bs, bs] -> fp32 weights [K, N]."""
    w = (codes.astype(np.float32) - zp[..., None]) * scale[..., None]
    return w.reshape(w.shape[0], -1)[:, :k].T


def pack_nibbles(values: np.ndarray, pad: int = 0) -> np.ndarray:
    """Pairs along the last axis into bytes, the first value in the low nibble (an odd length is
    padded with ``pad``)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.full(values.shape[:-1] + (1,), pad, values.dtype)], axis=-1)
    return (values[..., 0::2] & 0xF | (values[..., 1::2] & 0xF) << 4).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """``pack_nibbles`` undone: the first ``count`` values along the last axis."""
    both = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return both[..., :count]


def matmul_nbits_tensors(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray, symmetric: bool) -> dict:
    """MatMulNBits' B, scales and zero_points (None when symmetric: the default 8) in ONNX
    Runtime's layout: B uint8 [N, K/bs, bs/2], scales [N, K/bs], zero points uint8 [N, ceil(K/bs / 2)]
    (an odd count of blocks pads the last byte's high nibble with 8, as ORT's quantizer does)."""
    return {"B": pack_nibbles(codes), "scales": scale, "zero_points": None if symmetric else pack_nibbles(zp, pad=MID)}


def standard_tensors(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray, k: int, symmetric: bool) -> dict:
    """DequantizeLinear's int4 weight [K, N] (symmetric: int4, no zero point; else uint4 with
    one), scale [K/bs, N], zero point [K/bs, N]."""
    q = codes.reshape(codes.shape[0], -1)[:, :k].T
    if symmetric:
        return {"w": (q.astype(np.int8) - MID), "w_type": onnx.TensorProto.INT4, "scale": np.ascontiguousarray(scale.T),
                "zero_point": None}
    return {"w": q, "w_type": onnx.TensorProto.UINT4, "scale": np.ascontiguousarray(scale.T),
            "zero_point": np.ascontiguousarray(zp.T)}


def int4_constant(name: str, values: np.ndarray, data_type: int) -> gs.Constant:
    """An int4/uint4 initializer (numpy has no 4-bit type: written through onnx's packing)."""
    proto = onnx.helper.make_tensor(name, data_type, values.shape, pack_nibbles(values.reshape(-1)).tobytes(),
                                    raw=True)
    return gs.Constant(name, gs.ir.tensor.LazyValues(proto))


# ----------------------------------------------------------------------------- the graph


def int4_weight(node: gs.Node) -> np.ndarray | None:
    """The node's constant weight as [K, N], when the node can be replaced."""
    if node.op == "MatMul" and len(node.inputs) == 2:
        w = const_float(node.inputs[1])
        return w if w is not None and w.ndim == 2 else None
    if node.op == "Gemm" and len(node.inputs) >= 2:
        w = const_float(node.inputs[1])
        if (w is None or w.ndim != 2 or node.attrs.get("transA", 0) or float(node.attrs.get("alpha", 1.0)) != 1.0
                or float(node.attrs.get("beta", 1.0)) != 1.0):
            return None
        return w.T if node.attrs.get("transB", 0) else w
    return None


def candidates(graph: gs.Graph, exclude: set[str], nodes: set[str] | None, min_k: int) -> list[tuple[gs.Node, np.ndarray]]:
    found = []
    for node in graph.nodes:
        if excluded(node, exclude) or (nodes is not None and node.name not in nodes):
            continue
        if not node.inputs or not is_float_activation(node.inputs[0]) or not node.outputs:
            continue
        w = int4_weight(node)
        if w is not None and w.shape[0] >= min_k:
            found.append((node, w))
    return found


def hessians(model: onnx.ModelProto, inputs: list[str], data, samples: int = 0) -> dict[str, np.ndarray]:
    """``X^T X`` [K, K] of each named activation over the calibration samples (rows: every vector
    of K the layer multiplies), and the first sample's activations for the report."""
    session = calibration.ort_session(calibration.with_outputs(model, inputs))
    out: dict[str, np.ndarray] = {}
    for i, feed in enumerate(data):
        if samples and i >= samples:
            break
        for name, x in zip(inputs, session.run(inputs, feed)):
            x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            out[name] = out.get(name, 0) + x.T @ x
    return out


def _replace(graph: gs.Graph, b: Builder, node: gs.Node, codes, scale, zp, k: int, n: int, block_size: int,
             symmetric: bool, form: str, accuracy_level: int) -> None:
    x, y = node.inputs[0], node.outputs[0]
    bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
    wname = node.inputs[1].name
    node.inputs.clear()
    node.outputs.clear()
    out = y if bias is None else gs.Variable(b.name(f"{node.name}_int4_out"), dtype=np.float32)
    if form == "ort":
        t = matmul_nbits_tensors(codes, scale, zp, symmetric)
        inputs = [x, b.const(f"{wname}_Q4", t["B"]), b.const(f"{wname}_scales", t["scales"])]
        if t["zero_points"] is not None:
            inputs.append(b.const(f"{wname}_zero_points", t["zero_points"]))
        attrs = {"K": k, "N": n, "bits": 4, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        b.node("MatMulNBits", f"{node.name}_Q4", inputs, out, attrs).domain = "com.microsoft"
    else:
        t = standard_tensors(codes, scale, zp, k, symmetric)
        inputs = [int4_constant(b.name(f"{wname}_int4"), t["w"], t["w_type"]), b.const(f"{wname}_scale", t["scale"])]
        if t["zero_point"] is not None:
            inputs.append(int4_constant(b.name(f"{wname}_zero_point"), t["zero_point"], onnx.TensorProto.UINT4))
        wdq = gs.Variable(b.name(f"{wname}_dequantized"), dtype=np.float32, shape=[k, n])
        b.node("DequantizeLinear", f"{node.name}_weight_DequantizeLinear", inputs, wdq, {"axis": 0, "block_size": block_size})
        b.node("MatMul", f"{node.name}_int4", [x, wdq], out)
    if bias is not None:
        b.node("Add", f"{node.name}_bias", [out, bias], y)


def resolve_format(form: str, ctx: PassContext) -> str:
    """``auto``: standard ops under the compile's ``--ops standard`` policy, MatMulNBits otherwise."""
    if form != "auto":
        return form
    return "standard" if op_policy.policy(ctx) == "standard" else "ort"


@register_pass
class QuantizeInt4(Pass):
    name = "quantize-int4"
    summary = "block-wise int4 MatMul/Gemm weights (ONNX Runtime's MatMulNBits, or int4 DequantizeLinear at opset 21)"
    contract = Contract.LOSSY
    reports_changes = True
    options = {
        "block-size": Option(128, "weights per scale along K", choices=(16, 32, 64, 128, 256)),
        "method": Option("rtn", "rtn: round to nearest; gptq: error compensation from calibration activations",
                         choices=METHODS),
        "symmetric": Option(False, "symmetric blocks (int4, no zero point) instead of asymmetric (uint4 + zero point)"),
        "format": Option("auto", "ort: com.microsoft MatMulNBits; standard: DequantizeLinear(int4) + MatMul (opset 21); "
                                 "auto: the compile's ops policy (ctx.options['ops']), else ort", choices=FORMATS),
        "accuracy-level": Option(4, "MatMulNBits accuracy_level: 4 multiplies in int8 on CPU (activations quantized per "
                                    "block; what ORT gives the standard form too); 0: fp32"),
        **CALIBRATION_OPTIONS,
        "exclude": Option("", "node names or op types left fp32, separated by ';'"),
        "nodes": Option("", "quantize only these node names (';'-separated; empty: every MatMul/Gemm)"),
        "min-k": Option(16, "weights with fewer input rows (K) stay fp32"),
        "embeddings": Option(True, "store Gather tables (embeddings) of 4096+ elements in int8, one scale per row"),
        "damp": Option(0.01, "gptq: dampening added to the Hessian's diagonal, relative to its mean"),
        "report-samples": Option(4, "calibration samples the per-layer output SQNR uses (0: weights only)"),
        "requantize": Option(False, "quantize a model that already holds quantized ops"),
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        refuse_quantized(graph, self.opts["requantize"])
        if ctx.target != "onnx":  # TVM's ONNX importer reads no int4 tensor (and no MatMulNBits)
            raise UsageError(f"--quantize int4 writes int4 weights, which the {ctx.target} target cannot import "
                             "(TVM's ONNX frontend has no int4 tensors); use --target onnx")
        bs, method, symmetric = self.opts["block-size"], self.opts["method"], self.opts["symmetric"]
        form = resolve_format(self.opts["format"], ctx)
        has_data = "calibration" in ctx.options or bool(self.opts["calibration"])
        if method == "gptq" and not has_data:
            raise UsageError("quantize-int4 method=gptq needs calibration data (--calibration FILE.npz or a folder "
                             "of .npz); method=rtn needs none")
        nodes = set(parse_exclude(self.opts["nodes"])) or None
        found = candidates(graph, parse_exclude(self.opts["exclude"]), nodes, self.opts["min-k"])
        if not found:
            log.warning("quantize-int4: no MatMul/Gemm with a constant 2-D fp32 weight; the model stays as it is")
            return PassResult(False, {"quantized": 0})
        counters = {"quantized": 0, "opset_upgraded": 0, "embeddings": 0, "fp32_bytes": 0, "int4_bytes": 0}
        if form == "standard" and graph.opset < STANDARD_OPSET:
            upgrade_opset(graph, STANDARD_OPSET, "int4 in standard ops")
            counters["opset_upgraded"] = 1
            found = candidates(graph, parse_exclude(self.opts["exclude"]), nodes, self.opts["min-k"])
        acts: dict[str, np.ndarray] = {}
        if has_data and (method == "gptq" or self.opts["report-samples"]):
            model = from_graph(graph)
            source = calibration.calibration_source(ctx.options, self.opts, self.name)
            data = calibration.CalibrationData(source, calibration.model_inputs(model), self.opts["samples"])
            limit = 0 if method == "gptq" else self.opts["report-samples"]
            acts = hessians(model, list(dict.fromkeys(node.inputs[0].name for node, _ in found)), data, limit)
        b = Builder(graph)
        layers = []
        for node, w in found:
            k, n = w.shape
            h = acts.get(node.inputs[0].name)
            if method == "gptq":
                codes, scale, zp = quantize_gptq(w, h, bs, symmetric, self.opts["damp"])
            else:
                codes, scale, zp = quantize_rtn(w, bs, symmetric)
            deq = dequantize(codes, scale, zp, k)
            row = {"node": node.name, "op": node.op, "k": k, "n": n, "format": form,
                   "weight_sqnr_db": round(sqnr_db(w, deq), 2)}
            if h is not None:  # the layer's own output error on the calibration inputs: E|x(W - Wq)|^2 / E|xW|^2
                dw = w.astype(np.float64) - deq
                w64 = w.astype(np.float64)
                noise, signal = float(np.sum((h @ dw) * dw)), float(np.sum((h @ w64) * w64))
                row["output_sqnr_db"] = round(float(10 * np.log10(max(signal, 1e-30) / max(noise, 1e-30))), 2)
            layers.append(row)
            counters["fp32_bytes"] += w.nbytes
            counters["int4_bytes"] += codes.size // 2 + scale.nbytes + (0 if symmetric else -(-zp.shape[1] // 2) * zp.shape[0])
            _replace(graph, b, node, codes, scale, zp, k, n, bs, symmetric, form, self.opts["accuracy-level"])
            counters["quantized"] += 1
        if self.opts["embeddings"]:
            counters["embeddings"] = quantize_embeddings(graph, b, 4096, parse_exclude(self.opts["exclude"]))
        layers.sort(key=lambda r: (r.get("output_sqnr_db", r["weight_sqnr_db"]), r["node"]))
        ctx.reports[self.name] = {"bits": 4, "block_size": bs, "method": method, "symmetric": symmetric,
                                  "format": form, "layers": layers}
        ctx.metadata["infoptc.quantization"] = json.dumps(
            {"pass": self.name, "bits": 4, "block_size": bs, "method": method, "symmetric": symmetric, "format": form},
            sort_keys=True)
        return PassResult(True, counters)


def quantize_model_int4(model: onnx.ModelProto, block_size: int = 128, method: str = "rtn", symmetric: bool = False,
                        form: str = "ort", calibration_data=None, nodes: set[str] | None = None,
                        exclude: str = "", embeddings: bool = True, accuracy_level: int = 4) -> onnx.ModelProto:
    """``model`` with int4 MatMul/Gemm weights; a new model, the input untouched. ``calibration_data``:
    a path or an iterable of feed dicts (gptq needs it); ``nodes``: quantize only these node names."""
    from infoptc.ir import infer_shapes

    if nodes is not None and not nodes:  # an empty selection converts nothing
        return model.__class__.FromString(model.SerializeToString())
    graph = to_graph(infer_shapes(model))
    ctx = PassContext(opset=graph.opset, options={} if calibration_data is None else {"calibration": calibration_data})
    QuantizeInt4(**{"block-size": block_size, "method": method, "symmetric": symmetric, "format": form,
                    "nodes": ";".join(sorted(nodes or ())), "exclude": exclude, "embeddings": embeddings,
                    "report-samples": 0, "accuracy-level": accuracy_level}).run(graph, ctx)
    graph.cleanup().toposort()
    return from_graph(graph, model)
