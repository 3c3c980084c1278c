"""fuse-transposes: cancel or merge Transposes, also across elementwise ops between them.

    Transpose(Transpose(x, p1), p2)           ->  x                  when the permutations cancel
                                              ->  Transpose(x, p)    otherwise, p[i] = p1[p2[i]]
    Transpose(U(Transpose(x, p1)), p2)        ->  U(x) or U(Transpose(x, p))   U elementwise unary,
                                                                      or a binary op with a scalar constant

Elementwise ops commute with any permutation, so sinking the inner Transpose through U brings
the two together. Pure data movement: outputs are bit-identical.
"""

from __future__ import annotations

import numpy as np
from infoptc.pass_manager import Contract
from infoptc.pattern import Const, Rule, rewrite_pass

UNARY = ("Abs", "Acos", "Asin", "Atan", "Ceil", "Cos", "Cosh", "Elu", "Erf", "Exp", "Floor", "HardSigmoid",
         "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal",
         "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan",
         "Tanh", "ThresholdedRelu", "Cast", "Celu", "Gelu")
SCALAR_BINARY = ("Add", "Sub", "Mul", "Div", "Pow")


def _perm(ctx, node, rank) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    return None if rank is None else list(range(rank))[::-1]


def _compose(ctx, x, first, second) -> list[int] | str:
    rank = next((len(p) for p in (first.attrs.get("perm"), second.attrs.get("perm")) if p is not None),
                ctx.rank(x))
    p1, p2 = _perm(ctx, first, rank), _perm(ctx, second, rank)
    if p1 is None or p2 is None:
        return "rank unknown for a Transpose without perm"
    return [p1[i] for i in p2]


def _transposed(op, x, perm):
    return x if perm == sorted(perm) else op.Transpose(x, perm=perm)


# ----------------------------------------------------------------------------- transpose pairs


def transpose_pair(op, x):
    return op.Transpose(op.Transpose(x, _bind="first"), _bind="second")


def check_pair(ctx, x, first, second):
    perm = _compose(ctx, x, first, second)
    return perm if isinstance(perm, str) else {"perm": perm}


def merged(op, x, perm):
    return _transposed(op, x, perm)


# ----------------------------------------------------------------------------- through elementwise ops


def _through_unary(name):
    def pattern(op, x):
        inner = getattr(op, name)(op.Transpose(x, _bind="first"), _bind="elementwise")
        return op.Transpose(inner, _bind="second")

    pattern.__name__ = f"transpose_{name.lower()}_transpose"
    return pattern


def _scalar(v: np.ndarray) -> bool:
    return v.size == 1


def _through_scalar_op(name, const_first):
    def pattern(op, x, c=Const(_scalar)):
        t = op.Transpose(x, _bind="first")
        inner = getattr(op, name)(*((c, t) if const_first else (t, c)), _bind="elementwise")
        return op.Transpose(inner, _bind="second")

    pattern.__name__ = f"transpose_{name.lower()}_scalar_transpose"
    return pattern


def check_sink(ctx, x, first, second, elementwise, c=None):
    perm = _compose(ctx, x, first, second)
    if isinstance(perm, str):
        return perm
    if c is not None and ctx.value(c).ndim > len(perm):
        return "the scalar constant has a higher rank than the data"
    return {"perm": perm}


def sunk(op, x, perm, elementwise, c=None):
    moved = _transposed(op, x, perm)
    inputs = [moved] if c is None else [moved, c] if elementwise.inputs[1] is c else [c, moved]
    return getattr(op, elementwise.op)(*inputs, **elementwise.attrs)


SINK_PATTERNS = [_through_unary(n) for n in UNARY] + [
    _through_scalar_op(n, first) for n in SCALAR_BINARY for first in ((False, True) if n in ("Sub", "Div", "Pow") else (False,))
]

RULES = [
    # Merging two Transposes never duplicates work, so a shared inner Transpose may stay alive.
    Rule("merge_transposes", transpose_pair, merged, check_pair, one_use=False),
    Rule("sink_transpose", SINK_PATTERNS, sunk, check_sink),
]

FuseTransposes = rewrite_pass(
    "fuse-transposes",
    "cancel or merge consecutive Transposes, sinking them through elementwise ops to meet",
    RULES,
    contract=Contract.EXACT,
)
