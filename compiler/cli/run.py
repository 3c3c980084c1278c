"""`infoptc run ARTIFACT`: run a model or artifact on inputs (an .npz, or generated ones) and
show (or save) its outputs."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from ..files import load_npz, save_npz
from .output import emit_json, out


def add_parser(subparsers, common) -> dict:
    r = subparsers.add_parser("run", help="run a model or artifact and print (or save) its outputs")
    r.add_argument("artifact")
    r.add_argument("--inputs", metavar="DATA.npz", help="inputs by name (default: generated from --seed)")
    r.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                   help="value of a symbolic dim for generated inputs, e.g. seq=128 (default 2; repeatable)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--save-outputs", metavar="OUT.npz", help="write the outputs to an .npz file")
    common(r)
    return {"run": cmd_run}


def cmd_run(args: argparse.Namespace) -> int:
    from ..targets import load
    from ..verify import random_inputs

    artifact = load(args.artifact)
    if args.inputs:
        feeds = load_npz(args.inputs)
        source = args.inputs
    else:
        from ..bench import parse_dims

        feeds = random_inputs(getattr(artifact, "model", None) or _model_from_specs(artifact.inputs), seed=args.seed,
                              dims=parse_dims(args.dim))
        source = f"generated (seed {args.seed})"
    outputs = artifact.run(feeds)
    if args.save_outputs:
        save_npz(args.save_outputs, outputs)
    rows = [{"name": k, "dtype": v.dtype.name, "shape": list(v.shape), **_statistics(v)} for k, v in outputs.items()]
    if args.json:
        emit_json(rows)
        return 0
    shapes = "; ".join(f"{k} {_shape_text(v.shape)} {v.dtype.name}" for k, v in feeds.items())
    table = Table(title=f"outputs of {Path(args.artifact).name}; inputs: {source}: {shapes}", title_justify="left")
    for col in ("output", "dtype", "shape", "min", "mean", "max", "std"):
        table.add_column(col, justify="left" if col in ("output", "dtype", "shape") else "right")
    for r in rows:
        table.add_row(escape(r["name"]), r["dtype"], _shape_text(r["shape"]),
                      *["-" if r[k] is None else f"{r[k]:.6g}" for k in ("min", "mean", "max", "std")])
    out.print(table)
    return 0


def _statistics(value) -> dict:
    """min, mean, max and std of a numeric output (None for others and empty ones)."""
    import numpy as np

    if not value.size or value.dtype.kind not in "fiub":
        return dict.fromkeys(("min", "mean", "max", "std"))
    v = value.astype(np.float64)
    return {"min": float(np.min(v)), "mean": float(np.mean(v)), "max": float(np.max(v)), "std": float(np.std(v))}


def _shape_text(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _model_from_specs(specs) -> "onnx.ModelProto":
    """A stand-in model declaring only the artifact's inputs, for input generation."""
    import numpy as np
    import onnx

    inputs = [onnx.helper.make_tensor_value_info(s.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(s.dtype)),
                                                 list(s.shape) if s.shape is not None else None) for s in specs]
    return onnx.helper.make_model(onnx.helper.make_graph([], "inputs", inputs, []))
