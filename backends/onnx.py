"""The default target: the optimized model as .onnx, executed by ONNX Runtime.

Works on any machine with no tuning. ONNX Runtime's CUDA provider is used where it is
installed and a GPU is present, its CPU provider otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from infoptc import ir
from infoptc.targets import Artifact, Target, TensorSpec, register_target
from infoptc.verify import OrtRunner, tensor_specs


class OnnxArtifact(Artifact):
    target = "onnx"

    def __init__(self, model: onnx.ModelProto, threads: int | None = None, providers: list[str] | None = None):
        self.model = model
        self.threads = threads
        self.providers = providers
        self._runner: OrtRunner | None = None

    def save(self, path: str | os.PathLike) -> list[Path]:
        return ir.save_model(self.model, path)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._runner is None:
            self._runner = OrtRunner(self.model, threads=self.threads, providers=self.providers)
        return self._runner.run(inputs)

    @property
    def inputs(self) -> list[TensorSpec]:
        return tensor_specs(self.model, "input")

    @property
    def outputs(self) -> list[TensorSpec]:
        return tensor_specs(self.model, "output")

    def size_bytes(self) -> int:
        return ir.model_bytes(self.model)

    def describe(self) -> dict:
        import onnxruntime

        return {"target": "onnx", "runtime": f"onnxruntime {onnxruntime.__version__}",
                "providers": self.providers or OrtRunner.default_providers()}


@register_target
class OnnxTarget(Target):
    name = "onnx"
    summary = "optimized .onnx model run by ONNX Runtime (CPU, or CUDA where present)"
    suffix = ".onnx"

    def lower(self, model: onnx.ModelProto) -> OnnxArtifact:
        return OnnxArtifact(model, threads=self.options.get("threads"))

    @classmethod
    def can_load(cls, path: Path) -> bool:
        if path.suffix == ".onnx":
            return True
        with open(path, "rb") as f:
            head = f.read(2)
        return head[:1] == b"\x08"  # ModelProto starts with field 1 (ir_version), varint

    @classmethod
    def load(cls, path: Path) -> OnnxArtifact:
        return OnnxArtifact(ir.load_model(path))
