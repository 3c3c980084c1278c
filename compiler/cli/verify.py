"""`infoptc verify REFERENCE CANDIDATE`: do two models or artifacts compute the same thing?
The comparison is library code (infoptc.compare); this module parses flags and prints."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ..bench import parse_dims
from ..compare import OutputReport, check_compatible, compare, generated_samples, load_samples, parse_tolerances
from ..errors import UsageError, VerificationError
from ..targets import load
from .output import emit_json, err, out, status

EXIT_FAILED = VerificationError.exit_code


def add_parser(subparsers, common) -> dict:
    p = subparsers.add_parser(
        "verify", help="compare two models/artifacts output by output on the same inputs",
        description="Run REFERENCE and CANDIDATE (.onnx models via ONNX Runtime, or any artifact) on the "
                    "same inputs and compare every output: max abs/rel error, and the smallest atol "
                    "(at the rtol in force) that would pass. Exit 3 when an output is out of tolerance.",
        epilog="Default tolerances by dtype: float32 atol 1e-5 rtol 1e-4, float16 1e-3/1e-3, bfloat16 "
               "1e-2/1e-2, float64 1e-10/1e-8; integer and bool outputs must match exactly. An element "
               "passes when |cand - ref| <= atol + rtol * |ref|; NaNs must sit at the same places.")
    p.add_argument("reference", metavar="REFERENCE")
    p.add_argument("candidate", metavar="CANDIDATE")
    p.add_argument("--samples", type=int, default=3, metavar="N", help="generated input sets (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first generated set (then seed+1, ...)")
    p.add_argument("--inputs", metavar="DATA.npz|FOLDER", help="inputs by name: an .npz, or a folder of them")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                   help="bind a symbolic dim of generated inputs, e.g. seq=128 (default 2)")
    p.add_argument("--atol", action="append", default=[], metavar="X|OUTPUT:X", help="absolute tolerance (repeatable)")
    p.add_argument("--rtol", action="append", default=[], metavar="X|OUTPUT:X", help="relative tolerance (repeatable)")
    p.add_argument("--min-sqnr", type=float, default=None, metavar="DB",
                   help="judge float outputs by SQNR instead (a quantized candidate: the default, 10 dB, "
                        "when it records infoptc's quantization and no tolerance is given)")
    common(p)
    return {"verify": cmd_verify}


def cmd_verify(args: argparse.Namespace) -> int:
    if args.samples < 1:
        raise UsageError("--samples must be at least 1")
    parse_tolerances(args.atol, "--atol")  # bad numbers fail before any model loads
    parse_tolerances(args.rtol, "--rtol")
    dims = parse_dims(args.dim)
    reference = load(args.reference)
    candidate = load(args.candidate)
    check_compatible(reference, candidate)
    if args.inputs:
        samples = iter(load_samples(args.inputs))
        source = args.inputs
    else:
        gen = reference if getattr(reference, "model", None) is not None else candidate
        samples = generated_samples(gen, args.samples, args.seed, dims)
        source = f"generated ({args.samples} sets, seeds {args.seed}..{args.seed + args.samples - 1})"
    with status(args, "verifying"):
        reports = compare(reference, candidate, samples, args.atol, args.rtol, args.min_sqnr)
    passed = all(r.passed for r in reports)
    if args.json:
        emit_json({"reference": args.reference, "candidate": args.candidate, "inputs": source,
                   "outputs": [r.as_dict() for r in reports], "passed": passed})
        return 0 if passed else EXIT_FAILED
    out.print(table(reports, args.reference, args.candidate, source))
    if passed:
        out.print("PASSED", markup=False)
        return 0
    bad = [r for r in reports if not r.passed]
    out.print(f"FAILED: {len(bad)} of {len(reports)} output(s) out of tolerance", markup=False)
    for r in bad:
        err.print(f"infoptc: {r.first_failure}", markup=False)
    return EXIT_FAILED


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if x == float("inf") else "0" if x == 0 else f"{x:.3g}"


def table(reports: Sequence[OutputReport], reference: str, candidate: str, source: str):
    from rich.table import Table

    t = Table(title=f"{Path(reference).name} vs {Path(candidate).name}; inputs: {source}", title_justify="left")
    lossy = any(r.lossy for r in reports)
    cols = ("output", "dtype", "max abs err", "max rel err", "atol", "rtol", "min atol to pass") + (
        ("SQNR dB",) if lossy else ()) + ("result",)
    for col in cols:
        t.add_column(col, justify="left" if col in ("output", "dtype", "result") else "right")
    for r in reports:
        exact = r.dtype_kind != "f"
        t.add_row(r.name, r.dtype, _num(r.max_abs), _num(r.max_rel),
                  "exact" if exact else _num(r.tolerance.atol), "" if exact else _num(r.tolerance.rtol),
                  _num(r.min_atol), *((_num(r.sqnr_db),) if lossy else ()), f"ok: {r.criterion}" if r.passed
                  else f"FAILED: {r.criterion} in {len(r.failed_samples)} sample(s)",
                  style=None if r.passed else "bold red")
    return t
