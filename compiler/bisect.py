"""Find the first pass application that breaks a model, by bisection over --opt-bisect-limit.

    result = bisect("model.onnx", {"opt_level": 2, "load_plugins": ["my_pass.py"]})
    result.pass_name, result.index, result.rewrites, result.reproducer

Every probe compiles with ``opt_bisect_limit=N`` (only the first N pass applications run) and
compares the result with the original under the loosest contract of the passes that ran
(``verify.check_equivalent``). Limit 0 must be good and the full pipeline bad; the search keeps
a good limit ``lo`` and a bad limit ``hi`` until they are adjacent, so application ``hi`` is
the first bad one. Like LLVM's opt-bisect this assumes that once broken, a model stays broken.
The CLI is ``infoptc reduce MODEL [-O N | --passes P]`` and ``infoptc compile ... --bisect``.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from . import ir
from .errors import InfoptcError, UsageError
from .pass_manager import Contract, Instrument, PassContext, PassRecord

# ----------------------------------------------------------------------------- snapshots


def _digest(value: Any) -> str:
    """A short stable hash of an attribute or tensor value (arrays by their bytes)."""
    if isinstance(value, gs.Constant):
        value = value.values
    if isinstance(value, gs.Tensor):
        return f"tensor:{value.name}"
    if isinstance(value, np.ndarray):
        data = str(value.dtype).encode() + str(value.shape).encode() + np.ascontiguousarray(value).tobytes()
        return hashlib.sha1(data).hexdigest()[:16]
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_digest(v) for v in value) + "]"
    if isinstance(value, gs.Graph):
        return f"graph:{value.name}:{len(value.nodes)}"
    return repr(value)


@dataclass
class Snapshot:
    """What a rewrite can change, per node (keyed by name) and per constant."""

    nodes: dict[str, tuple[str, str, tuple, tuple]]  # name -> (op, attrs digest, inputs, outputs)
    constants: dict[str, str]  # name -> value digest

    @classmethod
    def of(cls, graph: gs.Graph) -> "Snapshot":
        nodes = {}
        for i, node in enumerate(graph.nodes):
            key = node.name or f"<unnamed #{i} {node.op}>"
            attrs = ";".join(f"{k}={_digest(v)}" for k, v in sorted(node.attrs.items()))
            nodes[key] = (node.op, attrs, tuple(t.name for t in node.inputs), tuple(t.name for t in node.outputs))
        constants = {name: _digest(t) for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
        return cls(nodes, constants)


@dataclass
class Rewrite:
    """The difference one pass application made."""

    removed: list[tuple[str, str]] = field(default_factory=list)  # (node, op)
    added: list[tuple[str, str]] = field(default_factory=list)
    changed: list[tuple[str, str, str]] = field(default_factory=list)  # (node, op, what changed)
    constants_changed: list[str] = field(default_factory=list)
    constants_added: list[str] = field(default_factory=list)
    constants_removed: list[str] = field(default_factory=list)

    @classmethod
    def between(cls, before: Snapshot, after: Snapshot) -> "Rewrite":
        r = cls()
        for name, (op, *_rest) in before.nodes.items():
            if name not in after.nodes:
                r.removed.append((name, op))
        for name, (op, attrs, ins, outs) in after.nodes.items():
            old = before.nodes.get(name)
            if old is None:
                r.added.append((name, op))
                continue
            what = [w for w, a, b in (("op " + old[0] + " -> " + op, old[0], op), ("attributes", old[1], attrs),
                                      ("inputs", old[2], ins), ("outputs", old[3], outs)) if a != b]
            if what:
                r.changed.append((name, op, ", ".join(what)))
        r.constants_changed = sorted(n for n, d in after.constants.items()
                                     if n in before.constants and before.constants[n] != d)
        r.constants_added = sorted(n for n in after.constants if n not in before.constants)
        r.constants_removed = sorted(n for n in before.constants if n not in after.constants)
        return r

    @property
    def empty(self) -> bool:
        return not any(self.as_dict().values())

    def as_dict(self) -> dict:
        return {"removed": [{"node": n, "op": o} for n, o in self.removed],
                "added": [{"node": n, "op": o} for n, o in self.added],
                "changed": [{"node": n, "op": o, "what": w} for n, o, w in self.changed],
                "constants_changed": self.constants_changed, "constants_added": self.constants_added,
                "constants_removed": self.constants_removed}

    def lines(self, limit: int = 12) -> list[str]:
        out = [f"changed {n} ({o}): {w}" for n, o, w in self.changed]
        out += [f"removed {n} ({o})" for n, o in self.removed]
        out += [f"added   {n} ({o})" for n, o in self.added]
        out += [f"constant {n} changed value" for n in self.constants_changed]
        if self.constants_added or self.constants_removed:
            out.append(f"constants: {len(self.constants_added)} added, {len(self.constants_removed)} removed")
        if len(out) > limit:
            out = out[:limit] + [f"... and {len(out) - limit} more"]
        return out or ["no visible change to nodes or constants"]


class _Capture(Instrument):
    """Snapshots around application ``at``, and the final graph as an ONNX model."""

    def __init__(self, at: int | None, template):
        self.at = at
        self.template = template
        self.before: Snapshot | None = None
        self.after: Snapshot | None = None
        self.model = None

    def before_pass(self, record: PassRecord, graph: gs.Graph, ctx: PassContext) -> bool:
        if record.index == self.at:
            self.before = Snapshot.of(graph)
        return True

    def after_pass(self, record: PassRecord, graph: gs.Graph, ctx: PassContext) -> None:
        if record.index == self.at:
            self.after = Snapshot.of(graph)

    def run_end(self, graph: gs.Graph, ctx: PassContext) -> None:
        self.model = ir.from_graph(graph, self.template)


# ----------------------------------------------------------------------------- the search


@dataclass
class Probe:
    limit: int | None  # None: the whole pipeline
    ok: bool
    contract: Contract
    applications: int  # applications that ran
    error: str = ""


@dataclass
class BisectResult:
    found: bool
    total: int  # pass applications of the full pipeline
    pipeline: str
    probes: list[Probe]
    index: int | None = None  # 1-based application number of the first bad one
    pass_name: str | None = None
    pass_spec: str | None = None  # the pass with its options, as pipeline text
    contract: Contract | None = None  # loosest contract up to and including it
    error: str = ""  # why the model at that limit is not equivalent
    rewrite: Rewrite | None = None
    reproducer: str = ""
    message: str = ""  # a summary line

    def as_dict(self) -> dict:
        return {"found": self.found, "index": self.index, "pass": self.pass_name, "pass_spec": self.pass_spec,
                "contract": self.contract.value if self.contract else None, "error": self.error,
                "rewrite": self.rewrite.as_dict() if self.rewrite else None, "reproducer": self.reproducer,
                "total_applications": self.total, "pipeline": self.pipeline, "message": self.message,
                "probes": [{"limit": p.limit, "ok": p.ok, "contract": p.contract.value, "applications": p.applications,
                            "error": p.error or None} for p in self.probes]}


def bisect(model: ir.ModelSource, compile_kwargs: dict | None = None, *, samples: int = 1, seed: int = 0,
           plugin_files: tuple[str, ...] = (), on_probe: Callable[[Probe], None] | None = None) -> BisectResult:
    """Find the first pass application after which ``model`` no longer matches the original.

    ``compile_kwargs`` are ``infoptc.compile``'s (target, opt_level, passes, input_shapes,
    load_plugins, target options); ``verify_each``, ``opt_bisect_limit`` and ``instruments`` are
    the search's own. ``plugin_files`` loaded elsewhere (the CLI's --load-plugin) go into the
    reproducer. ``on_probe`` sees every probe as it finishes (for progress).
    """
    from .driver import compile as compile_model
    from .verify import check_equivalent

    kwargs = {k: v for k, v in (compile_kwargs or {}).items()
              if k not in ("verify_each", "opt_bisect_limit", "instruments")}
    source = ir.load_model(model)
    reference = source
    if kwargs.get("input_shapes"):  # compare at the bound shapes: the model as the pipeline receives it
        from .driver import bind_input_shapes

        graph = ir.to_graph(source)
        bind_input_shapes(graph, kwargs["input_shapes"])
        reference = ir.from_graph(graph, source)
    probes: list[Probe] = []
    state: dict[str, Any] = {}

    def probe(limit: int | None, at: int | None = None) -> tuple[Probe, _Capture, list[PassRecord]]:
        capture = _Capture(at, source)
        records: list[PassRecord] = []
        try:
            artifact = compile_model(source, opt_bisect_limit=limit, instruments=[capture], **kwargs)
            records = artifact.pass_records
            state["pipeline"] = artifact.pipeline
        except InfoptcError as e:
            if limit is None or isinstance(e, UsageError):
                raise  # the pipeline itself does not compile: nothing to bisect
            return _record(Probe(limit, False, Contract.EXACT, limit, f"compile failed: {e}")), capture, records
        ran = [r for r in records if not r.skipped]
        contract = Contract.loosest(r.pass_.contract for r in ran)
        result = Probe(limit, True, contract, len(ran))
        try:
            check_equivalent(reference, capture.model, contract, samples=samples, seed=seed,
                             what=f"the model after {len(ran)} pass application(s)")
        except InfoptcError as e:
            result.ok, result.error = False, str(e)
        return _record(result), capture, records

    def _record(p: Probe) -> Probe:
        probes.append(p)
        if on_probe:
            on_probe(p)
        return p

    full, _, records = probe(None)
    total = len(records)
    pipeline = state.get("pipeline", "")
    base = dict(found=False, total=total, pipeline=pipeline, probes=probes)
    if full.ok:
        return BisectResult(**base, message=f"the model stays equivalent through all {total} pass applications "
                                            f"({full.contract.value} contract)")
    zero, _, _ = probe(0)
    if not zero.ok:
        return BisectResult(**base, error=zero.error,
                            message="the model already differs with no pass applied: the fault is in loading, "
                                    "export or lowering, not in a pass")
    lo, hi = 0, total
    last = None  # the probe at hi, with its snapshots around application hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        p, capture, records = probe(mid, at=mid)
        if p.ok:
            lo = mid
        else:
            hi, last = mid, (p, capture, records)
    final, capture, records = last or probe(hi, at=hi)
    culprit = records[hi - 1] if len(records) >= hi else None
    rewrite = Rewrite.between(capture.before, capture.after) if capture.before and capture.after else None
    name = culprit.name if culprit else "?"
    spec = str(culprit.pass_) if culprit else "?"
    return BisectResult(
        found=True, total=total, pipeline=pipeline, probes=probes, index=hi, pass_name=name, pass_spec=spec,
        contract=final.contract, error=final.error, rewrite=rewrite,
        reproducer=reproducer(model, pipeline, hi, kwargs, plugin_files),
        message=f"pass application {hi} of {total}, {spec}, breaks the model")


def reproducer(model: ir.ModelSource, pipeline: str, limit: int, kwargs: dict, plugin_files=()) -> str:
    """The compile command that stops at the bad application, with --verify-each to show it."""
    path = str(model) if isinstance(model, (str, os.PathLike)) else "MODEL.onnx"
    argv = ["infoptc", path, "--passes", pipeline, "--opt-bisect-limit", str(limit), "--verify-each"]
    target = kwargs.get("target")
    if target and target != "onnx":
        argv += ["--target", target]
    for name, dims in (kwargs.get("input_shapes") or {}).items():
        argv += ["--input-shape", f"{name}:{'x'.join(map(str, dims))}"]
    for plugin in [*kwargs.get("load_plugins", ()), *plugin_files]:
        argv += ["--load-plugin", str(plugin)]
    return shlex.join(argv)
