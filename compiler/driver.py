"""The driver: load -> PassManager(pipeline) -> target.lower -> Artifact, in one function."""

from __future__ import annotations

from typing import Any, Sequence

import onnx
import onnx_graphsurgeon as gs

from . import ir, op_policy, plugins
from .errors import UsageError
from .instruments import BisectLimit, VerifyEach
from .opset import convert_opset, raise_opset
from .pass_manager import Instrument, PassContext, PassManager, paused_gc
from .pipelines import compress_pipeline, memory_limited_pipeline, pipeline_before_quantization, pipeline_for_level, quantize_pipeline
from .progress import stage
from .targets import Artifact, get_target


def compile(
    model: ir.ModelSource,
    target: str = "onnx",
    opt_level: int | str = 2,
    passes: str | None = None,
    *,
    input_shapes: dict[str, Sequence[int]] | None = None,
    freeze_initializers: bool = False,
    instruments: Sequence[Instrument] = (),
    verify_each: bool = False,
    opt_bisect_limit: int | None = None,
    load_plugins: Sequence[str] = (),
    quantize: str | None = None,
    calibration: Any = None,
    quantize_options: dict[str, Any] | None = None,
    equalize: bool = False,
    correct_bias: bool = False,
    smooth_quant: float | None = None,
    memory_limit: int | None = None,
    ops: str | None = None,
    compress: Sequence[str] = (),
    opset: int | str | None = None,
    **target_options: Any,
) -> Artifact:
    """Optimize ``model`` and lower it for ``target``; the artifact can ``save`` and ``run``.

    ``passes`` (pipeline text) replaces the pipeline of ``opt_level`` when given.
    ``freeze_initializers`` treats initializers that are also listed as graph inputs (old
    exporters list every weight that way) as constants, as onnxsim does: the passes may then fold
    and fuse them, and the optimized model stops accepting them as inputs.
    ``quantize`` (``"int8"`` or ``"int8-dynamic"``) appends the quantizer to the -O level's
    pipeline (see ``pipelines.quantize_pipeline``); ``calibration`` is its data (a path, or an
    iterable of feed dicts) and ``quantize_options`` the quantizer pass's options; ``equalize``,
    ``correct_bias`` and ``smooth_quant`` (an alpha) add the accuracy-recovery passes before it.
    ``quantize="fp16"``/``"bf16"`` appends convert-float, ``"int4"`` quantize-int4 (their options,
    e.g. ``{"keep-io-types": True}`` or ``{"block-size": 64, "method": "gptq"}``, in ``quantize_options``).
    ``ops`` is the op policy the passes follow (``"standard"``: ai.onnx ops only; ``"ort"``, the
    default: ONNX Runtime's com.microsoft ops too; see ``op_policy``), recorded in the model's
    metadata as ``infoptc.ops``.
    ``compress`` lists compression passes as pipeline text (``"prune-channels{ratio=0.3}"``,
    ``"low-rank{energy=0.99}"``...), placed around the pipeline by ``pipelines.compress_pipeline``;
    they read ``calibration`` too.
    ``opset`` raises the model's ai.onnx opset first (``opset.raise_opset``: ONNX's version
    converter, the result checked against the original on ONNX Runtime); default: the model's own.
    The artifact also carries ``source`` (the loaded input model), ``pass_records`` and
    ``reports`` (what passes reported, by pass name, e.g. the quantizer's per-tensor table).
    ``memory_limit`` (bytes) ends the pipeline with ``reorder-for-memory``, which raises
    ``VerificationError`` when no order it finds fits the limit.
    """
    for path in load_plugins:
        plugins.load_plugin_file(path)
    if quantize == "int8-dynamic" and target != "onnx":
        raise UsageError(f"--quantize int8-dynamic writes ONNX Runtime's DynamicQuantizeMatMul, which the {target} "
                         "target cannot run; use --target onnx, or --quantize int8 (standard QDQ)")
    ops = op_policy.check_policy(ops if ops is not None else op_policy.DEFAULT_OPS)
    backend = get_target(target)(**target_options)
    backend.check_available()
    if quantize is not None:  # what --quantize means for the target (tensorrt: all 8 weight bits, no CPU timing)
        quantize_options = {**getattr(backend, "quantize_defaults", {}).get(quantize, {}), **(quantize_options or {})}
    with paused_gc():  # importing and exporting a graph makes as many node<->tensor cycles as passes do
        source = ir.load_model(model)
        working = raise_opset(source, opset) if opset is not None else source
        working = upgrade_for_quantization(working) if quantize is not None else working
        graph = ir.to_graph(ir.infer_shapes(working))
        bind_input_shapes(graph, input_shapes or {})
        if freeze_initializers:
            graph.inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
        instruments = list(instruments)
        if verify_each:  # the reference must take the same (bound, frozen) inputs as the optimized model
            instruments.append(VerifyEach(ir.from_graph(graph, source) if input_shapes or freeze_initializers
                                          else source))
        if opt_bisect_limit is not None:
            instruments.append(BisectLimit(opt_bisect_limit))
        if quantize is not None:
            pipeline = quantize_pipeline(passes if passes is not None else opt_level, quantize, quantize_options,
                                         equalize=equalize, correct_bias=correct_bias, smooth_quant=smooth_quant)
        else:
            pipeline = passes if passes is not None else pipeline_for_level(opt_level)
        if memory_limit is not None:
            pipeline = memory_limited_pipeline(pipeline, memory_limit)
        if compress:
            pipeline = compress_pipeline(pipeline, list(compress))
        manager = PassManager(pipeline, instruments)
        ctx = PassContext(opset=graph.opset, target=target, input_shapes=dict(input_shapes or {}),
                          options={"calibration": calibration} if calibration is not None else {})
        ctx.options[op_policy.OPS_KEY] = ops
        if manager.pipeline:  # -O0 only re-serializes: the model is left as its author wrote it
            ctx.metadata[op_policy.METADATA_KEY] = ops
        with stage(f"running the {f'-O{opt_level}' if passes is None else 'given'} pipeline"
                   + (f" with {quantize} quantization" if quantize else "")):
            records = manager.run(graph, ctx)
        optimized = ir.from_graph(graph, working)
        for key, value in sorted(ctx.metadata.items()):
            entry = next((m for m in optimized.metadata_props if m.key == key), None) or optimized.metadata_props.add()
            entry.key, entry.value = key, value
        with stage(f"lowering for the {target} target"):
            artifact = backend.lower(optimized)
    artifact.source = source
    artifact.pass_records = records
    artifact.pipeline = str(manager)
    artifact.reports = ctx.reports
    return artifact


QUANTIZE_MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear


def upgrade_for_quantization(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset 13 when it imports an older default opset (PaddlePaddle exports 12):
    per-channel Q/DQ need 13. ONNX's version converter rewrites the ops whose form changed
    (Squeeze/Unsqueeze axes, Split, ReduceSum...); a model it cannot convert is an error."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), QUANTIZE_MIN_OPSET)
    if current >= QUANTIZE_MIN_OPSET:
        return model
    return convert_opset(model, QUANTIZE_MIN_OPSET, f"quantization needs opset {QUANTIZE_MIN_OPSET}")


def prepare_for_quantization(model: ir.ModelSource, opt_level: int | str = 3) -> onnx.ModelProto:
    """The fp32 model a quantizer at ``opt_level`` starts from: at opset 13 or newer, through the
    level's passes minus the fusions that hide layers from quantizers (what sensitivity analysis
    measures, with the node names the quantizer's ``exclude`` takes)."""
    return compile(upgrade_for_quantization(ir.load_model(model)), opt_level=opt_level,
                   passes=pipeline_before_quantization(opt_level)).model


def optimize(model: ir.ModelSource, opt_level: int | str = 2, passes: str | None = None, **kwargs: Any) -> onnx.ModelProto:
    """Run the pipeline and return the optimized ``onnx.ModelProto`` (the ``onnx`` target's model)."""
    kwargs.setdefault("target", "onnx")
    return compile(model, opt_level=opt_level, passes=passes, **kwargs).model


def bind_input_shapes(graph: gs.Graph, shapes: dict[str, Sequence[int]]) -> None:
    """Replace the (possibly symbolic) shapes of graph inputs by concrete ones."""
    by_name = {t.name: t for t in graph.inputs}
    for name, shape in shapes.items():
        if name not in by_name:
            raise UsageError(f"--input-shape names {name!r}, which is not a model input "
                             f"(inputs: {', '.join(map(repr, by_name))})")
        tensor = by_name[name]
        if tensor.shape is not None and len(tensor.shape) != len(shape):
            raise UsageError(f"--input-shape {name}: rank {len(shape)} given, the model's input has rank {len(tensor.shape)}")
        for old, new in zip(tensor.shape or [], shape):
            if isinstance(old, int) and old > 0 and old != new:
                raise UsageError(f"--input-shape {name}: dimension {new} given where the model fixes {old}")
        if any(int(d) <= 0 for d in shape):
            raise UsageError(f"--input-shape {name}: dimensions must be positive")
        tensor.shape = [int(d) for d in shape]


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["x:1x3x224x224", "ids:1,128"]`` -> ``{"x": (1, 3, 224, 224), "ids": (1, 128)}``."""
    out = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = tuple(int(d) for d in dims.replace(",", "x").split("x"))
        except ValueError:
            raise UsageError(f"bad --input-shape {spec!r}; expected NAME:1x3x224x224") from None
    return out
