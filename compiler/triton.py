"""Triton Inference Server model repositories: ``export_triton`` writes

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.onnx     (onnxruntime backend)   or   REPO/NAME/1/model.plan   (tensorrt)

infoptc writes no server: Triton serves the folder as it is. The config states the platform,
``max_batch_size`` and the dims without the batch when the model really has a batch dimension
(symbolic, or a fixed 1 that the make-batch-dynamic pass can make symbolic, and batch 2 computing
what two batch-1 runs compute), else ``max_batch_size: 0`` and the full dims, with the reason; data
types; instance groups; the ONNX Runtime backend's parameters; ``dynamic_batching`` with preferred
batch sizes and a queue delay chosen from a measured batch sweep when a latency budget is given
(``bench.choose_batching``); the response cache when asked.

The repository is written into a temporary folder beside its place and renamed there, so that
a failure leaves nothing half written; an existing model folder is refused unless ``force``.
Configs are checked against Triton's ModelConfig protobuf where ``tritonclient`` is installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import onnx

from . import ir
from .errors import InvalidModelError, UsageError
from .targets import TensorSpec

log = logging.getLogger("infoptc")

BACKENDS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64", "bool": "TYPE_BOOL",
                "bfloat16": "TYPE_BF16", "str": "TYPE_STRING", "object": "TYPE_STRING"}
# The ONNX Runtime backend's `optimization { graph { level } }` is not ORT's GraphOptimizationLevel:
# absent (or 0) = all optimizations, -1 = basic only, 1 = basic + extended, 2 = all DISABLED.
ORT_GRAPH_LEVELS = {"all": None, "basic": -1, "extended": 1, "disabled": 2}
DEFAULT_MAX_BATCH = 8


@dataclass
class TritonExport:
    """What ``export_triton`` wrote and decided."""

    folder: Path
    config: str
    max_batch_size: int
    batch_note: str
    files: list[Path] = field(default_factory=list)
    batching: dict | None = None
    sweep: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"folder": str(self.folder), "files": [str(f) for f in self.files], "max_batch_size": self.max_batch_size,
                "batch": self.batch_note, "dynamic_batching": self.batching, "sweep": self.sweep}


# ----------------------------------------------------------------------------- the batch dimension


def batch_dimension(model: onnx.ModelProto, rewrite: bool = True) -> tuple[onnx.ModelProto, bool, str]:
    """(the model to serve, whether it batches, why): a symbolic leading dim on every input and
    output that computes batch 2 as two batch-1 runs; or (``rewrite``) a fixed 1 that
    make-batch-dynamic turns into one (the returned model is then the rewritten one)."""
    from infoptc.passes.shape.make_batch_dynamic import batch_mismatch, make_batch_dynamic

    inputs = _specs(model, "input")
    outputs = _specs(model, "output")
    leads = [s.shape[0] if s.shape else None for s in inputs + outputs]
    if leads and all(isinstance(d, str) for d in leads) and len({s.shape[0] for s in inputs}) == 1:
        mismatch = batch_mismatch(model, model, 2)
        if mismatch:
            return model, False, f"the leading dimension is not a batch: {mismatch}"
        return model, True, f"inputs and outputs lead with the symbolic dimension {inputs[0].shape[0]!r}"
    if not rewrite:
        return model, False, "no batch dimension: the engine's inputs do not lead with a symbolic dimension"
    dynamic, why, _ = make_batch_dynamic(model)
    if dynamic is None:
        return model, False, f"no batch dimension: {why}"
    return dynamic, True, f"the fixed batch of 1 made symbolic ({why})"


def _specs(model: onnx.ModelProto, kind: str) -> list[TensorSpec]:
    from .verify import tensor_specs

    return tensor_specs(model, kind)


# ----------------------------------------------------------------------------- config text


def _quote(text: str) -> str:
    return json.dumps(text)  # a protobuf text-format string literal for the names a model has


def _tensor_block(specs: Sequence[TensorSpec], batched: bool) -> list[str]:
    lines = []
    for i, s in enumerate(specs):
        if s.dtype not in TRITON_TYPES:
            raise InvalidModelError(f"{s.name}: Triton has no data type for {s.dtype}")
        if s.shape is None:
            raise InvalidModelError(f"{s.name}: unknown rank; Triton needs the dims (bind shapes with --input-shape)")
        dims = list(s.shape[1:] if batched else s.shape)
        text = ", ".join(str(d) if isinstance(d, int) and d > 0 else "-1" for d in dims)
        lines += ["  {", f"    name: {_quote(s.name)}", f"    data_type: {TRITON_TYPES[s.dtype]}",
                  f"    dims: [ {text} ]" if dims else "    dims: [ 1 ]",
                  *(["    reshape: { shape: [ ] }"] if not dims else []),
                  "  }" + ("," if i < len(specs) - 1 else "")]
    return lines


def config_text(name: str, backend: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                max_batch_size: int, *, instances: int = 1, kind: str = "cpu", batching: dict | None = None,
                threads: int | None = None, graph_level: str = "all", response_cache: bool = False) -> str:
    """The config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    platform, filename = BACKENDS[backend]
    batched = max_batch_size > 0
    lines = [f"name: {_quote(name)}", f"platform: {_quote(platform)}", f"max_batch_size: {max_batch_size}",
             f"default_model_filename: {_quote(filename)}",
             "input [", *_tensor_block(inputs, batched), "]", "output [", *_tensor_block(outputs, batched), "]",
             "instance_group [", "  {", f"    count: {instances}", f"    kind: KIND_{kind.upper()}", "  }", "]"]
    if batching is not None:
        lines.append("dynamic_batching {")
        if batching.get("preferred"):
            lines.append(f"  preferred_batch_size: [ {', '.join(map(str, batching['preferred']))} ]")
        if batching.get("max_queue_delay_us"):
            lines.append(f"  max_queue_delay_microseconds: {int(batching['max_queue_delay_us'])}")
        lines.append("}")
    if backend == "onnxruntime":
        level = ORT_GRAPH_LEVELS[graph_level]
        if level is not None:
            lines += ["optimization {", "  graph {", f"    level: {level}", "  }", "}"]
        if threads:
            for key, value in (("intra_op_thread_count", threads), ("inter_op_thread_count", 1)):
                lines += ["parameters {", f"  key: {_quote(key)}", "  value {", f"    string_value: {_quote(str(value))}",
                          "  }", "}"]
    if response_cache:
        lines += ["response_cache {", "  enable: true", "}"]
    return "\n".join(lines) + "\n"


def model_config_proto():
    """Triton's ModelConfig message class from tritonclient's generated module, loaded from its
    file (``tritonclient.grpc`` itself imports grpc); None where tritonclient is not installed."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0], "grpc", "model_config_pb2.py")
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("infoptc_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.ModelConfig


_PROTO = []


def parse_config(text: str):
    """The config parsed into Triton's ModelConfig (raises InvalidModelError when it does not parse);
    None where tritonclient is not installed."""
    if not _PROTO:
        _PROTO.append(model_config_proto())
    message_class = _PROTO[0]
    if message_class is None:
        return None
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, message_class())
    except text_format.ParseError as e:
        raise InvalidModelError(f"the generated config.pbtxt does not parse as Triton's ModelConfig: {e}") from None


# ----------------------------------------------------------------------------- export


def _check_name(name: str) -> None:
    if not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name in (".", ".."):
        raise UsageError(f"bad model name {name!r}: letters, digits, '_', '-' and '.' only")


def sweep_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch_size`` (which is included)."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


def export_triton(source: ir.ModelSource, repo: str | os.PathLike, name: str, *, backend: str = "onnxruntime",
                  max_batch_size: int | None = None, instances: int = 1, latency_budget_ms: float | None = None,
                  response_cache: bool = False, force: bool = False, threads: int | None = None,
                  graph_level: str = "all", kind: str | None = None, sweep_iterations: int = 20,
                  dims: dict[str, int] | None = None) -> TritonExport:
    """Write ``repo/name`` for Triton (see the module docstring). ``source``: an ONNX model (path or
    ModelProto), or for ``backend="tensorrt"`` a .plan from ``infoptc compile --target tensorrt``
    with its prepared .onnx beside it (which gives the inputs and outputs)."""
    _check_name(name)
    if backend not in BACKENDS:
        raise UsageError(f"unknown Triton backend {backend!r}; choose {' or '.join(BACKENDS)}")
    if graph_level not in ORT_GRAPH_LEVELS:
        raise UsageError(f"unknown graph level {graph_level!r}; choose one of {', '.join(ORT_GRAPH_LEVELS)}")
    if instances < 1 or (max_batch_size is not None and max_batch_size < 0) or (threads is not None and threads < 1):
        raise UsageError("--instances and --threads must be at least 1, --max-batch-size at least 0")
    repo = Path(repo)
    if not repo.parent.resolve().is_dir():
        raise UsageError(f"cannot write {repo}: folder {repo.parent} does not exist")
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"{repo} is not a folder")
    folder = repo / name
    if folder.exists() and not force:
        raise UsageError(f"{folder} exists; pass --force to replace it")
    model, payload, profile_max = _load(source, backend)
    model = ir.infer_shapes(model)
    batched, note = False, "max_batch_size 0 asked for"
    if max_batch_size != 0:
        # an engine's batch is what its profiles allow: no rewriting of the signature model then
        model, batched, note = batch_dimension(model, rewrite=payload is None)
    if batched and profile_max:
        if max_batch_size and max_batch_size > profile_max:
            raise UsageError(f"--max-batch-size {max_batch_size}: the engine's profiles allow at most {profile_max}")
        max_batch_size = max_batch_size or profile_max
    if batched:
        max_batch_size = max_batch_size or DEFAULT_MAX_BATCH
    else:
        if max_batch_size:
            log.warning("%s; exporting with max_batch_size 0 (Triton sends whole tensors)", note)
        max_batch_size = 0
    if backend == "onnxruntime":
        payload = None  # the (possibly batch-dynamic) model is what gets written
    batching, sweep = None, []
    if batched:
        batching = {}
        if latency_budget_ms is not None:
            from .bench import batch_sweep, choose_batching
            from .targets import get_target

            artifact = (get_target("onnx")(threads=threads).lower(model) if backend == "onnxruntime"
                        else _plan_artifact(source))
            rows = batch_sweep(artifact, sweep_sizes(max_batch_size), iterations=sweep_iterations, dims=dims)
            sweep = [r.as_dict() for r in rows]
            batching = choose_batching(rows, latency_budget_ms)
    elif latency_budget_ms is not None:
        log.warning("no dynamic batching without a batch dimension; --latency-budget-ms ignored")
    text = config_text(name, backend, _specs(model, "input"), _specs(model, "output"), max_batch_size,
                       instances=instances, kind=kind or ("gpu" if backend == "tensorrt" else "cpu"),
                       batching=batching, threads=threads, graph_level=graph_level, response_cache=response_cache)
    parse_config(text)
    files = _write_folder(folder, text, BACKENDS[backend][1], model if payload is None else payload, force)
    return TritonExport(folder, text, max_batch_size, note, files, batching, sweep)


def _load(source: ir.ModelSource, backend: str) -> tuple[onnx.ModelProto, bytes | None, int | None]:
    """(the ONNX model giving the signature, the engine's bytes for tensorrt, the largest batch its
    profiles allow where its build script says)."""
    if backend == "onnxruntime":
        if isinstance(source, (str, os.PathLike)) and Path(source).suffix == ".plan":
            raise UsageError(f"{source} is a TensorRT engine; export it with --backend tensorrt")
        return ir.load_model(source), None, None
    if not isinstance(source, (str, os.PathLike)) or Path(source).suffix != ".plan":
        raise UsageError("--backend tensorrt takes the .plan that `infoptc compile MODEL --target tensorrt` builds "
                         "(with its prepared .onnx beside it)")
    artifact = _plan_artifact(source)
    profiles = artifact.settings.get("profiles") or {}
    leads = [shapes[2][0] for shapes in profiles.values() if shapes and shapes[2]]
    return artifact.model, artifact.plan, min(leads) if leads else None


def _plan_artifact(source):
    from .targets import get_target

    return get_target("tensorrt").load(Path(source))


def _write_folder(folder: Path, config: str, filename: str, content, force: bool) -> list[Path]:
    """Write the model folder into a temporary sibling, then rename it into place (replacing the
    old one only once the new one is complete)."""
    folder.parent.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the model from a server running as another user
        (tmp / "1").mkdir()
        (tmp / "config.pbtxt").write_text(config)
        if isinstance(content, bytes):
            (tmp / "1" / filename).write_bytes(content)
        else:
            ir.save_model(content, tmp / "1" / filename)
        written = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
        old = None
        if folder.exists():
            if not force:
                raise UsageError(f"{folder} exists; pass --force to replace it")
            old = folder.with_name(f".{folder.name}.old.{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [folder / p for p in written]
