"""infoptc: an ONNX graph compiler and optimization-pass framework.

    import infoptc
    model = infoptc.optimize("model.onnx", opt_level=2)          # -> onnx.ModelProto
    art = infoptc.compile("model.onnx", target="onnx")            # -> Artifact
    art.save("out.onnx"); art.run({"x": x})
"""

from .driver import compile, optimize
from .errors import (
    CompileError,
    InfoptcError,
    InvalidModelError,
    MissingDependencyError,
    UnsupportedOpError,
    UsageError,
    VerificationError,
)
from .pass_manager import Contract, Fixpoint, Instrument, Option, Pass, PassContext, PassManager, PassResult, register_pass
from .targets import Artifact, Target, load, register_target

__version__ = "0.1.0"

__all__ = [
    "Artifact", "CompileError", "Contract", "Fixpoint", "InfoptcError", "Instrument", "InvalidModelError",
    "MissingDependencyError", "Option", "Pass", "PassContext", "PassManager", "PassResult", "Target",
    "UnsupportedOpError", "UsageError", "VerificationError", "compile", "load", "optimize", "register_pass",
    "register_target", "__version__",
]
