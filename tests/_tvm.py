"""The llvm target's Relax module for a model, before it is built: what the TVM tests inspect."""

from __future__ import annotations


def lowered(model, mcpu: str = "znver4", *, schedules: str = "rules", **options):
    """``model`` (a ModelProto) through the llvm target's Relax passes and, with ``schedules``
    "rules", its default schedules, for a 2-core CPU of ``mcpu`` (znver4: 16 lanes, haswell: 8)."""
    import tvm
    from infoptc.backends.tvm import build as _tvm_build, prepare as _tvm_prepare

    prepared = _tvm_prepare.prepare(model)
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    mod, _ = _tvm_build.optimize(_tvm_prepare.import_onnx(prepared.model), target, cpu_layout=True,
                                 schedules=schedules, **options)
    return mod


def kernels_by_name(mod) -> dict:
    """The module's kernels (TIR functions) by name."""
    from tvm import tirx

    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
