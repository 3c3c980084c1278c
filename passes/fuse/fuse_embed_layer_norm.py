"""fuse-embed-layer-norm: BERT-class embeddings + LayerNorm -> com.microsoft EmbedLayerNormalization.

    y = LayerNormalization(W[ids] + P[pos] (+ T[tt]), gamma, beta)
        ->  y = EmbedLayerNormalization(Cast(ids, int32), [tt32], W, P', [T], gamma, beta, , [pos32])

as ONNX Runtime's transformer optimizer writes it (``mask_index_type=0``: no mask output; the
padding mask keeps going to the attention as it did). Each lookup is a ``Gather`` of a constant
2-D table; the sum may be associated either way. Which lookup plays which part is decided by
what its ids are proved to be, not by names:

- **word**: the full ``[B, S]`` ids the output's batch and sequence come from;
- **position**: ids proved to be ``arange(S)`` on every row (a ``Slice`` ``[0:S]`` of a constant
  whose rows count 0, 1, 2...: the TorchScript and dynamo exports' ``position_ids`` buffer; or a
  constant of such rows): the op's implied positions. Other ids of shape ``[1, S]`` or ``[B, S]``
  (RoBERTa's ``padding_idx + cumsum(ids != pad)``) go to its ``position_ids`` input as they are
  computed: nothing about their values needs proving;
- **segment**: ``[B, S]`` ids (a ``token_type_ids`` input) -> ``segment_ids``; ids proved all
  zero (the exports' ``token_type_ids`` buffer of zeros, gathered and expanded) contribute the
  table's row 0 to every token, which is folded into the position table (``P' = P + T[0]``).

The operands' shapes are proved to broadcast into the word lookup's (the op does not broadcast
the way ``Add`` does). int64 ids get an explicit ``Cast`` to int32, the op's only id type.
What the fused op does differently: its CPU kernel fails with "input index out of range" for a
negative id, where ``Gather`` counts it from the end (ids in ``[0, vocabulary)``, the only
meaningful ones, give the same result), and it sums ``(word + position) + segment`` in one
fp32 loop (reassociating). Only with ``--ops ort`` on the onnx target; fp32 only (the CPU
kernel's one type). Only with ``device=gpu``: with the fused op in the model ONNX Runtime proves
the residual shapes downstream and fuses every residual Add + LayerNormalization into its CPU
SkipLayerNormalization at load, which is slower than the pair (see fuse_skip_layer_norm), so by
default (``device=cpu``) ``--stats`` reports each match as rejected with that reason.
"""

from __future__ import annotations

import numpy as np
from infoptc.op_policy import contrib_allowed, policy
from infoptc.pass_manager import Option
from infoptc.pattern import Const, Rule, rewrite_pass

from ._dims import dims as _dims
from ._dims import same_dim

INT32 = 6  # onnx.TensorProto.INT32
# ops that only move or copy elements of their first input: all-zero in, all-zero out
_MOVES_DATA = {"Expand", "Gather", "GatherElements", "GatherND", "Slice", "Reshape", "Squeeze", "Unsqueeze",
               "Transpose", "Identity", "Flatten", "Tile", "Cast"}


def _pattern(lookups: int, with_beta: bool):
    def gathers(op, tables, ids):
        return [op.Gather(t, i, axis=0, _bind=f"gather{k}") for k, (t, i) in enumerate(zip(tables, ids))]

    def total(op, g):
        s = op.Add(g[0], g[1], _bind="add0")
        return op.Add(s, g[2], _bind="add1") if len(g) > 2 else s

    if lookups == 3 and with_beta:
        def pattern(op, i0, i1, i2, gamma, beta, t0=Const(), t1=Const(), t2=Const()):
            return op.LayerNormalization(total(op, gathers(op, (t0, t1, t2), (i0, i1, i2))), gamma, beta, _bind="norm")
    elif lookups == 3:
        def pattern(op, i0, i1, i2, gamma, t0=Const(), t1=Const(), t2=Const()):
            return op.LayerNormalization(total(op, gathers(op, (t0, t1, t2), (i0, i1, i2))), gamma, _bind="norm")
    elif with_beta:
        def pattern(op, i0, i1, gamma, beta, t0=Const(), t1=Const()):
            return op.LayerNormalization(total(op, gathers(op, (t0, t1), (i0, i1))), gamma, beta, _bind="norm")
    else:
        def pattern(op, i0, i1, gamma, t0=Const(), t1=Const()):
            return op.LayerNormalization(total(op, gathers(op, (t0, t1), (i0, i1))), gamma, _bind="norm")
    pattern.__name__ = f"embed_layer_norm_{lookups}{'' if with_beta else '_no_beta'}"
    return pattern


# ----------------------------------------------------------------------------- what the ids are


def _all_zero(ctx, t, depth: int = 0) -> bool:
    """Whether every element of ``t`` is provably 0: a constant of zeros (ConstantOfShape of 0)
    moved or copied by ops that only move data (``_MOVES_DATA``, their first input)."""
    value = ctx.value(t)
    if value is not None:
        return value.size > 0 and not value.any()
    node = ctx.producer(t)
    if node is None or depth > 16:
        return False
    if node.op == "ConstantOfShape":
        fill = node.attrs.get("value")
        return fill is None or not np.asarray(getattr(fill, "values", fill)).any()
    return node.op in _MOVES_DATA and bool(node.inputs) and _all_zero(ctx, node.inputs[0], depth + 1)


def _counts_rows(value: np.ndarray) -> bool:
    return value.ndim == 2 and value.shape[1] >= 2 and np.array_equal(value, np.broadcast_to(
        np.arange(value.shape[1]), value.shape))


def _slices_columns(ctx, node) -> bool:
    """Whether ``node`` is a ``Slice`` ``[0:end]`` along axis 1 (step 1) of a constant [R, N >= 2]."""
    if node.op != "Slice" or len(node.inputs) < 4:
        return False
    data = ctx.value(node.inputs[0])
    starts, axes, steps = (ctx.value(node.inputs[k]) if len(node.inputs) > k and node.inputs[k].name else None
                           for k in (1, 3, 4))
    return (data is not None and data.ndim == 2 and data.shape[1] >= 2 and starts is not None
            and starts.size == 1 and int(starts.reshape(-1)[0]) == 0 and axes is not None and axes.size == 1
            and int(axes.reshape(-1)[0]) in (1, -1) and (steps is None or int(steps.reshape(-1)[0]) == 1))


def _is_arange(ctx, t) -> bool:
    """Whether every row of the 2-D ids ``t`` is 0, 1, 2, ...: a constant of such rows, or a
    ``Slice`` ``[0:end]`` along axis 1 of one (the exporters' ``position_ids`` buffer)."""
    value = ctx.value(t)
    if value is not None:
        return _counts_rows(value)
    node = ctx.producer(t)
    return node is not None and _slices_columns(ctx, node) and _counts_rows(ctx.value(node.inputs[0]))


# ----------------------------------------------------------------------------- shapes


def _shape_entries(ctx, t) -> list | None:
    """A 1-D shape tensor as entries (``_dims.dims``), also through torch's ``expand(-1)``
    guard ``Where(Equal(s, c), ones, s)``: with every entry of ``c`` negative and every entry of
    ``s`` a dimension or a non-negative int, the condition is never true and the result is ``s``."""
    node = ctx.producer(t)
    if node is not None and node.op == "Where":
        cond, chosen = ctx.producer(node.inputs[0]), node.inputs[2]
        if cond is not None and cond.op == "Equal":
            sides = list(cond.inputs)
            if any(s is chosen for s in sides):
                other = next(s for s in sides if s is not chosen) if sides[0] is not sides[1] else None
                c = None if other is None else ctx.value(other)
                entries = _dims(ctx, chosen)
                if c is not None and (c < 0).all() and entries is not None \
                        and all(isinstance(e, tuple) or e >= 0 for e in entries):
                    return entries
    return _dims(ctx, t)


def _broadcast(ctx, a: list, b: list) -> list | None:
    """numpy broadcasting of two entry lists (None where two entries are not provably equal)."""
    if len(a) < len(b):
        a, b = b, a
    out = list(a[: len(a) - len(b)])
    for x, y in zip(a[len(a) - len(b):], b):
        if y == 1 or (isinstance(x, tuple) and isinstance(y, tuple) and same_dim(ctx, x, y[1], y[2])):
            out.append(x)
        elif x == 1:
            out.append(y)
        elif isinstance(x, int) and isinstance(y, int) and x == y:
            out.append(x)
        else:
            return None
    return out


def _entries(ctx, t, depth: int = 0) -> list | None:
    """``t``'s shape as entries (ints, ("dim", x, i)), proved through the ops exporters build
    the position and token type ids with: Expand, GatherElements, a ``Slice`` ``[0:end]``."""
    node = ctx.producer(t)
    if node is not None and depth < 16:
        found = None
        if node.op == "Expand":
            a, b = _entries(ctx, node.inputs[0], depth + 1), _shape_entries(ctx, node.inputs[1])
            found = None if a is None or b is None else _broadcast(ctx, a, b)
        elif node.op == "GatherElements":
            found = _entries(ctx, node.inputs[1], depth + 1)
        elif node.op == "Slice" and _slices_columns(ctx, node):
            # [0:end] of a constant [R, N] along axis 1 is [R, min(N, end)]; where end > N >= 2
            # the original's Add cannot broadcast the lookup and fails (and so does the fused
            # op, on positions past the table or a position_ids shorter than S): take end
            rows, ends = ctx.value(node.inputs[0]).shape[0], _shape_entries(ctx, node.inputs[2])
            found = None if ends is None or len(ends) != 1 else [rows, ends[0]]
        if found is not None:
            return found
    shape = ctx.shape(t)
    if shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else ("dim", t, i) for i, d in enumerate(shape)]


def _same_entry(ctx, entry, ref, i) -> bool:
    """Whether a shape entry provably equals dim ``i`` of tensor ``ref``."""
    if isinstance(entry, tuple):
        return same_dim(ctx, entry, ref, i)
    known = ctx.shape(ref)[i]
    return isinstance(known, int) and known == entry


def _fits(ctx, entries, ids, batch_one: bool) -> bool:
    """Whether ids of shape ``entries`` are ``[B, S]`` of ``ids`` (or ``[1, S]`` if ``batch_one``)."""
    return (entries is not None and len(entries) == 2 and _same_entry(ctx, entries[1], ids, 1)
            and ((batch_one and entries[0] == 1) or _same_entry(ctx, entries[0], ids, 0)))


# ----------------------------------------------------------------------------- check and replacement


DEVICE_OPTION = Option("cpu", "where ONNX Runtime will run the model: cpu keeps the lookups (with the fused op ONNX "
                              "Runtime then fuses every residual Add + LayerNorm into its slower CPU "
                              "SkipLayerNormalization), gpu fuses", choices=("cpu", "gpu"))
CPU_REASON = ("on ONNX Runtime's CPU provider the fused op makes the model slower: with it ONNX Runtime proves the "
              "residual shapes and fuses every residual Add + LayerNormalization into its slower CPU "
              "SkipLayerNormalization kernel at load (device=gpu fuses it)")


def check(ctx, norm, gamma, i0, i1, t0, t1, gather0, gather1, add0, shape_uses, i2=None, t2=None, gather2=None,
          add1=None, beta=None):
    if not contrib_allowed(ctx.pass_ctx):
        return f"contrib ops are not allowed (ops {policy(ctx.pass_ctx)!r}, target {ctx.target!r})"
    total = norm.inputs[0]
    shape, dtype = ctx.shape(total), ctx.dtype(total)
    if dtype is None or dtype.name != "float32":
        return f"dtype {dtype}: ONNX Runtime's CPU EmbedLayerNormalization kernel is float32 only"
    if shape is None or len(shape) != 3:
        return f"the embedding sum is not [B, S, H] ({shape})"
    if [ctx.attr(norm, "axis", -1) % 3, ctx.attr(norm, "stash_type", 1)] != [2, 1] \
            or any(t.outputs for t in norm.outputs[1:]):
        return "LayerNormalization is not over the last axis in fp32, or its mean/inv-std outputs are read"
    lookups = [(i, t) for i, t in ((i0, t0), (i1, t1), (i2, t2)) if i is not None]
    width = ctx.value(t0).shape[-1] if ctx.value(t0).ndim == 2 else None
    for ids, table in lookups:
        if ctx.value(table).ndim != 2 or ctx.value(table).shape[1] != width or ctx.dtype(table) != dtype:
            return f"table {table.name!r} is not a [rows, {width}] {dtype} matrix like the others"
        if ctx.dtype(ids) is None or ctx.dtype(ids).name not in ("int32", "int64"):
            return f"ids {ids.name!r} are {ctx.dtype(ids)}, not int32/int64"
    for key, t in (("gamma", gamma), ("beta", beta)):
        if t is not None and (ctx.shape(t) != (width,) or ctx.dtype(t) != dtype):
            return f"{key} {t.name!r} is not a [{width}] vector"
    roles = _roles(ctx, lookups)
    if isinstance(roles, str):
        return roles
    if ctx.options.get("device", "cpu") != "gpu":
        return CPU_REASON
    # a Shape may read what has the output's [B, S, H]: the word lookup, or a sum that includes it
    word = next(g for g in (gather0, gather1, gather2) if g is not None and g.inputs[1] is roles["ids"]
                and g.inputs[0] is roles["word"])
    same = {id(word), id(add1 if add1 is not None else add0)}
    if add1 is not None and any(t is word.outputs[0] for t in add0.inputs):
        same.add(id(add0))
    bound = {"gather0": gather0, "gather1": gather1, "gather2": gather2, "add0": add0, "add1": add1}
    for name, nodes in shape_uses.items():
        if nodes and id(bound.get(name)) not in same:
            return f"Shape {nodes[0].name!r} reads {name!r}, whose shape is not provably the output's"
    return {**roles, "epsilon": float(ctx.attr(norm, "epsilon", 1e-5)), "width": width}


def _roles(ctx, lookups) -> dict | str:
    """Who is word, position, segment (see the module docstring): the first assignment that
    proves, trying each lookup whose ids are neither all zero nor counting as the word."""
    zero = [(i, t) for i, t in lookups if _all_zero(ctx, i)]
    rest = [(i, t) for i, t in lookups if not any(i is z for z, _ in zero)]
    words = [(i, t) for i, t in rest if ctx.rank(i) == 2 and not _is_arange(ctx, i)]
    if not words:
        return "no lookup has 2-D ids other than counting or all-zero ones to be the word lookup"
    reason = ""
    for word_ids, word in words:
        roles = _assign(ctx, word_ids, word, rest, zero)
        if isinstance(roles, dict):
            return roles
        reason = reason or roles
    return reason


def _assign(ctx, word_ids, word, rest, zero) -> dict | str:
    roles = {"ids": word_ids, "word": word, "zero_row": [t for _, t in zero], "segment_ids": None,
             "segment": None, "position_ids": None, "position": None}
    for ids, table in rest:
        if ids is word_ids and table is word:
            continue
        entries = _entries(ctx, ids)
        if roles["position"] is None and _is_arange(ctx, ids) and _fits(ctx, entries, word_ids, True):
            roles.update(position=table)
        elif roles["segment"] is None and _fits(ctx, entries, word_ids, False):
            roles.update(segment_ids=ids, segment=table)
        elif roles["position"] is None and _fits(ctx, entries, word_ids, True):
            roles.update(position_ids=ids, position=table)
        else:
            return (f"ids {ids.name!r} of shape {_shown(entries)} are not provably [1 or B, S] of the word ids "
                    f"{word_ids.name!r}: EmbedLayerNormalization does not broadcast them as Add does")
    if roles["position"] is None and roles["segment"] is not None:
        # a second [B, S] lookup and no positions: it serves as position_ids ([B, S] is accepted)
        roles.update(position_ids=roles["segment_ids"], position=roles["segment"], segment_ids=None, segment=None)
    if roles["position"] is None:
        return "no position lookup (ids counting 0..S-1, or [1 or B, S] position ids) among the summed lookups"
    for ids, _ in zero:
        if not _broadcasts(ctx, _entries(ctx, ids), word_ids):
            return f"the all-zero ids {ids.name!r} are not provably of a shape that broadcasts into [B, S]"
    return roles


def _shown(entries) -> str:
    if entries is None:
        return "unknown"
    return "[" + ", ".join(str(e) if isinstance(e, int) else f"{e[1].name}[{e[2]}]" for e in entries) + "]"


def _broadcasts(ctx, entries, ids) -> bool:
    """Whether ids of shape ``entries`` broadcast into ``ids``'s [B, S] without growing it."""
    if entries is None or len(entries) > 2:
        return False
    offset = 2 - len(entries)
    return all(e == 1 or _same_entry(ctx, e, ids, offset + k) for k, e in enumerate(entries))


def embed_layer_norm(op, ids, word, position, position_ids, segment_ids, segment, zero_row, gamma, epsilon,
                     width, shape_uses, beta=None):
    def int32(t):
        return t if op.ctx.dtype(t) == np.dtype("int32") else op.Cast(t, to=INT32)

    if zero_row:  # all-zero ids: their table's row 0 is added to every token, so to every position
        rows = op.ctx.value(position)
        for table in zero_row:
            rows = rows + op.ctx.value(table)[0]
        position = op.constant(rows.astype(np.float32), "position_embedding")
    if beta is None:
        beta = op.constant(np.zeros(width, np.float32), "beta")
    inputs = [int32(ids), None if segment_ids is None else int32(segment_ids), word, position, segment, gamma, beta,
              None, None if position_ids is None else int32(position_ids)]
    while inputs[-1] is None:
        inputs.pop()
    y = op.EmbedLayerNormalization(*inputs, _domain="com.microsoft", epsilon=epsilon, mask_index_type=0)
    for nodes in shape_uses.values():  # they read a [B, S, H] tensor the fused op no longer computes
        for node in nodes:
            node.inputs[0] = y
    return y


RULES = [
    # three lookups first: BERT's word + token type + position. DistilBERT reads the sequence
    # length from Shape(word lookup): that Shape is re-pointed to the output, of the same shape
    Rule("embed_layer_norm", [_pattern(n, b) for n in (3, 2) for b in (True, False)], embed_layer_norm, check,
         allow_shape_uses=True),
]

FuseEmbedLayerNorm = rewrite_pass(
    "fuse-embed-layer-norm",
    "word/position/token-type Gathers + Adds + LayerNormalization -> com.microsoft EmbedLayerNormalization (--ops ort)",
    RULES,
    options={"device": DEVICE_OPTION},
)
