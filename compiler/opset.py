"""Raising a model's ai.onnx opset before optimizing it: ``compile(..., opset=23)``, ``infoptc
compile --opset 23``.

Newer opsets have ops that older ones lack, and the fusions emit them only where the model's
opset has them: ``LayerNormalization`` (17), ``Gelu`` (20), ``Attention`` and
``RMSNormalization`` (23, the ones ``--ops standard`` needs for attention and RMSNorm). ONNX's
version converter rewrites the ops whose form changed between the two opsets (ReduceMean's
``axes`` attribute to an input, Split, Squeeze/Unsqueeze...); the converted model is then run
beside the original on ONNX Runtime (generated inputs: token ids inside the vocabulary) and must
give the same outputs. Lowering an opset is not offered: it can remove ops the model uses.
"""

from __future__ import annotations

import logging

import onnx
import onnx.defs
import onnx.version_converter

from .errors import UsageError, VerificationError, first_line

log = logging.getLogger("infoptc")

STANDARD_DOMAINS = ("", "ai.onnx")


def model_opset(model: onnx.ModelProto) -> int | None:
    """The model's ai.onnx opset (None when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None)


def check_opset(value: int | str) -> int:
    """``value`` as an opset number, or a one-line UsageError (exit 2)."""
    newest = onnx.defs.onnx_opset_version()
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UsageError(f"--opset {value!r} is not an opset number (7 to {newest})") from None
    if not 7 <= number <= newest:
        raise UsageError(f"--opset {number}: onnx {onnx.__version__} converts to opsets 7 to {newest}")
    return number


def convert_opset(model: onnx.ModelProto, version: int, why: str) -> onnx.ModelProto:
    """``model`` converted to ai.onnx opset ``version`` by ONNX's version converter; a model it
    cannot convert is a one-line UsageError starting with ``why``."""
    current = model_opset(model)
    try:
        return onnx.version_converter.convert_version(model, version)
    except Exception as e:  # the converter raises bare RuntimeErrors on ops it does not know
        raise UsageError(f"{why}; converting this opset-{current} model failed: {first_line(e)}") from None


def raise_opset(model: onnx.ModelProto, version: int | str, verify: bool = True) -> onnx.ModelProto:
    """``model`` at ai.onnx opset ``version`` (the model itself when it is already there),
    checked against the original on ONNX Runtime when ``verify``.

    UsageError (exit 2): not an opset number, lower than the model's, or a model the converter
    cannot convert. VerificationError (exit 3): the converted model does not load on ONNX
    Runtime or its outputs differ from the original's (reassociating tolerance: the converter
    changes op versions, and ONNX Runtime may run another kernel for the newer one)."""
    version = check_opset(version)
    current = model_opset(model)
    if current is None:
        raise UsageError("--opset: the model imports no ai.onnx opset to raise")
    if version < current:
        raise UsageError(f"--opset {version} is lower than the model's opset {current}; "
                         "infoptc only raises opsets (lowering can remove ops the model uses)")
    if version == current:
        return model
    converted = convert_opset(model, version, f"--opset {version}")
    if verify:
        _check_converted(model, converted, current, version)
    return converted


def _check_converted(original: onnx.ModelProto, converted: onnx.ModelProto, current: int, version: int) -> None:
    from .errors import InvalidModelError
    from .pass_manager import Contract
    from .verify import OrtRunner, check_equivalent, random_inputs

    try:  # a reference ONNX Runtime cannot run (custom ops, inputs it cannot generate) checks nothing
        feeds = random_inputs(original, seed=0)
        OrtRunner(original, threads=1, optimize=False).run(feeds)
    except (InvalidModelError, VerificationError, UsageError) as e:
        log.warning("--opset %d: the opset-%d model did not run on ONNX Runtime (%s); the conversion is not "
                    "checked", version, current, first_line(e))
        return
    try:
        check_equivalent(original, converted, Contract.REASSOCIATING, feeds=[feeds], what=f"the opset-{version} model")
    except InvalidModelError as e:
        raise VerificationError(f"--opset {version}: the converted model does not load on ONNX Runtime: "
                                f"{first_line(e)}") from None
