"""Built-in targets. Each module registers its target on import."""

from . import onnx  # noqa: F401
