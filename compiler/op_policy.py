"""The op policy: which operator sets a pass may emit into the model.

    standard   only ai.onnx ops at the model's opset (LayerNormalization from 17, Gelu from 20,
               Attention / RMSNormalization from 23): any ONNX runtime loads the result
    ort        also ONNX Runtime's com.microsoft contrib ops (FusedConv, Gelu, FastGelu, BiasGelu,
               SkipLayerNormalization, MultiHeadAttention, ...): the result needs ONNX Runtime

The policy lives in ``PassContext.options[OPS_KEY]`` (``"ops"``), set by ``compile(ops=...)`` /
``infoptc compile --ops``, so every pass reads the same answer through ``contrib_allowed(ctx)``
(fusions today; a quantizer emitting MatMulNBits can ask the same question). Contrib ops only
run on ONNX Runtime, so they are allowed only for the ``onnx`` target, whatever the policy.
The driver records the policy in the artifact's ``metadata_props`` under ``infoptc.ops``.
"""

from __future__ import annotations

from .errors import UsageError

OPS_KEY = "ops"
OPS_POLICIES = ("standard", "ort")
DEFAULT_OPS = "ort"
METADATA_KEY = "infoptc.ops"
CONTRIB_TARGETS = frozenset({"onnx"})


def check_policy(value: str) -> str:
    if value not in OPS_POLICIES:
        raise UsageError(f"unknown op policy {value!r}; choose one of {', '.join(OPS_POLICIES)}")
    return value


def policy(pass_ctx) -> str:
    """The policy a pass context carries (``DEFAULT_OPS`` when none was set)."""
    return pass_ctx.options.get(OPS_KEY, DEFAULT_OPS)


def contrib_allowed(pass_ctx) -> bool:
    """Whether a pass may emit com.microsoft ops: policy ``ort`` and a target running them."""
    return policy(pass_ctx) == "ort" and pass_ctx.target in CONTRIB_TARGETS
