"""`infoptc run ARTIFACT`: run a model or artifact on inputs (an .npz, or generated ones) and
show (or save) its outputs."""

from __future__ import annotations

import argparse

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
    import numpy as np

    from ..targets import load
    from ..verify import random_inputs

    artifact = load(args.artifact)
    if args.inputs:
        feeds = load_npz(args.inputs)
    else:
        from ..bench import parse_dims

        feeds = random_inputs(getattr(artifact, "model", None) or _model_from_specs(artifact.inputs), seed=args.seed,
                              dims=parse_dims(args.dim))
    outputs = artifact.run(feeds)
    if args.save_outputs:
        save_npz(args.save_outputs, outputs)
    rows = [{"name": k, "dtype": v.dtype.name, "shape": list(v.shape),
             "mean": float(np.mean(v)) if v.size and v.dtype.kind in "fiub" else None} for k, v in outputs.items()]
    if args.json:
        emit_json(rows)
        return 0
    table = Table(title="outputs", title_justify="left")
    for col in ("output", "dtype", "shape", "mean"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["dtype"], "x".join(map(str, r["shape"])) or "scalar",
                      "-" if r["mean"] is None else f"{r['mean']:.6g}")
    out.print(table)
    return 0


def _model_from_specs(specs) -> "onnx.ModelProto":
    """A stand-in model declaring only the artifact's inputs, for input generation."""
    import numpy as np
    import onnx

    inputs = [onnx.helper.make_tensor_value_info(s.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(s.dtype)),
                                                 list(s.shape) if s.shape is not None else None) for s in specs]
    return onnx.helper.make_model(onnx.helper.make_graph([], "inputs", inputs, []))
