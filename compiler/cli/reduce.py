"""`infoptc reduce MODEL` (and `infoptc compile ... --bisect`): find the first pass application
that breaks a model. The search is library code (infoptc.bisect)."""

from __future__ import annotations

import argparse
from typing import Any

from .. import config
from ..bisect import Probe, bisect
from ..driver import parse_input_shapes
from ..errors import UsageError
from .output import emit_json, err, out

EXIT_FOUND = 3  # the pipeline breaks the model: the same code as a failed verification


def add_parser(subparsers, common) -> dict:
    p = subparsers.add_parser(
        "reduce", help="find the first pass application that breaks a model (bisection)",
        description="Bisect over --opt-bisect-limit: compile with the first N pass applications, compare "
                    "with the original under the loosest contract of the passes that ran, and narrow N down "
                    "to the first application that breaks equivalence. Exit 3 when one is found, 0 when the "
                    "whole pipeline keeps the model equivalent.")
    p.add_argument("model", help="input .onnx model")
    p.add_argument("-O", dest="opt_level", default=None, choices=["0", "1", "2", "3", "s"], metavar="LEVEL",
                   help="the pipeline of this level (default 2)")
    p.add_argument("--passes", default=None, metavar="PIPELINE", help="an explicit pipeline instead of -O")
    p.add_argument("--target", default=None, help="backend (default onnx)")
    p.add_argument("--input-shape", action="append", default=None, metavar="NAME:DIMS",
                   help="bind an input's shape, e.g. input:1x3x224x224 (repeatable)")
    p.add_argument("--samples", type=int, default=1, metavar="N", help="generated input sets per probe (default 1)")
    p.add_argument("--seed", type=int, default=0)
    common(p)
    return {"reduce": run_bisect_cli}


def run_bisect_cli(args: argparse.Namespace) -> int:
    """`infoptc reduce`, and `infoptc compile ... --bisect` (same flags: model, opt_level, passes,
    target, input_shape, load_plugin; optional samples, seed, threads, json, quiet)."""
    if getattr(args, "config", None) is not None:
        config.apply(args, args.config)
    if args.opt_level is not None and args.passes is not None and getattr(args, "command", "") == "reduce":
        raise UsageError("give -O or --passes, not both")
    samples, seed = getattr(args, "samples", 1), getattr(args, "seed", 0)
    if samples < 1:
        raise UsageError("--samples must be at least 1")
    kwargs: dict[str, Any] = {"target": args.target or "onnx", "opt_level": args.opt_level or "2",
                              "passes": args.passes,
                              "input_shapes": parse_input_shapes(getattr(args, "input_shape", None) or [])}
    if getattr(args, "threads", None):
        kwargs["threads"] = args.threads
    quiet = getattr(args, "quiet", False)

    def on_probe(p: Probe) -> None:
        if not quiet:
            where = "full pipeline" if p.limit is None else f"limit {p.limit}"
            err.print(f"bisect: {where} ({p.applications} applications, {p.contract.value}): "
                      f"{'ok' if p.ok else 'BROKEN'}", markup=False)

    result = bisect(args.model, kwargs, samples=samples, seed=seed,
                    plugin_files=tuple(getattr(args, "load_plugin", None) or ()), on_probe=on_probe)
    code = EXIT_FOUND if result.found or result.error else 0
    if getattr(args, "json", False):
        emit_json(result.as_dict())
        return code
    if not result.found:
        out.print(("FAILED: " if result.error else "PASSED: ") + result.message, markup=False)
        if result.error:
            out.print(f"  {result.error}", markup=False)
        return code
    lines = [
        f"first bad pass application: {result.index} of {result.total}",
        f"  pass:      {result.pass_spec}  (contract {result.contract.value if result.contract else '?'} so far)",
        f"  error:     {result.error}",
        "  rewrote:",
        *[f"    {line}" for line in (result.rewrite.lines() if result.rewrite else ["(not captured)"])],
        f"  probes:    {len(result.probes)} compiles",
        f"reproduce: {result.reproducer}",
    ]
    for line in lines:
        out.print(line, markup=False)
    return code
