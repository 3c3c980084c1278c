"""fuse-qkv-projection: three projections of one input + MultiHeadAttention -> packed Attention.

    q = x @ Wq (+ bq), k = x @ Wk (+ bk), v = x @ Wv (+ bv)
    MultiHeadAttention(q, k, v, attention_bias=m)   ->   Attention(x, [Wq|Wk|Wv], [bq|bk|bv], attention_bias=m)

ONNX Runtime's com.microsoft Attention computes the three projections as one GEMM with a
[Hin, 3 * N*H] weight, as its transformer optimizer writes self-attention. Runs after
fuse-attention (which makes the MultiHeadAttention) and after the pass manager's cleanup has
removed the exporter's shape computations that read q, k, v. A projection without bias gets a
zero bias; a query scaled by a constant after its projection (Whisper) has the scale folded into
Wq and bq. Only where the op policy allows contrib ops (``--ops ort``, onnx target), float32.
"""

from __future__ import annotations

import numpy as np
from infoptc.op_policy import contrib_allowed, policy
from infoptc.pattern import Const, Rule, rewrite_pass

CONTRIB_DTYPES = {"float32"}  # ORT's CPU Attention


def _scalar(v: np.ndarray) -> bool:
    return v.size == 1 and v.dtype.kind == "f"


def _pack_pattern(biased: tuple[bool, bool, bool], masked: bool, q_scaled: bool = False):
    """MultiHeadAttention of three projections of one x (variables a variant leaves unused
    stay unbound); ``q_scaled``: the query projection times a constant (Whisper's scaling)."""
    def pattern(op, x, attention_bias, wq=Const(), wk=Const(), wv=Const(), bq=Const(), bk=Const(), bv=Const(),
                q_scale=Const(_scalar)):
        proj = [op.MatMul(x, w) for w in (wq, wk, wv)]
        q, k, v = [op.Add(p, b) if on else p for p, b, on in zip(proj, (bq, bk, bv), biased)]
        if q_scaled:
            q = op.Mul(q, q_scale)
        extra = (None, None, attention_bias) if masked else ()
        return op.MultiHeadAttention(q, k, v, *extra, _domain="com.microsoft", _bind="mha")

    pattern.__name__ = (f"pack_qkv_{''.join('b' if on else '_' for on in biased)}{'_masked' if masked else ''}"
                        f"{'_q_scaled' if q_scaled else ''}")
    return pattern


def check_pack(ctx, x, wq, wk, wv, mha, bq=None, bk=None, bv=None, attention_bias=None, q_scale=None):
    """ONNX Runtime's Attention: one [Hin, 3 * N*H] weight and bias, the same hidden size for
    q, k and v, a 3-D input, float32; MultiHeadAttention with no attributes but num_heads/scale."""
    if not contrib_allowed(ctx.pass_ctx):
        return f"contrib ops are not allowed (ops {policy(ctx.pass_ctx)!r}, target {ctx.target!r})"
    if set(mha.attrs) - {"num_heads", "scale"}:
        return f"MultiHeadAttention has attributes {sorted(set(mha.attrs) - {'num_heads', 'scale'})}"
    shape, dtype = ctx.shape(x), ctx.dtype(x)
    if shape is None or len(shape) != 3 or dtype is None or dtype.name not in CONTRIB_DTYPES:
        return f"input {x.name!r} is not a 3-D float32 tensor"
    weights = [ctx.value(w) for w in (wq, wk, wv)]
    if any(w.ndim != 2 or w.shape != weights[0].shape or w.dtype != dtype for w in weights):
        return "the three projections' weights differ in shape"
    width = weights[0].shape[1]
    biases = []
    for b in (bq, bk, bv):
        value = np.zeros(width, dtype) if b is None else ctx.value(b)
        if value.shape != (width,):
            return f"bias {b.name!r} is not a vector of {width}"
        biases.append(value)
    if q_scale is not None:  # (x Wq + bq) c = x (Wq c) + bq c: the scale goes into the weights
        c = ctx.value(q_scale).reshape(-1)[0].astype(dtype)
        weights[0], biases[0] = weights[0] * c, biases[0] * c
    return {"weight": np.concatenate(weights, axis=1), "packed_bias": np.concatenate(biases)}


def pack_qkv(op, x, mha, weight, packed_bias, attention_bias=None):
    return op.Attention(x, weight, packed_bias, None, None, attention_bias, _domain="com.microsoft", **mha.attrs)


PACK_PATTERNS = [_pack_pattern(b, m, s) for b in [(i & 4 > 0, i & 2 > 0, i & 1 > 0) for i in range(7, -1, -1)]
                 for m in (True, False) for s in (False, True)]

RULES = [Rule("pack_qkv", PACK_PATTERNS, pack_qkv, check_pack)]

FuseQkvProjection = rewrite_pass(
    "fuse-qkv-projection",
    "Q/K/V projections of one input + MultiHeadAttention -> com.microsoft Attention with packed weights (--ops ort)",
    RULES,
)
