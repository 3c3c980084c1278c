"""fuse-attention: the exported scaled-dot-product attention block -> one attention op.

    qh = Transpose(Reshape(q, [B, S, N, H]), [0, 2, 1, 3])           (same for v; k as K^T)
    kt = Transpose(Reshape(k, [B, L, N, H]), [0, 2, 3, 1])           (or two Transposes)
    p  = Softmax(MatMul(qh, kt) / scale  (+ mask | Where(cond, ., -big)),  axis=-1)
    y  = Reshape(Transpose(MatMul(p, vh), [0, 2, 1, 3]), [B, S, N*H])
       ->  MultiHeadAttention(q, k, v, attention_bias=mask, num_heads=N, scale=1/scale)   com.microsoft
       ->  Attention(q, k, v, mask, q_num_heads=N, kv_num_heads=N, scale=1/scale)         opset >= 23

q, k, v are the 3-D [B, S, N*H] projections before the head split, y the merged result, so the
head split/merge Reshapes and Transposes disappear too. The scale may be a Div, a Mul or absent.

Llama-class blocks: q and k rotated on the split heads (transformers' rotate_half with cos/sin
tables [1, S, H]) and K/V heads repeated for grouped-query attention (Unsqueeze/Expand/Reshape)
become RotaryEmbedding on the 3-D q and k (com.microsoft with the tables' first halves as caches
and position offset 0, or the opset-23 op) and MultiHeadAttention on K/V repeated to N heads
(or Attention with kv_num_heads); see docs/passes/fuse-attention.md for what is proved first.
An additive float mask is passed as the attention bias (two of them, as T5 adds its relative
position bias and then the padding mask, are summed first); a Where mask with a fill of -1e30 or
below (finfo.min, -inf) becomes the bias Where(cond, 0, fill): adding it gives the same softmax.
ONNX Runtime wants the bias as [B|1, N|1, S, L], so it is expanded along S and L (cheap: no
head or batch copies). Both Reshapes must provably keep B and S: a constant shape with 0/-1
entries, or one built from Shape/Gather/Unsqueeze/Concat of the tensor being reshaped.
"""

from __future__ import annotations

import numpy as np
from infoptc.op_policy import contrib_allowed, policy
from infoptc.pass_manager import Option, register_pass
from infoptc.pattern import Const, Rule, explain, rewrite_pass

from ._dims import KEEPS_DIMS
from ._dims import dims as _dims
from ._dims import origin as _origin
from ._dims import _scalar_dim
from ._dims import same_dim as _same_dim

STANDARD_OPSET = 23
CONTRIB_DTYPES = {"float32"}  # com.microsoft MultiHeadAttention on ONNX Runtime's CPU provider
TABLES_KEY = "_fuse_attention_rotary_tables"  # PassContext scratch: rotary tables made in this run
MASK_FILL_LIMIT = -1e30  # a Where fill this negative zeroes a softmax weight exactly, like a -inf bias
# ONNX Runtime's opset-23 Attention gives 0 for a row whose bias is all finfo.min, where the exported
# softmax (and MultiHeadAttention) gives equal weights; with this fill both give equal weights
STANDARD_FILL = MASK_FILL_LIMIT


def _scalar(v: np.ndarray) -> bool:
    return v.size == 1 and v.dtype.kind == "f"


def _last_axis(axis) -> bool:
    return axis in (-1, 3)


# ----------------------------------------------------------------------------- patterns


def _rotate_half(op, x, cos, sin, which):
    """Llama's rotary embedding on split heads x [B, N, S, H] as transformers writes it:
    x * cos + Concat(-x[..., H/2:], x[..., :H/2]) * sin, cos/sin [1, 1, S, H] (checked in check)."""
    upper = op.Slice(x, Const(), Const(), Const(), Const(), _bind=f"{which}_upper")
    lower = op.Slice(x, Const(), Const(), Const(), Const(), _bind=f"{which}_lower")
    rotated = op.Concat(op.Neg(upper), lower, axis=_last_axis)
    return op.Add(op.Mul(x, cos), op.Mul(rotated, sin), _bind=f"{which}_rot")


def _repeat_kv(op, x, expand_shape, repeat_shape, which):
    """Grouped-query attention's repeat_kv: [B, K, L, H] -> Unsqueeze 2 -> Expand [B, K, G, L, H]
    -> Reshape [B, K*G, L, H] (the targets are checked in check)."""
    grouped = op.Expand(op.Unsqueeze(x, Const(), _bind=f"{which}_unsqueeze"), expand_shape, _bind=f"{which}_expand")
    return op.Reshape(grouped, repeat_shape, _bind=f"{which}_repeat")


def _attention_pattern(keys, scaling, masking, view=False, rope=False, gqa=False, past=False):
    def pattern(op, q, k, v, q_shape, k_shape, v_shape, out_shape, mask, mask2, view_shape, k3_shape, kt_shape,
                cos, sin, k_expand_shape, k_repeat_shape, v_expand_shape, v_repeat_shape, past_k, past_v,
                scale=Const(_scalar),
                scale2=Const(_scalar), fill=Const(_scalar)):
        qh = op.Transpose(op.Reshape(q, q_shape, _bind="q_split"), perm=[0, 2, 1, 3], _bind="qh")
        vh = op.Transpose(op.Reshape(v, v_shape, _bind="v_split"), perm=[0, 2, 1, 3], _bind="vh")
        k_split = op.Reshape(k, k_shape, _bind="k_split")
        if rope:
            qh = _rotate_half(op, qh, cos, sin, "q")
        if past:  # the KV cache: present = Concat(past, new) along the sequence, a model output
            vh = v_cat = op.Concat(past_v, vh, axis=lambda a: a in (2, -2), _bind="v_cat")
        if gqa:
            vh = _repeat_kv(op, vh, v_expand_shape, v_repeat_shape, "v")
        if rope or gqa or past:  # Llama: heads split, rotated, (cached,) repeated, then K^T
            kh = op.Transpose(k_split, perm=[0, 2, 1, 3], _bind="kh")
            if rope:
                kh = _rotate_half(op, kh, cos, sin, "k")
            if past:
                kh = k_cat = op.Concat(past_k, kh, axis=lambda a: a in (2, -2), _bind="k_cat")
            if gqa:
                kh = _repeat_kv(op, kh, k_expand_shape, k_repeat_shape, "k")
            if keys == "kt_3d":
                k3t = op.Transpose(op.Reshape(kh, k3_shape, _bind="k3"), perm=[0, 2, 1], _bind="k3t")
                kt = op.Reshape(k3t, kt_shape, _bind="kt")
            else:
                kt = op.Transpose(kh, perm=[0, 1, 3, 2], _bind="kt")
        elif keys == "kt":
            kt = op.Transpose(k_split, perm=[0, 2, 3, 1], _bind="kt")
        elif keys == "kt_3d":  # the dynamo exporter's SDPA: K^T through a 3-D [-1, L, H] view
            kh = op.Transpose(k_split, perm=[0, 2, 1, 3], _bind="kh")
            k3t = op.Transpose(op.Reshape(kh, k3_shape, _bind="k3"), perm=[0, 2, 1], _bind="k3t")
            kt = op.Reshape(k3t, kt_shape, _bind="kt")
        else:
            kh = op.Transpose(k_split, perm=[0, 2, 1, 3], _bind="kh")
            kt = op.Transpose(kh, perm=[0, 1, 3, 2], _bind="kt")
        if scaling == "sdpa":  # torch's scaled_dot_product_attention: sqrt(scale) on both Q and K^T
            qh = op.Mul(qh, scale, _bind="q_scaled")
            kt = op.Mul(kt, scale2, _bind="k_scaled")
        scores = op.MatMul(qh, kt, _bind="scores")
        if scaling == "div":
            scores = op.Div(scores, scale, _bind="scaled")
        elif scaling == "mul":
            scores = op.Mul(scores, scale, _bind="scaled")
        if masking == "add":
            scores = op.Add(scores, mask, _bind="masked")
        elif masking == "add_add":  # T5: the relative position bias, then the padding mask
            scores = op.Add(op.Add(scores, mask, _bind="masked0"), mask2, _bind="masked")
        elif masking == "where":
            scores = op.Where(mask, scores, fill, _bind="masked")
        elif masking == "where_inverted":
            scores = op.Where(mask, fill, scores, _bind="masked")
        probs = op.Softmax(scores, axis=_last_axis, _bind="probs")
        if scaling == "sdpa":  # rows of -inf give NaN; the exporter zeroes them
            probs = op.Where(op.IsNaN(probs, _bind="nan"), 0.0, probs, _bind="guarded")
        context = op.MatMul(probs, vh, _bind="context")
        if view:  # a Reshape of the context to its own shape [B, N, S, H], built from Shape nodes
            context = op.Reshape(context, view_shape, _bind="context_view")
        merged = op.Transpose(context, perm=[0, 2, 1, 3], _bind="merged")
        y = op.Reshape(merged, out_shape, _bind="merge")
        return (y, k_cat, v_cat) if past else y

    pattern.__name__ = (f"attention_{keys}_{scaling}_{masking}{'_view' if view else ''}{'_rope' if rope else ''}"
                        f"{'_gqa' if gqa else ''}{'_past' if past else ''}")
    return pattern


# The layout of every intermediate, for Shape nodes that read one (B batch, S queries, L keys,
# N heads, H head size): the replacement computes their value from q and k instead.
NEW_KV = ("k_split", "v_split", "kh", "vh", "k_rot")  # before a KV cache's Concat: the new keys' length L
LAYOUTS = {"q_split": "BSNH", "k_split": "BLKH", "v_split": "BLKH", "qh": "BNSH", "kh": "BKLH", "vh": "BKLH",
           "q_rot": "BNSH", "k_rot": "BKLH", "k_unsqueeze": "BK1LH", "v_unsqueeze": "BK1LH", "k_expand": "BKGLH",
           "v_expand": "BKGLH", "k_repeat": "BNLH", "v_repeat": "BNLH",
           "kt": "BNHL", "scores": "BNSL", "scaled": "BNSL", "masked0": "BNSL", "masked": "BNSL", "probs": "BNSL",
           "context": "BNSH", "merged": "BSNH", "q_scaled": "BNSH", "k_scaled": "BNHL", "nan": "BNSL",
           "guarded": "BNSL", "context_view": "BNSH"}

PATTERNS = [_attention_pattern(k, s, m) for k in ("kt", "two_transposes") for s in ("div", "mul", "none")
            for m in ("add_add", "add", "where", "where_inverted", "none")]
PATTERNS += [_attention_pattern(k, "sdpa", m, view) for k in ("kt", "kt_3d") for m in ("add", "none")
             for view in (True, False)]
# Llama-class decoders: rotary embedding on the split q and k, K/V heads repeated (grouped-query)
LLAMA = ((True, True), (True, False), (False, True))  # (rope, gqa)
PATTERNS += [_attention_pattern("two_transposes", s, m, rope=rope, gqa=gqa) for rope, gqa in LLAMA
             for s in ("mul", "div", "none") for m in ("add", "none")]
PATTERNS += [_attention_pattern(k, "sdpa", m, view, rope=rope, gqa=gqa) for rope, gqa in LLAMA  # transformers' default
             for k in ("two_transposes", "kt_3d") for m in ("add", "none") for view in (True, False)]
# ... with past key/values (and GPT-2's: no rotary, no repeat)
PAST_PATTERNS = [_attention_pattern("two_transposes", s, "add", rope=rope, gqa=gqa, past=True)
                 for rope, gqa in LLAMA + ((False, False),) for s in ("mul", "div")]
PAST_PATTERNS += [_attention_pattern(k, "sdpa", "add", view, rope=True, gqa=gqa, past=True)
                  for gqa in (True, False) for k in ("two_transposes", "kt_3d") for view in (True, False)]


# ----------------------------------------------------------------------------- shape facts


def _keeps_leading(ctx, reshape, tail: list[int], like=None, inner=None) -> str | None:
    """None when Reshape(src, shape) keeps src's first two dims and then has ``tail`` (one entry
    of the tail may be -1 when src's other dims are known, as the exporters write [B, S, -1, H]).
    ``like``: a tensor whose first two dims src is known to have (the merge's q); ``inner``: its
    other dims where the match proves them (the merge's [N, H])."""
    src = reshape.inputs[0]
    same = like if like is not None else src
    entries = _dims(ctx, reshape.inputs[1])
    if entries is None or len(entries) != 2 + len(tail):
        return f"cannot read the target shape of {reshape.name!r}"
    rest = list(entries[2:])
    src_shape = ctx.shape(src)
    free = 0
    for i, e in enumerate(entries[:2]):
        if isinstance(e, tuple):
            if not (_same_dim(ctx, e, src, i) or _same_dim(ctx, e, same, i)):
                return f"{reshape.name!r} takes dim {i} from a tensor not known to match"
        elif e == 0 and not ctx.attr(reshape, "allowzero", 0):
            continue
        elif e == -1:
            free += 1
        elif not (src_shape and isinstance(src_shape[i], int) and src_shape[i] == e):
            return f"{reshape.name!r} sets dim {i} to {e}"
    if rest.count(-1) == 1 and all(isinstance(d, int) for d in rest):
        # -1 in the tail: the other dims must pin it, so the leading two must be exact
        inner = inner if inner is not None else src_shape[2:] if src_shape else None
        known = inner and all(isinstance(d, int) and d > 0 for d in inner)
        if free or not known or int(np.prod(inner)) != int(np.prod(tail)):
            return f"{reshape.name!r} has a -1 that the known dims do not pin down"
        rest = [t if d == -1 else d for d, t in zip(rest, tail)]
    if rest != tail:
        return f"{reshape.name!r} reshapes to {entries[2:]}, expected {tail}"
    if free > 1:
        return f"{reshape.name!r} has more than one -1"
    return None


def _heads(ctx, split) -> tuple[int, int] | None:
    """(heads, head size) that a head-split Reshape produces (a -1 for either is resolved from
    the known last dim of its input)."""
    shape = ctx.shape(split.outputs[0])
    if shape and len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return shape[2], shape[3]
    entries = _dims(ctx, split.inputs[1])
    if not entries or len(entries) != 4 or not all(isinstance(d, int) for d in entries[2:]):
        return None
    n, h = entries[2:]
    width = (ctx.shape(split.inputs[0]) or [None])[-1]
    if (n == -1) != (h == -1) and isinstance(width, int) and width > 0:
        known = h if n == -1 else n
        if known > 0 and width % known == 0:
            n, h = (width // known, h) if n == -1 else (n, width // known)
    return (n, h) if n > 0 and h > 0 else None


# ----------------------------------------------------------------------------- condition and replacement


def _form(ctx, dtype) -> str | None:
    wanted = ctx.options.get("form", "auto")
    if wanted == "standard" or (wanted == "auto" and ctx.opset >= STANDARD_OPSET):
        return "standard" if ctx.opset >= STANDARD_OPSET else None
    ort = policy(ctx.pass_ctx) == "ort"  # form=contrib may name another target, never override --ops standard
    if ((wanted == "contrib" and ort) or (wanted == "auto" and contrib_allowed(ctx.pass_ctx))) and dtype is not None and dtype.name in CONTRIB_DTYPES:
        return "contrib"
    return None


def _reshape_uses(ctx, shape_uses) -> str | None:
    """Reshapes may read only the merged heads [B, S, N, H] (GPT-2's Conv1D views it as
    [-1, N*H]): reading the merge's output instead gives the same elements in the same order,
    unless a 0 in the target shape copies a dim of the input."""
    for name, nodes in shape_uses.items():
        for node in nodes:
            if node.op != "Reshape":
                if name not in LAYOUTS:
                    return f"Shape {node.name!r} reads {name!r}, whose shape the replacement does not rebuild"
                continue
            if name != "merged":
                return f"Reshape {node.name!r} reads the attention intermediate {name!r}"
            target = ctx.value(node.inputs[1])
            if target is None or (0 in target.reshape(-1) and not ctx.attr(node, "allowzero", 0)):
                return f"Reshape {node.name!r} of the merged heads has a target shape that is not a constant without 0"
    return None


def _noop_view(ctx, view, heads, size, context, same_s) -> str | None:
    """None when the Reshape ``view`` of ``context`` [B, N, S, H] provably keeps its shape."""
    entries = _dims(ctx, view.inputs[1])
    if entries is None or len(entries) != 4:
        return f"cannot read the target shape of {view.name!r}"
    e0, e1, e2, e3 = entries
    keep = not ctx.attr(view, "allowzero", 0)
    ok = [(e0 == 0 and keep) or (isinstance(e0, tuple) and e0[1] is context and e0[2] == 0),
          e1 in (-1, heads) or (e1 == 0 and keep),
          (e2 == 0 and keep) or (isinstance(e2, tuple) and any(e2[1] is t and e2[2] == 2 for t in same_s)),
          e3 == size or (e3 == -1 and e1 != -1)]
    return None if all(ok) else f"{view.name!r} reshapes the context to {entries}, not to its own shape"


def _transposed_through_3d(ctx, kh, k3, kt, size) -> str | None:
    """None when Reshape(Transpose(Reshape(kh, [-1, L, H]), [0, 2, 1]), [B, N, H, L]) is K^T."""
    src = kh.outputs[0]
    first, second = _dims(ctx, k3.inputs[1]), _dims(ctx, kt.inputs[1])

    def dim(entry, i) -> bool:  # the entry is dim i of kh (or its known head size)
        return (isinstance(entry, tuple) and _same_dim(ctx, entry, src, i)) or (i == 3 and entry == size)

    if not (first and len(first) == 3 and first[0] == -1 and dim(first[1], 2) and dim(first[2], 3)):
        return f"{k3.name!r} does not view the keys as [-1, L, H]"
    if not (second and len(second) == 4 and all(dim(e, i) for e, i in zip(second, (0, 1, 3, 2)))):
        return f"{kt.name!r} does not restore [B, N, H, L]"
    return None


def _ints(ctx, t) -> list[int] | None:
    value = ctx.value(t) if t is not None and t.name else None
    return None if value is None or value.dtype.kind not in "iu" else [int(x) for x in value.reshape(-1)]


def _rotate_half_reason(ctx, upper, lower, size) -> str | None:
    """None when ``upper`` is x[..., H/2:] and ``lower`` x[..., :H/2] (the rotation covers the
    whole head: ONNX Runtime's RotaryEmbedding is told no partial rotary dim)."""
    half = size // 2
    for node, start, end in ((upper, half, None), (lower, 0, half)):
        starts, ends, axes, steps = (_ints(ctx, node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2, 3, 4))
        ends_ok = ends is not None and len(ends) == 1 and (ends[0] >= size if end is None else ends[0] == end)
        if size % 2 or starts != [start] or not ends_ok or axes not in ([-1], [3]) or steps not in (None, [1]):
            return f"{node.name!r} does not slice the {'upper' if end is None else 'lower'} half of the head size {size}"
    return None


def _halves_source(ctx, t):
    """The tensor f where ``t`` = elementwise(Concat(f, f, axis=-1)) (Cos, Sin, Cast, a scalar
    Mul/Div: each half of t is then the same function of f), or None."""
    for _ in range(8):
        node = ctx.producer(t)
        if node is None:
            return None
        if node.op in ("Cos", "Sin", "Cast", "Identity") and len(node.inputs) == 1:
            t = node.inputs[0]
        elif node.op in ("Mul", "Div") and len(node.inputs) == 2:
            consts = [i for i, x in enumerate(node.inputs) if ctx.value(x) is not None and ctx.value(x).size == 1]
            if not consts or (node.op == "Div" and consts != [1]):
                return None
            t = node.inputs[1 - consts[0]]
        elif node.op == "Concat" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1] \
                and ctx.attr(node, "axis", 0) in (-1, ctx.rank(t) - 1 if ctx.rank(t) else -1):
            return node.inputs[0]
        else:
            return None
    return None


def _scalar_source(ctx, t):
    """("dim", x, i) that a scalar equals: Gather(Shape(x), i), Squeeze(Shape(x, i, i + 1)), via Casts."""
    for _ in range(4):
        scalar = _scalar_dim(ctx, t)
        if isinstance(scalar, tuple):
            return scalar
        producer = ctx.producer(t)
        if producer is not None and producer.op == "Squeeze":
            entries = _dims(ctx, producer.inputs[0])
            return entries[0] if entries and len(entries) == 1 and isinstance(entries[0], tuple) else None
        if producer is None or producer.op != "Cast":
            return None
        t = producer.inputs[0]
    return None


def _length_source(ctx, t, axis):
    """("dim", x, i) that dim ``axis`` of ``t`` provably equals, walking back through elementwise ops
    with constants, Concat on another axis, Unsqueeze and Range(0, n, 1) with n read from a Shape."""
    for _ in range(16):
        node = ctx.producer(t)
        rank = ctx.rank(t)
        if node is None or rank is None:
            return None
        if node.op in ("Cos", "Sin", "Cast", "Identity", "Neg"):
            t = node.inputs[0]
        elif node.op in ("Mul", "Div", "Add", "Sub") and len(node.inputs) == 2:
            # follow the operand that has the axis; the other must not broadcast it (a constant, or a
            # scalar such as the past length that a KV cache adds to the positions)
            shapes = [ctx.value(x).shape if ctx.value(x) is not None else ctx.shape(x) for x in node.inputs]
            if any(shape is None for shape in shapes):
                return None
            spans = [axis - (rank - len(shape)) for shape in shapes]
            full = [i for i, (shape, k) in enumerate(zip(shapes, spans)) if k >= 0 and shape[k] != 1]
            if len(full) != 1 or len(shapes[full[0]]) != rank:
                return None
            t = node.inputs[full[0]]
        elif node.op == "Concat" and ctx.attr(node, "axis", 0) % rank != axis:
            t = node.inputs[0]
        elif node.op == "Unsqueeze":
            axes = _ints(ctx, node.inputs[1]) if len(node.inputs) > 1 else ctx.attr(node, "axes", None)
            if axes is None:
                return None
            axes = [a % rank for a in axes]
            if axis in axes:
                return None
            axis -= sum(a < axis for a in axes)
            t = node.inputs[0]
        elif node.op == "Range" and axis == 0:
            start, delta = (ctx.value(x) for x in (node.inputs[0], node.inputs[2]))
            if start is None or delta is None or start.size != 1 or delta.size != 1 or start.item() != 0 \
                    or delta.item() != 1:
                return None
            return _scalar_source(ctx, node.inputs[1])
        else:
            return None
    return None


def _rotary_cache(ctx, t, size, q, k):
    """The [1, S, H] cos (sin) table c under the rotary's ``t`` = Unsqueeze(c, [1]), or a reason.

    Row s of c multiplies position s of q and k (it broadcasts over batch and heads), so ONNX
    Runtime's RotaryEmbedding gets c[0, :, :H/2] as its cache and position offset 0; that holds
    when c's batch is 1, its halves are equal and its length is provably q's and k's."""
    node = ctx.producer(t)
    axes = _ints(ctx, node.inputs[1]) if node is not None and node.op == "Unsqueeze" and len(node.inputs) > 1 else None
    if axes not in ([1], [-3]):
        return f"the rotary table {t.name!r} is not Unsqueeze(table, 1)"
    c = node.inputs[0]
    shape = ctx.shape(c)
    if not shape or len(shape) != 3 or shape[0] != 1 or shape[2] != size:
        return f"the rotary table {c.name!r} is not [1, S, {size}] (per-batch positions are not fused)"
    if ctx.dtype(c) != ctx.dtype(q):
        return f"the rotary table {c.name!r} is {ctx.dtype(c)}, the query {ctx.dtype(q)}"
    if _halves_source(ctx, c) is None:
        return f"the rotary table {c.name!r} is not computed elementwise from Concat(freqs, freqs)"
    entry = ("dim", c, 1)
    source = _length_source(ctx, c, 1)
    for x in (q, k):
        if not (_same_dim(ctx, entry, x, 1) or (source is not None and _same_dim(ctx, source, x, 1))):
            return f"the rotary table {c.name!r} is not provably as long as {x.name!r}"
    return c


def _where_fill(ctx, mask) -> float | None:
    """f when ``mask`` is Where(c, 0, f) or Where(c, f, 0) with constant scalars, else None."""
    node = ctx.producer(mask)
    values = [ctx.value(x) for x in node.inputs[1:]] if node is not None and node.op == "Where" else [None]
    if not all(x is not None and _scalar(x) for x in values):
        return None
    pair = sorted((float(x.reshape(-1)[0]) for x in values), key=lambda f: f == 0)
    return pair[0] if pair[1] == 0 else None


def _dim_letter(ctx, entry, letters, k, length=None) -> str | None:
    """The layout letter a ("dim", t, i) entry stands for: t's letter when t is a matched
    intermediate, B or L when it is provably k's batch or the keys' length (``length``: a tensor
    and axis, k's dim 1 unless a KV cache makes it longer)."""
    _, t, i = entry
    if id(t) in letters:
        return letters[id(t)][i]
    if _same_dim(ctx, entry, k, 0):
        return "B"
    t, axis = length or (k, 1)
    return "L" if _same_dim(ctx, entry, t, axis) else None


def _expand_target(ctx, t):
    """Entries of an Expand's target; Where(Equal(x, -1), 1, x), which torch writes around it, is x."""
    node = ctx.producer(t)
    if node is not None and node.op == "Where":
        equal = ctx.producer(node.inputs[0])
        ones, minus = ctx.value(node.inputs[1]), None
        if equal is not None and equal.op == "Equal" and node.inputs[2] in equal.inputs:
            other = equal.inputs[1] if equal.inputs[0] is node.inputs[2] else equal.inputs[0]
            minus = ctx.value(other)
        if ones is None or minus is None or not (ones == 1).all() or not (minus == -1).all():
            return None
        entries = _dims(ctx, node.inputs[2])
        return None if entries is None else [1 if e == -1 else e for e in entries]
    return _dims(ctx, t)


def _target_entries(ctx, t, past=None, k=None):
    """Entries of a shape target (see _expand_target); with a KV cache, a 1-element part
    Reshape/Unsqueeze(past length + new length) (the dynamo exporter's total length) is "L"."""
    entries = _expand_target(ctx, t)
    node = ctx.producer(t)
    if entries is not None or past is None or node is None or node.op != "Concat":
        return entries
    out = []
    for part in node.inputs:
        got = _dims(ctx, part)
        if got is None:
            one = ctx.producer(part)
            add = ctx.producer(one.inputs[0]) if one is not None and one.op in ("Reshape", "Unsqueeze") else None
            if add is None or add.op != "Add" or ctx.rank(one.inputs[0]) != 0:
                return None
            a, b = (_scalar_source(ctx, x) for x in add.inputs)
            if a is None or b is None or not any(_same_dim(ctx, x, past, 2) and _same_dim(ctx, y, k, 1)
                                                 for x, y in ((a, b), (b, a))):
                return None
            got = ["L"]
        out += got
    return out


def _repeat_reason(ctx, unsqueeze, expand, repeat, k, letters, heads, kv_heads, size, length=None,
                   past=None) -> str | None:
    """None when Reshape(Expand(Unsqueeze(x, 2), [B, K, G, L, H]), [B, K*G, L, H]) repeats each of
    x's K heads G = N / K times in a row (transformers' repeat_kv)."""
    groups = heads // kv_heads
    if _ints(ctx, unsqueeze.inputs[1]) not in ([2], [-3]):
        return f"{unsqueeze.name!r} does not add the group axis 2"
    wanted = ("B", kv_heads, groups, "L", size)
    target = _target_entries(ctx, expand.inputs[1], past, k)
    if target is None or len(target) != 5:
        return f"cannot read the target shape of {expand.name!r}"
    for i, (e, want) in enumerate(zip(target, wanted)):
        letter = _dim_letter(ctx, e, letters, k, length) if isinstance(e, tuple) else e if e == "L" else None
        if not (letter == want or e == want or (e == 1 and i != 2) or (letter == "G" and i == 2)):
            return f"{expand.name!r} expands to {target}, not [B, {kv_heads}, {groups}, L, {size}]"
    entries = _target_entries(ctx, repeat.inputs[1], past, k)
    keep = not ctx.attr(repeat, "allowzero", 0)
    if entries is None or len(entries) != 4:
        return f"cannot read the target shape of {repeat.name!r}"
    e0, e1, e2, e3 = entries
    letter = [_dim_letter(ctx, e, letters, k, length) if isinstance(e, tuple) else e if e == "L" else None
              for e in (e0, e2)]
    if not ((letter[0] == "B" or (e0 == 0 and keep)) and e1 == heads and letter[1] == "L" and e3 == size):
        return f"{repeat.name!r} reshapes to {entries}, not [B, {heads}, L, {size}]"
    return None


def check(ctx, q, k, v, q_split, k_split, v_split, merge, shape_uses, mask=None, mask2=None, scale=None,
          scale2=None, fill=None, context=None, context_view=None, qh=None, q_scaled=None, kh=None, k3=None,
          kt=None, q_rot=None, k_repeat=None, cos=None, sin=None, guarded=None, **bound):
    dtype = ctx.dtype(q)
    form = _form(ctx, dtype)
    if form is None:
        return (f"no attention op for opset {ctx.opset}, target {ctx.target!r}, ops {policy(ctx.pass_ctx)!r}, "
                f"dtype {dtype} "
                f"(standard Attention needs opset {STANDARD_OPSET}; MultiHeadAttention is float32 on ONNX Runtime)")
    geometry = [_heads(ctx, s) for s in (q_split, k_split, v_split)]
    if any(g is None for g in geometry):
        return "head count or head size unknown"
    (heads, size), (k_heads, k_size), (v_heads, v_size) = geometry
    repeated = k_repeat is not None
    if (k_size, v_size, v_heads) != (size, size, k_heads) or (k_heads != heads and not repeated) \
            or heads % k_heads:
        return f"q/k/v head shapes differ: {geometry}"
    for t, n in ((q, heads), (k, k_heads), (v, k_heads)):
        shape = ctx.shape(t)
        if shape is None or len(shape) != 3 or shape[2] != n * size or ctx.dtype(t) != dtype:
            return f"{t.name!r} is not a [B, S, {n * size}] {dtype} tensor"
    for split, n in ((q_split, heads), (k_split, k_heads), (v_split, k_heads)):
        reason = _keeps_leading(ctx, split, [n, size])
        if reason:
            return reason
    letters = {id(node.outputs[0]): LAYOUTS[name] for name, node in {**bound, "q_split": q_split, "k_split": k_split,
               "v_split": v_split, "qh": qh, "kh": kh, "kt": kt, "context": context, "q_rot": q_rot,
               "k_repeat": k_repeat}.items()
               if name in LAYOUTS and node is not None}
    found = {"kv_heads": k_heads, "cache": None}
    length = None
    k_cat = bound.get("k_cat")
    if k_cat is not None:  # a KV cache: past [B, K, P, H] + the new keys along axis 2
        for past in (bound["past_k"], bound["past_v"]):
            shape = ctx.shape(past)
            if shape is None or len(shape) != 4 or ctx.dtype(past) != dtype \
                    or any(isinstance(d, int) and d != want for d, want in ((shape[1], k_heads), (shape[3], size))):
                return f"past key/value {past.name!r} is not a [B, {k_heads}, P, {size}] {dtype} tensor"
        for node in (k_cat, bound["v_cat"]):
            letters[id(node.outputs[0])] = "BKLH"
        length = (k_cat.outputs[0], 2)
    if repeated:
        for which in "kv":
            reason = _repeat_reason(ctx, bound[f"{which}_unsqueeze"], bound[f"{which}_expand"],
                                    k_repeat if which == "k" else bound["v_repeat"], k, letters, heads, k_heads, size,
                                    length, bound.get("past_k"))
            if reason:
                return reason
    if q_rot is not None:
        for which in "qk":
            reason = _rotate_half_reason(ctx, bound[f"{which}_upper"], bound[f"{which}_lower"], size)
            if reason:
                return reason
        caches = [_rotary_cache(ctx, t, size, q, k) for t in (cos, sin)]
        for c in caches:
            if isinstance(c, str):
                return c
        found["cache"] = caches
    target = ctx.value(merge.inputs[1])
    flat = target is not None and target.reshape(-1).tolist() == [-1, heads * size]  # the view of Conv1D
    reason = (None if flat else _keeps_leading(ctx, merge, [heads * size], like=q, inner=[heads, size])) or _reshape_uses(ctx, shape_uses)
    if reason:
        return reason
    if k3 is not None:  # K^T of the split (or rotated, repeated) keys
        last = next(n for n in (k_repeat, bound.get("k_rot"), kh) if n is not None)
        reason = _transposed_through_3d(ctx, last, k3, kt, size)
        if reason:
            return reason
    if context_view is not None:
        reason = _noop_view(ctx, context_view, heads, size, context.outputs[0],
                            [n.outputs[0] for n in (qh, q_rot, q_scaled, context) if n is not None])
        if reason:
            return reason
    scale_value = 1.0 if scale is None else float(ctx.value(scale).reshape(-1)[0])
    if scale2 is not None:
        scale_value *= float(ctx.value(scale2).reshape(-1)[0])
    divided = any(n.op == "Div" for n in ctx.nodes)
    if divided and scale_value == 0:
        return "division by a zero scale"
    found.update({"form": form, "heads": heads, "size": size, "scale": 1.0 / scale_value if divided else scale_value,
                  "bias": None, "flat": flat})
    if fill is not None:
        fill_value = float(ctx.value(fill).reshape(-1)[0])
        if fill_value > MASK_FILL_LIMIT:
            return f"Where fills masked scores with {fill_value}, not a value below {MASK_FILL_LIMIT:g}"
        inverted = any(n.op == "Where" and n.inputs[1] is fill for n in ctx.nodes)
        fill_value = STANDARD_FILL if form == "standard" and np.isfinite(fill_value) else fill_value
        found.update(bias="where_inverted" if inverted else "where", fill=np.asarray(fill_value, dtype))
    elif mask is not None:
        for m in (mask, mask2):
            shape = ctx.shape(m) if m is not None else ()
            if shape is None or len(shape) > 4 or (m is not None and ctx.dtype(m) != dtype):
                return f"mask {m.name!r} is not a {dtype} tensor of rank <= 4"
        found["bias"] = "add"
        fills = [_where_fill(ctx, m) for m in (mask, mask2) if m is not None]
        if form == "standard" and mask2 is None and fills[0] is not None and np.isfinite(fills[0]) \
                and fills[0] <= MASK_FILL_LIMIT:
            inverted = float(ctx.value(ctx.producer(mask).inputs[1]).reshape(-1)[0]) != 0  # Where(cond, fill, 0)
            found.update(bias="where_inverted" if inverted else "where", fill=np.asarray(STANDARD_FILL, dtype),
                         mask_cond=ctx.producer(mask).inputs[0])
        # the export zeroes the NaN weights of a row whose every key is masked with -inf, where the
        # attention ops give NaN (MultiHeadAttention) or 0: keep that guard on the result unless the
        # bias provably has no -inf
        found["nan_guard"] = guarded is not None and not all(f is not None and np.isfinite(f) for f in fills)
    return found


def _unit_output(ctx, t, i):
    """Where to read dim ``i`` of ``t`` with a Shape without splitting a chain ONNX Runtime fuses
    at load: forward through elementwise ops that are ``t``'s only reader and keep the dim.

    The origin of the query's batch in T5 is the Div inside the decomposed RMSNorm before the
    projections; a Shape read there gave that Div a second reader, and ONNX Runtime no longer
    made its SimplifiedLayerNormalization of the block (two of seven norms left as six ops)."""
    for _ in range(8):
        readers = t.outputs
        if len(readers) != 1 or ctx.is_graph_output(t) or readers[0].op not in KEEPS_DIMS or len(readers[0].outputs) != 1:
            return t, i
        out, rank = readers[0].outputs[0], ctx.rank(t)
        if ctx.rank(out) != rank:
            return t, i
        for other in (x for x in readers[0].inputs if x is not t and x.name):
            shape = ctx.shape(other)
            k = i - (rank - len(shape)) if shape is not None else 0
            if shape is None or (k >= 0 and shape[k] != 1):
                return t, i
        t = out
    return t, i


class _Dims:
    """B, S, L, N, H as 1-D int64 tensors, each built once per replacement."""

    def __init__(self, op, q, k, heads, size, kv_heads=None):
        self.op, self.q, self.k = op, q, k
        kv_heads = kv_heads or heads
        self.made = {"N": np.array([heads], np.int64), "H": np.array([size], np.int64),
                     "K": np.array([kv_heads], np.int64), "G": np.array([heads // kv_heads], np.int64),
                     "1": np.array([1], np.int64)}
        self.shapes = {}

    def _shape(self, t):
        if id(t) not in self.shapes:
            self.shapes[id(t)] = self.op.Shape(t)
        return self.shapes[id(t)]

    def __getitem__(self, letter):
        if letter not in self.made:
            src, index = {"B": (self.q, 0), "S": (self.q, 1), "L": (self.k, 1)}[letter]
            # read the dim where it comes from (the hidden states before the projections), so the
            # projections feed the attention op alone and can be packed into one (fuse-qkv-projection)
            src, index = _unit_output(self.op.ctx, *_origin(self.op.ctx, src, index))
            self.made[letter] = self.op.Gather(self._shape(src), np.array([index], np.int64), axis=0)
        return self.made[letter]

    def shape(self, layout):
        """An int64 [len(layout)] tensor equal to Shape() of a tensor with ``layout``."""
        parts = [self[letter] for letter in layout]
        return parts[0] if len(parts) == 1 else self.op.Concat(*parts, axis=0)


def _rotary(op, form, x, heads, size, cache, dims, length):
    """x [B, S, heads*size] rotated as transformers' rotate_half does, by the [1, S, size] tables."""
    typed = {"_dtype": x.dtype, "_shape": op.ctx.shape(x)}
    memo = op.ctx.pass_ctx.__dict__.setdefault(TABLES_KEY, {})  # one table per model, not per layer

    def table(c, how):
        key = (id(c), how)
        if key not in memo:  # [1, S, H/2]: the two halves of each row are equal (checked)
            half = op.Slice(c, np.array([0], np.int64), np.array([size // 2], np.int64), np.array([-1], np.int64))
            memo[key] = half if how == "half" else op.Reshape(half, np.array([-1, size // 2], np.int64))
        return memo[key]

    if form == "standard":  # opset 23: tables per batch row, no position ids
        target = op.Concat(dims["B"], dims[length], np.array([size // 2], np.int64), axis=0)
        cos, sin = (op.Expand(table(c, "half"), target) for c in cache)
        return op.RotaryEmbedding(x, cos, sin, num_heads=heads, **typed)
    cos, sin = (table(c, "rows") for c in cache)  # [S, H/2], row s = position s
    return op.RotaryEmbedding(x, np.array([0], np.int64), cos, sin, _domain="com.microsoft", **typed)


def _repeat_heads(op, x, kv_heads, groups, size):
    """[B, L, K*H] -> [B, L, K*G*H], each head repeated G times in a row (as repeat_kv on [B, K, L, H])."""
    x = op.Reshape(x, np.array([0, 0, kv_heads, 1, size], np.int64))
    x = op.Expand(x, np.array([1, 1, 1, groups, 1], np.int64))
    return op.Reshape(x, np.array([0, 0, kv_heads * groups * size], np.int64))


def _repeat_heads_bnsh(op, x, kv_heads, groups, size):
    """[B, K, T, H] -> [B, K*G, T, H], each head repeated G times in a row (transformers' repeat_kv)."""
    x = op.Expand(op.Unsqueeze(x, np.array([2], np.int64)), np.array([1, 1, groups, 1, 1], np.int64))
    return op.Reshape(x, np.array([0, kv_heads * groups, -1, size], np.int64))


def attention(op, q, k, v, merge, form, heads, size, scale, bias, flat, shape_uses, mask=None, mask2=None, fill=None,
              kv_heads=None, cache=None, mask_cond=None, nan_guard=False, past_k=None, past_v=None, k_cat=None):
    kv_heads = kv_heads or heads
    dims = _Dims(op, q, k, heads, size, kv_heads)
    total = "L"  # the keys' length; with a KV cache T, past + new
    presents = None
    cat = {"_dtype": q.dtype, "_shape": op.ctx.shape(k_cat.outputs[0])} if past_k is not None else {}  # [B, K, T, H]
    # with as many K/V heads as query heads, the attention op takes the past itself and returns the presents
    own_past = past_k is not None and (form == "standard" or kv_heads == heads)
    if past_k is not None and not own_past:  # present = Concat(past, new) as the model's, then repeated
        kh, vh = (op.Transpose(op.Reshape(t, np.array([0, 0, kv_heads, size], np.int64)), perm=[0, 2, 1, 3])
                  for t in (k, v))
        if cache is not None:
            kh = _rotary(op, form, kh, kv_heads, size, cache, dims, "L")  # 4-D: the same tables, by position
        presents = (op.Concat(past_k, kh, axis=2, **cat), op.Concat(past_v, vh, axis=2, **cat))
        dims.made["T"] = op.Gather(op.Shape(presents[0]), np.array([2], np.int64), axis=0)
    elif past_k is not None:
        dims.made["T"] = op.Add(op.Gather(op.Shape(past_k), np.array([2], np.int64), axis=0), dims["L"])
    if past_k is not None:
        total = "T"
    for name, nodes in shape_uses.items():
        for shape in nodes:
            if shape.op == "Reshape":  # of the merged heads: the same elements as the result
                shape.inputs[0] = merge.outputs[0]
                continue
            layout = LAYOUTS[name] if name in NEW_KV else LAYOUTS[name].replace("L", total)
            start, end = shape.attrs.get("start", 0), shape.attrs.get("end", len(layout))
            op.replace_uses(shape.outputs[0], dims.shape(layout[start:end]))
    if bias is not None:
        if bias != "add":
            zero = np.zeros((), fill.dtype)
            cond = mask if mask_cond is None else mask_cond
            mask = op.Where(cond, zero, fill) if bias == "where" else op.Where(cond, fill, zero)
        if mask2 is not None:
            mask = op.Add(mask, mask2)
        mask = op.Expand(mask, op.Concat(np.array([1, 1], np.int64), dims["S"], dims[total], axis=0))
    typed = {"_dtype": q.dtype, "_shape": op.ctx.shape(q)}  # [B, S, N*H], for the passes that follow
    if presents is not None:  # MultiHeadAttention takes the presents as [B, N, T, H] keys and values
        k, v = presents if kv_heads == heads else (_repeat_heads_bnsh(op, t, kv_heads, heads // kv_heads, size)
                                                   for t in presents)
    if cache is not None:
        q = _rotary(op, form, q, heads, size, cache, dims, "S")
        if presents is None:
            k = _rotary(op, form, k, kv_heads, size, cache, dims, "L")
    if own_past:
        if form == "standard":
            y, *presents = op.Attention(q, k, v, mask, past_k, past_v, q_num_heads=heads, kv_num_heads=kv_heads,
                                        scale=scale, _outputs=3)
        else:
            y, *presents = op.MultiHeadAttention(q, k, v, None, None, mask, past_k, past_v, _domain="com.microsoft",
                                                 num_heads=heads, scale=scale, _outputs=3)
        for t in (y, *presents):
            t.dtype = q.dtype
        y.shape, presents[0].shape, presents[1].shape = typed["_shape"], cat["_shape"], cat["_shape"]
    elif form == "standard":
        y = op.Attention(q, k, v, mask, q_num_heads=heads, kv_num_heads=kv_heads, scale=scale, **typed)
    else:
        if kv_heads != heads and presents is None:  # MultiHeadAttention has one head count: repeat K and V
            k, v = (_repeat_heads(op, t, kv_heads, heads // kv_heads, size) for t in (k, v))
        y = op.MultiHeadAttention(q, k, v, None, None, mask, _domain="com.microsoft", num_heads=heads, scale=scale,
                                  **typed)
    if nan_guard:
        y = op.Where(op.IsNaN(y), np.zeros((), y.dtype), y, **typed)
    y = op.Reshape(y, merge.inputs[1]) if flat else y
    return y if past_k is None else (y, *presents)


RULES = [Rule("attention", PATTERNS, attention, check, allow_shape_uses=("Shape", "Reshape")),
         Rule("attention_past", PAST_PATTERNS, attention, check, allow_shape_uses=("Shape", "Reshape"))]

_FuseAttentionRules = rewrite_pass(
    "fuse-attention",
    "scaled-dot-product attention (head split, QK^T, scale, mask, Softmax, V, merge) -> one attention op",
    RULES,
    options={"form": Option("auto", "auto: Attention at opset >= 23, else com.microsoft MultiHeadAttention "
                                    "where the op policy allows it (--ops ort, onnx target); standard; contrib", choices=("auto", "standard", "contrib"))},
    register=False,
)


def unfused_softmax_reason(graph, ctx, options) -> tuple[int, str | None]:
    """Softmaxes left after the rules, and why the first one's attention block did not match.

    The patterns are rooted at the merge Reshape, which the engine reaches only if the whole
    structure is there, so a block the patterns do not describe (Llama's rotary embedding on the
    split heads, grouped-query K/V repeated by Expand) would otherwise leave no trace in --stats:
    here the pattern engine explains its best partial match at the Reshape after each Softmax."""
    left = [n for n in graph.nodes if n.op == "Softmax"]
    first = None
    for softmax in left[:1]:
        frontier, seen = [softmax], set()
        for _ in range(4):
            frontier = [c for n in frontier for t in n.outputs for c in t.outputs if id(c) not in seen]
            seen.update(id(c) for c in frontier)
            roots = [n for n in frontier if n.op == "Reshape"]
            if roots:
                first = f"at {softmax.name!r}: {explain(RULES[0], graph, roots[0], ctx, options)}"
                break
        first = first or f"at {softmax.name!r}: no Reshape merges the heads within 4 ops after it"
    return len(left), first


@register_pass
class FuseAttention(_FuseAttentionRules):
    def run(self, graph, ctx):
        ctx.__dict__[TABLES_KEY] = {}
        try:
            result = super().run(graph, ctx)
        finally:
            ctx.__dict__.pop(TABLES_KEY, None)
        count, why = unfused_softmax_reason(graph, ctx, self.opts)
        if count:  # each left Softmax is an attention block left as it was
            result.counters["unfused_softmax"] = count
            result.counters["rejected"] = max(result.counters.get("rejected", 0), count)
            ctx.reports.setdefault(self.name, {}).setdefault("rejected", {}).setdefault("softmax", why)
        return result
