"""`infoptc export triton MODEL_OR_ARTIFACT --repo DIR --name NAME`: a Triton Inference Server model
repository (config.pbtxt + 1/model.onnx or 1/model.plan). The library code is infoptc.triton."""

from __future__ import annotations

import argparse

from ..bench import parse_dims
from ..errors import UsageError
from .output import emit_json, note, out


def add_parser(subparsers, common) -> dict:
    p = subparsers.add_parser("export", help="write a model for a serving system (Triton model repository)")
    sub = p.add_subparsers(dest="export_format", metavar="FORMAT", parser_class=type(p))
    t = sub.add_parser("triton", help="a Triton Inference Server model repository",
                       description="Write DIR/NAME/config.pbtxt and DIR/NAME/1/model.onnx (or model.plan).")
    t.add_argument("model", metavar="MODEL_OR_ARTIFACT", help=".onnx model, or a .plan from --target tensorrt")
    t.add_argument("--repo", required=True, metavar="DIR", help="the model repository folder")
    t.add_argument("--name", required=True, help="the model's name in the repository")
    t.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    t.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                   help="largest batch Triton forms (default 8 when the model has a batch dimension; 0 otherwise)")
    t.add_argument("--instances", type=int, default=1, metavar="N", help="model instances (instance_group count)")
    t.add_argument("--instance-kind", default=None, choices=["cpu", "gpu", "auto"],
                   help="where instances run (default: cpu for onnxruntime, gpu for tensorrt)")
    t.add_argument("--latency-budget-ms", type=float, default=None, metavar="X",
                   help="measure a batch sweep here and choose preferred batch sizes and a queue delay within X ms p99")
    t.add_argument("--response-cache", action="store_true", help="enable Triton's response cache for the model")
    t.add_argument("--threads", type=int, default=None, metavar="N",
                   help="onnxruntime: intra-op threads per instance (inter-op 1); also used by the sweep")
    t.add_argument("--ort-graph-level", default="all", choices=["all", "extended", "basic", "disabled"],
                   help="onnxruntime: graph optimizations Triton's ORT backend applies (written as its own "
                        "numbering: basic -1, extended 1, disabled 2; all: left out)")
    t.add_argument("--dim", action="append", default=[], metavar="NAME=N", help="symbolic dims for the sweep, e.g. seq=128")
    t.add_argument("--force", action="store_true", help="replace an existing DIR/NAME")
    common(t)
    return {"export": cmd_export}


def cmd_export(args: argparse.Namespace) -> int:
    from ..triton import export_triton

    if args.export_format != "triton":
        raise UsageError("say what to export: infoptc export triton MODEL --repo DIR --name NAME")
    result = export_triton(args.model, args.repo, args.name, backend=args.backend,
                           max_batch_size=args.max_batch_size, instances=args.instances,
                           latency_budget_ms=args.latency_budget_ms, response_cache=args.response_cache,
                           force=args.force, threads=args.threads, graph_level=args.ort_graph_level,
                           kind=args.instance_kind, dims=parse_dims(args.dim))
    if args.json:
        emit_json(result.as_dict())
        return 0
    out.print(f"wrote {result.folder}: {', '.join(str(f.relative_to(result.folder)) for f in result.files)}", markup=False)
    out.print(f"  max_batch_size {result.max_batch_size}: {result.batch_note}", markup=False)
    if result.batching:
        out.print(f"  dynamic batching: preferred {result.batching['preferred'] or 'none'}, queue delay "
                  f"{result.batching['max_queue_delay_us']} us ({result.batching['reason']})", markup=False)
    for row in result.sweep:
        note(args, f"  batch {row['batch']}: p50 {row['p50_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms, "
                   f"{row['throughput_per_s']:.1f}/s")
    return 0
