"""The ``tensorrt`` target: a prepared ONNX for TensorRT 10+ strongly typed networks, and the
engine (.plan) where TensorRT and a GPU are present.

TensorRT 10 builds strongly typed networks: precision comes from the ONNX itself, not from
builder flags. The target therefore prepares the ONNX:

- int8 (``--quantize int8``): the quantizer's QDQ made symmetric, as TensorRT's explicit
  quantization requires: activations int8 with zero point 0 (a uint8 range that started at 0,
  i.e. a Relu folded into the quantizer's range, gets its Relu back before the Q, which keeps
  the clip), weights int8 per output channel behind DequantizeLinear, biases back in fp32
  (TensorRT quantizes no int32 bias; it fuses the bias into the int8 convolution itself);
- fp16: a model that already holds fp16 tensors or casts (the ``--quantize fp16`` conversion)
  passes through as it is; TensorRT runs each layer in the type the ONNX gives it;
- every node TensorRT's ONNX parser does not support is listed by name before any build
  (``SUPPORTED_OPS``, from onnx-tensorrt's docs/operators.md).

Then, where ``tensorrt`` imports and creates a builder (a CUDA GPU), the engine is built here with
``_tensorrt_build.build`` (profiles, timing cache, workspace, optimization level, layer report).
Otherwise saving writes the prepared ONNX and ``NAME.build.py`` (that same module, stdlib +
tensorrt only, with the settings filled in) and raises MissingDependencyError (exit 5) saying what
is missing, unless ``emit_onnx`` asks for the ONNX alone. See docs/targets/tensorrt.md.
"""

from __future__ import annotations

import os
import pprint
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from infoptc import ir
from infoptc.errors import CompileError, InvalidModelError, MissingDependencyError, UnsupportedOpError, UsageError
from infoptc.ir import write_atomic
from infoptc.progress import stage
from infoptc.targets import Target, register_target
from infoptc.verify import tensor_specs

from . import _tensorrt_build
from .onnx import OnnxArtifact

# ONNX ops with "Y" in onnx-tensorrt docs/operators.md (TensorRT 10.x; commit 96e7811, the 10.1 GA
# release, which supports opsets 9 to 20). Ops of other domains need a TensorRT plugin.
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample
Where Xor
""".split())
MAX_OPSET = 20
MIN_TENSORRT = 10  # strongly typed networks

# What --quantize int8 means for this target (the quantizer's options; the user's flags win):
# all 8 bits of the weights (no AVX2 saturation to avoid), no CPU speed check, no int8 embedding
# tables (TensorRT takes int8 only through Q/DQ).
QUANTIZE_DEFAULTS = {"int8": {"isa": "generic", "speed-check": False, "embeddings": False}}

OPTIONS = {
    "profiles": "optimization profile per input: {name: (min, opt, max)} shapes",
    "emit_onnx": "stop at the prepared ONNX and its build script (exit 0 without TensorRT)",
    "timing_cache": "timing cache file, read before and written after each build",
    "workspace_mib": "workspace memory limit in MiB (0: TensorRT's default)",
    "optimization_level": "TensorRT builder optimization level 0..5 (default 3)",
}


# ----------------------------------------------------------------------------- profiles


def split_profiles(specs: Sequence[str]) -> tuple[list[str], dict[str, tuple]]:
    """``--input-shape`` values for this target: ``NAME:MIN,OPT,MAX`` (exactly three shapes, e.g.
    ``x:1x3x224x224,8x3x224x224,32x3x224x224``) is an optimization profile; any other value is a
    shape to bind, returned as given."""
    shapes, profiles = [], {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        parts = dims.split(",")
        if not sep or not name or len(parts) != 3:
            shapes.append(spec)
            continue
        try:
            profiles[name] = tuple(tuple(int(d) for d in p.split("x")) for p in parts)
        except ValueError:
            raise UsageError(f"bad --input-shape {spec!r}; expected NAME:MIN,OPT,MAX, "
                             "e.g. x:1x3x224x224,8x3x224x224,32x3x224x224") from None
    return shapes, profiles


def check_profiles(model: onnx.ModelProto, profiles: dict[str, tuple]) -> dict[str, list[list[int]]]:
    """The profiles checked against the model's inputs: every input with a symbolic dim has one,
    ranks match, fixed dims agree, and min <= opt <= max. Returns them as lists (for the script)."""
    specs = {s.name: s for s in tensor_specs(model, "input")}
    for name in profiles:
        if name not in specs:
            raise UsageError(f"profile for {name!r}, which is not a model input (inputs: {', '.join(specs)})")
    missing = [n for n, s in specs.items() if s.shape is None or any(not isinstance(d, int) for d in s.shape)
               if n not in profiles]
    if missing:
        raise UsageError(f"input(s) {', '.join(missing)} have dynamic dimensions: give a TensorRT optimization "
                         "profile --input-shape NAME:MIN,OPT,MAX (e.g. x:1x3x224x224,8x3x224x224,32x3x224x224) "
                         "or bind a shape with --input-shape NAME:1x3x224x224")
    out = {}
    for name, (lo, opt, hi) in sorted(profiles.items()):
        dims = specs[name].shape
        if not (len(lo) == len(opt) == len(hi) == len(dims)):
            raise UsageError(f"profile {name}: the model's input has rank {len(dims)}; give three shapes of that rank")
        for axis, (d, a, b, c) in enumerate(zip(dims, lo, opt, hi)):
            if not 0 < a <= b <= c:
                raise UsageError(f"profile {name}: dimension {axis} needs 0 < min <= opt <= max, got {a}, {b}, {c}")
            if isinstance(d, int) and d > 0 and not a == b == c == d:
                raise UsageError(f"profile {name}: dimension {axis} is fixed to {d} by the model")
        out[name] = [list(lo), list(opt), list(hi)]
    return out


# ----------------------------------------------------------------------------- preparing the ONNX


def make_symmetric(graph: gs.Graph) -> dict[str, int]:
    """Rewrite the graph's Q/DQ as TensorRT's explicit quantization takes them (see the module
    docstring). Returns counters."""
    counters = {"qdq_symmetric": 0, "relu_restored": 0, "bias_fp32": 0}
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        scale, zero = _const(q, 1), _const(q, 2)
        if scale is None or (len(q.inputs) > 2 and zero is None):
            raise CompileError(f"QuantizeLinear {q.name}: scale and zero point must be constants for TensorRT")
        zdtype = np.dtype(q.inputs[2].dtype) if len(q.inputs) > 2 else np.dtype(np.uint8)
        zp = zero.astype(np.float64) if zero is not None else np.zeros_like(scale, dtype=np.float64)
        if zdtype == np.int8 and not zp.any():
            continue
        if zdtype not in (np.dtype(np.uint8), np.dtype(np.int8)):
            raise CompileError(f"QuantizeLinear {q.name}: {zdtype} quantization; TensorRT takes int8 (or fp8/int4)")
        qmin, qmax = (0, 255) if zdtype == np.uint8 else (-128, 127)
        lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
        bound = np.maximum(np.abs(lo), np.abs(hi))
        new_scale = np.where(bound > 0, bound / 127, 1.0).astype(scale.dtype).reshape(scale.shape)  # fp16 stays fp16
        s = gs.Constant(f"{q.name}_scale_sym", new_scale)
        z = gs.Constant(f"{q.name}_zero_point_sym", np.zeros(scale.shape, dtype=np.int8))
        if zdtype == np.uint8 and not zp.any():  # [0, hi]: the Q clipped negatives; Relu keeps that
            x = q.inputs[0]
            clipped = gs.Variable(f"{q.name}_relu_out", dtype=x.dtype, shape=x.shape)
            graph.nodes.append(gs.Node("Relu", f"{q.name}_relu", inputs=[x], outputs=[clipped]))
            q.inputs[0] = clipped
            counters["relu_restored"] += 1
        _set_qparams(q, s, z)
        out = q.outputs[0]
        out.dtype = np.int8
        for dq in list(out.outputs):
            if dq.op == "DequantizeLinear":
                _set_qparams(dq, s, z)
        counters["qdq_symmetric"] += 1
    for dq in [n for n in graph.nodes if n.op == "DequantizeLinear"]:
        x = dq.inputs[0]
        if isinstance(x, gs.Constant) and np.dtype(x.dtype) == np.int32:  # a bias: back to fp32
            scale, zero = _const(dq, 1), _const(dq, 2)
            values = (np.asarray(x.values, dtype=np.float64) - (0 if zero is None else zero)) * scale
            out = dq.outputs[0]
            const = gs.Constant(f"{out.name}_fp32", values.astype(scale.dtype))  # the scale's float type
            for consumer in list(out.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[i] = const
            dq.outputs.clear()
            dq.inputs.clear()
            counters["bias_fp32"] += 1
    graph.cleanup().toposort()
    return counters


def _set_qparams(node: gs.Node, scale: gs.Constant, zero: gs.Constant) -> None:
    node.inputs[1] = scale
    if len(node.inputs) > 2:
        node.inputs[2] = zero
    else:
        node.inputs.append(zero)


def _const(node: gs.Node, index: int) -> np.ndarray | None:
    if len(node.inputs) <= index or not isinstance(node.inputs[index], gs.Constant):
        return None
    return np.asarray(node.inputs[index].values)


def qdq_problems(model: onnx.ModelProto) -> list[str]:
    """Q/DQ TensorRT would refuse: a zero point that is not a constant int8 0, a scale that is not
    a positive constant, an int8 constant read by anything but a DequantizeLinear."""
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    problems = []
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            scale = consts.get(n.input[1])
            if zp is None or zp.dtype != np.int8 or zp.any():
                problems.append(f"{n.name} ({n.op_type}): zero point must be a constant int8 0")
            if scale is None or not (scale > 0).all():
                problems.append(f"{n.name} ({n.op_type}): scale must be a positive constant")
        for name in n.input:
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and name in consts \
                    and consts[name].dtype in (np.int8, np.uint8):
                problems.append(f"{n.name} ({n.op_type}): reads int8 tensor {name} outside Q/DQ")
    return problems


def unsupported_nodes(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(node name, op, why) for every node TensorRT's ONNX parser cannot take, subgraphs included."""
    found = []
    for graph in ir.iter_graphs(model.graph):
        for n in graph.node:
            if n.domain not in ("", "ai.onnx"):
                found.append((n.name, f"{n.domain}.{n.op_type}", "a custom-domain op needs a TensorRT plugin"))
            elif n.op_type not in SUPPORTED_OPS:
                found.append((n.name, n.op_type, "not supported by TensorRT's ONNX parser"))
    return found


def precision(model: onnx.ModelProto) -> str:
    """What a strongly typed network built from ``model`` computes in: int8, fp16, mixed or fp32."""
    ops = {n.op_type for g in ir.iter_graphs(model.graph) for n in g.node}
    fp16 = (any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
            or any(n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
                   for n in model.graph.node)
            or any(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in model.graph.input))
    int8 = "QuantizeLinear" in ops
    return "int8+fp16" if int8 and fp16 else "int8" if int8 else "fp16" if fp16 else "fp32"


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The model as TensorRT's strongly typed parser takes it, and what was done; raises
    UnsupportedOpError listing the nodes it cannot parse."""
    graph = ir.to_graph(model)
    counters = make_symmetric(graph) if any(n.op == "QuantizeLinear" for n in graph.nodes) else {}
    prepared = ir.from_graph(graph, model)
    bad = unsupported_nodes(prepared)
    if bad:
        shown = "; ".join(f"{name or '<unnamed>'} ({op}): {why}" for name, op, why in bad[:20])
        more = f"; and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise UnsupportedOpError(f"{len(bad)} node(s) TensorRT cannot take: {shown}{more}")
    problems = qdq_problems(prepared)
    if problems:
        raise CompileError("Q/DQ TensorRT cannot take: " + "; ".join(problems[:10]))
    opset = next((o.version for o in prepared.opset_import if o.domain in ("", "ai.onnx")), 0)
    facts = {"precision": precision(prepared), "opset": opset, **counters}
    if opset > MAX_OPSET:
        facts["warning"] = f"opset {opset}: onnx-tensorrt's operator table covers opsets 9 to {MAX_OPSET}"
    return prepared, facts


# ----------------------------------------------------------------------------- engine


def engine_unavailable() -> str | None:
    """Why no engine can be built on this machine (None: TensorRT 10+ and a GPU are there)."""
    try:
        import tensorrt as trt
    except ImportError:
        return "the tensorrt package is not installed (pip install tensorrt)"
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
    if major < MIN_TENSORRT:
        return f"TensorRT {trt.__version__} found; strongly typed networks need {MIN_TENSORRT} or newer"
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception:  # noqa: BLE001 - TensorRT raises on CUDA initialization failures
        builder = None
    if builder is None:
        return "TensorRT found no usable CUDA GPU"
    return None


def build_script(settings: dict) -> str:
    """The engine-building script (``_tensorrt_build.py``) with ``settings`` filled in."""
    source = Path(_tensorrt_build.__file__).read_text()
    text = "SETTINGS = " + pprint.pformat(settings, sort_dicts=True, width=100) + "\n"
    script, count = re.subn(r"^SETTINGS = \{.*?^\}\n", lambda _: text, source, count=1, flags=re.S | re.M)
    if count != 1:
        raise CompileError("the TensorRT build script template has no SETTINGS block")
    return script


def _paths(path: Path) -> dict[str, Path]:
    onnx_path = path if path.suffix == ".onnx" else path.with_suffix(".onnx")
    return {"onnx": onnx_path, "plan": path.with_suffix(".plan"), "script": path.with_suffix(".build.py"),
            "layers": path.with_suffix(".layers.json")}


class TensorRTArtifact(OnnxArtifact):
    """The prepared ONNX (``model``) and, once built, the engine (``plan``, bytes). ``run``
    executes the engine (needs TensorRT and PyTorch's CUDA tensors) or, with no engine, the
    prepared ONNX on ONNX Runtime: what the engine will compute, up to TensorRT's kernels."""

    target = "tensorrt"

    def __init__(self, model: onnx.ModelProto | None, settings: dict, facts: dict, plan: bytes | None = None,
                 layer_report: bytes | None = None, missing: str | None = None):
        super().__init__(model)
        self.settings = settings
        self.facts = facts
        self.plan = plan
        self.layer_report = layer_report
        self.missing = missing
        self._engine = None

    def save(self, path: str | os.PathLike) -> list[Path]:
        paths = _paths(Path(path))
        written = ir.save_model(self.model, paths["onnx"]) if self.model is not None else []
        folder = paths["onnx"].parent.resolve()
        cache = self.settings.get("timing_cache") or ""
        settings = {"onnx": paths["onnx"].name, "plan": paths["plan"].name, "layer_report": paths["layers"].name,
                    "profiles": self.settings.get("profiles", {}),
                    "timing_cache": os.path.relpath(Path(cache).resolve(), folder) if cache else "",
                    "workspace_mib": int(self.settings.get("workspace_mib", 0)),
                    "optimization_level": int(self.settings.get("optimization_level", 3))}
        write_atomic(paths["script"], build_script(settings).encode())
        written.append(paths["script"])
        if self.plan is not None:
            write_atomic(paths["plan"], self.plan)
            written.append(paths["plan"])
            if self.layer_report:
                write_atomic(paths["layers"], self.layer_report)
                written.append(paths["layers"])
            return written
        if self.settings.get("emit_onnx"):
            return written
        raise MissingDependencyError(
            f"no TensorRT engine built: {self.missing}. Wrote the prepared ONNX {paths['onnx']} and "
            f"{paths['script']}: run `python {paths['script']}` on a machine with TensorRT {MIN_TENSORRT}+ and an "
            "NVIDIA GPU, or rerun this command there (--emit-onnx stops at the ONNX with exit 0)")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.plan is None:
            return super().run(inputs)
        if self._engine is None:
            self._engine = _EngineRunner(self.plan)
        return self._engine.run(inputs)

    def describe(self) -> dict:
        engine = "engine built" if self.plan is not None else f"no engine ({self.missing})"
        return {"target": "tensorrt", "target_text": f"tensorrt, {self.facts.get('precision')} strongly typed; {engine}",
                **self.facts, "engine": self.plan is not None, "missing": self.missing,
                "settings": {k: v for k, v in self.settings.items() if k != "emit_onnx"}}


class _EngineRunner:
    """Runs a serialized engine with PyTorch's CUDA tensors for the buffers (TensorRT 10 API)."""

    def __init__(self, plan: bytes):
        try:
            import tensorrt as trt
            import torch
        except ImportError as e:
            raise MissingDependencyError(f"running a TensorRT engine needs tensorrt and torch with CUDA ({e})") from None
        if not torch.cuda.is_available():
            raise MissingDependencyError("running a TensorRT engine needs an NVIDIA GPU")
        self.trt, self.torch = trt, torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise InvalidModelError("TensorRT cannot deserialize this engine (another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, torch = self.trt, self.torch
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in self.names}
        keep, outputs = [], {}
        for name in (n for n in self.names if is_input[n]):
            t = torch.from_numpy(np.ascontiguousarray(inputs[name])).cuda()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        for name in (n for n in self.names if not is_input[n]):
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            t = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            outputs[name] = t
            self.context.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise CompileError("TensorRT failed to run the engine")
        stream.synchronize()
        return {n: t.cpu().numpy() for n, t in outputs.items()}


@register_target
class TensorRTTarget(Target):
    name = "tensorrt"
    summary = "TensorRT 10+ engine (.plan) from a prepared strongly typed ONNX; the ONNX + a build script without a GPU"
    suffix = ".plan"
    quantize_defaults = QUANTIZE_DEFAULTS

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise UsageError(f"unknown option(s) for target tensorrt: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(OPTIONS))})")
        level = int(options.get("optimization_level", 3))
        if not 0 <= level <= 5:
            raise UsageError("the TensorRT builder optimization level is 0 to 5")
        if int(options.get("workspace_mib", 0)) < 0:
            raise UsageError("the TensorRT workspace limit must be positive (MiB)")
        super().__init__(**options)

    def lower(self, model: onnx.ModelProto) -> TensorRTArtifact:
        with stage("preparing the ONNX for TensorRT"):
            prepared, facts = prepare(model)
        settings = {"profiles": check_profiles(prepared, self.options.get("profiles") or {}),
                    "timing_cache": str(self.options.get("timing_cache") or ""),
                    "workspace_mib": int(self.options.get("workspace_mib", 0)),
                    "optimization_level": int(self.options.get("optimization_level", 3)),
                    "emit_onnx": bool(self.options.get("emit_onnx"))}
        missing = engine_unavailable()
        if missing is not None:
            return TensorRTArtifact(prepared, settings, facts, missing=missing)
        with stage("building the TensorRT engine"), tempfile.TemporaryDirectory(prefix="infoptc-trt-") as tmp:
            onnx_path, plan_path, layers = Path(tmp, "model.onnx"), Path(tmp, "model.plan"), Path(tmp, "layers.json")
            ir.save_model(prepared, onnx_path)
            try:
                summary = _tensorrt_build.build(onnx_path, plan_path, settings["profiles"], settings["timing_cache"],
                                                settings["workspace_mib"], settings["optimization_level"], layers)
            except RuntimeError as e:
                raise CompileError(str(e)) from None
            facts["build"] = {k: v for k, v in summary.items() if k not in ("plan", "layer_report")}
            return TensorRTArtifact(prepared, settings, facts, plan_path.read_bytes(),
                                    layers.read_bytes() if layers.exists() else None)

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return path.suffix == ".plan"

    @classmethod
    def load(cls, path: Path) -> TensorRTArtifact:
        beside = _paths(path)["onnx"]
        model = ir.load_model(beside) if beside.exists() else None
        if model is None:
            raise InvalidModelError(f"{path}: the prepared ONNX {beside} (its inputs and outputs) is not beside it")
        return TensorRTArtifact(model, read_settings(_paths(path)["script"]), {"precision": precision(model)},
                                plan=path.read_bytes())


def read_settings(script: Path) -> dict:
    """The SETTINGS a written build script holds (profiles, ...), read without running it; {} when
    there is no script."""
    import ast

    if not script.is_file():
        return {}
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["SETTINGS"]:
            return ast.literal_eval(node.value)
    return {}
