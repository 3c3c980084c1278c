"""fuse-pad: a zero Pad of the spatial dims folded into the pads of the Conv or pool after it.

    Conv(Pad(x, pads, 0), w[, b])                        ->  Conv(x, w[, b], pads=conv pads + spatial pads)
    AveragePool(Pad(x, pads, 0))                         ->  AveragePool(x, pads=..., count_include_pad=1)
    MaxPool(Pad(x, pads, -inf))                          ->  MaxPool(x, pads=...)

Only constant mode, non-negative pads, nothing padded on the batch and channel dims, auto_pad
NOTSET and ceil_mode 0. AveragePool must count padding (count_include_pad=1) unless it has no
pads of its own. MaxPool pads with -inf, so only a -inf Pad (or a zero Pad of a Relu output)
folds into it.
"""

from __future__ import annotations

import numpy as np
from infoptc.pattern import Rule, rewrite_pass


def pad_conv(op, x):
    return op.Conv(op.Pad(x, _allow_other_inputs=True, _bind="pad"), _allow_other_inputs=True, _bind="consumer")


def pad_avgpool(op, x):
    return op.AveragePool(op.Pad(x, _allow_other_inputs=True, _bind="pad"), _bind="consumer")


def pad_maxpool(op, x):
    return op.MaxPool(op.Pad(x, _allow_other_inputs=True, _bind="pad"), _bind="consumer")


def _pad_amounts(ctx, pad, rank) -> tuple[list[int], float] | str:
    """(per-axis pads over all ``rank`` axes, fill value) of a constant-mode Pad."""
    if ctx.attr(pad, "mode", "constant") not in ("constant", b"constant"):
        return f"Pad mode is {ctx.attr(pad, 'mode')!r}"
    ins = [t if t.name else None for t in pad.inputs]
    if len(ins) > 1 and ins[1] is not None:  # opset >= 11: inputs pads, constant_value, axes
        pads = ctx.value(ins[1])
        fill = ctx.value(ins[2]) if len(ins) > 2 and ins[2] is not None else np.zeros(())
        axes = ctx.value(ins[3]) if len(ins) > 3 and ins[3] is not None else np.arange(rank)
    else:
        pads = np.asarray(pad.attrs.get("pads", [])) if "pads" in pad.attrs else None
        fill, axes = np.asarray(pad.attrs.get("value", 0.0)), np.arange(rank)
    if pads is None or fill is None or axes is None:
        return "Pad amounts, fill value or axes are not constants"
    axes = [int(a) % rank for a in axes.reshape(-1)]
    pads = [int(p) for p in pads.reshape(-1)]
    if len(pads) != 2 * len(axes):
        return "Pad amounts do not match its axes"
    full = [0] * (2 * rank)
    for i, a in enumerate(axes):
        full[a], full[rank + a] = pads[i], pads[len(axes) + i]
    return full, float(fill.reshape(-1)[0]) if fill.size else 0.0


def check(ctx, x, pad, consumer):
    rank = ctx.rank(x)
    if rank is None and consumer.op == "Conv":
        rank = ctx.rank(consumer.inputs[1])
    if rank is None or rank < 3:
        return "input rank unknown"
    found = _pad_amounts(ctx, pad, rank)
    if isinstance(found, str):
        return found
    full, fill = found
    if any(p < 0 for p in full):
        return "negative pads crop; they do not fold"
    if any(full[i] or full[rank + i] for i in (0, 1)):
        return "Pad touches the batch or channel dims"
    if ctx.attr(consumer, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return f"{consumer.op} uses auto_pad"
    if consumer.op != "Conv" and ctx.attr(consumer, "ceil_mode", 0):
        return f"{consumer.op} uses ceil_mode"
    spatial = rank - 2
    own = list(consumer.attrs.get("pads", [0] * 2 * spatial))
    attrs = dict(consumer.attrs)
    if consumer.op == "MaxPool":
        if len(consumer.outputs) > 1 and consumer.outputs[1].outputs:
            return "MaxPool indices are used"
        relu = ctx.producer(x)
        if not (fill == -np.inf or (fill == 0 and relu is not None and relu.op == "Relu")):
            return f"MaxPool pads with -inf, the Pad fills {fill}"
    elif fill != 0:
        return f"Pad fills {fill}, not zero"
    if consumer.op == "AveragePool" and not ctx.attr(consumer, "count_include_pad", 0):
        if any(own):
            return "AveragePool excludes its own padding from the average (count_include_pad=0)"
        attrs["count_include_pad"] = 1
    attrs["pads"] = [own[i] + full[2 + i] for i in range(spatial)] + [own[spatial + i] + full[rank + 2 + i]
                                                                      for i in range(spatial)]
    if consumer.op != "Conv" and any(p >= k for p, k in zip(attrs["pads"], list(attrs.get("kernel_shape", [])) * 2)):
        return "ONNX Runtime wants pool pads smaller than the kernel"
    if consumer.op == "MaxPool" and fill == 0:
        # 0 = max over a Relu window only while every window keeps at least one real element.
        kernel, dilations = attrs.get("kernel_shape", []), attrs.get("dilations", [1] * spatial)
        extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)] * 2
        if len(extent) != len(attrs["pads"]) or any(p >= e for p, e in zip(attrs["pads"], extent)):
            return "a MaxPool window would lie entirely in the padding"
    return {"attrs": attrs}


def folded(op, x, consumer, attrs):
    return getattr(op, consumer.op)(x, *consumer.inputs[1:], **attrs)


RULES = [
    Rule("pad_conv", pad_conv, folded, check),
    Rule("pad_avgpool", pad_avgpool, folded, check),
    Rule("pad_maxpool", pad_maxpool, folded, check),
]

FusePad = rewrite_pass(
    "fuse-pad",
    "fold a constant zero Pad of the spatial dims into the pads of the following Conv/AveragePool/MaxPool",
    RULES,
)
