"""The pass manager: runs a pipeline over a graph.

A pass (pass_registry.py) only rewrites; the manager owns everything around it: cleanup and
topological order after a change, change detection, and the instruments (timing, printing,
verification, bisection, statistics). The names of pass_registry.py and ``Fixpoint`` are
importable from here too, as they always were.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import onnx_graphsurgeon as gs

from .errors import CompileError, InfoptcError
from .pass_registry import (  # noqa: F401 - also re-exported: passes and plugins import them from here
    PASS_REGISTRY,
    SORTED,
    Contract,
    Option,
    Pass,
    PassContext,
    PassResult,
    get_pass,
    parse_bool,
    parse_size,
    register_pass,
)
from .pipelines import Fixpoint, parse_pipeline
from .rewrite import cleanup, node_subgraphs, toposort

log = logging.getLogger("infoptc")


# ----------------------------------------------------------------------------- the manager


@dataclass
class PassRecord:
    """One pass application, as instruments see it."""

    index: int  # 1-based application number, the unit of --opt-bisect-limit
    name: str
    pass_: Pass
    changed: bool = False
    counters: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: bool = False


class Instrument:
    """Hooks around every pass application. ``before_pass`` returning False skips the pass."""

    def run_begin(self, graph: gs.Graph, ctx: PassContext) -> None: ...

    def before_pass(self, record: PassRecord, graph: gs.Graph, ctx: PassContext) -> bool:
        return True

    def after_pass(self, record: PassRecord, graph: gs.Graph, ctx: PassContext) -> None: ...

    def run_end(self, graph: gs.Graph, ctx: PassContext) -> None: ...


def fingerprint(graph: gs.Graph) -> int:
    """A cheap structural hash: op types, tensor names and wiring, subgraphs included."""
    items = [tuple([t.name for t in graph.inputs]), tuple([t.name for t in graph.outputs])]
    append = items.append
    for node in graph.nodes:
        append((node.op, node.domain, tuple([t.name for t in node.inputs]), tuple([t.name for t in node.outputs])))
        if node.attrs:
            for sub in node_subgraphs(node):
                append(fingerprint(sub))
    return hash(tuple(items))


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector. graphsurgeon graphs are webs of node<->tensor cycles:
    the collector would rescan them over and over while a graph is built and rewritten (compile
    time grew 13.7x from 10k to 100k nodes with it, 11.5x without). Garbage made meanwhile is
    collected once it is enabled again."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class PassManager:
    """Runs a pipeline (text or a list of passes / ``Fixpoint``) over a graph."""

    def __init__(self, pipeline: str | Sequence = (), instruments: Sequence[Instrument] = ()):
        self.pipeline = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        self.instruments = list(instruments)
        self.records: list[PassRecord] = []
        self._known: int | None = None  # fingerprint of the graph as the last pass left it
        self._version = 0  # how many changes this run has seen
        self._idle: dict[int, tuple[int, dict[str, int]]] = {}  # id(pass) -> (version, counters) of a no-op run

    def __str__(self) -> str:
        return ",".join(map(str, self.pipeline))

    @property
    def contract(self) -> Contract:
        return Contract.loosest(p.contract for p in _flatten(self.pipeline))

    def run(self, graph: gs.Graph, ctx: PassContext | None = None) -> list[PassRecord]:
        ctx = ctx or PassContext()
        self.records = []
        self._known, self._version, self._idle = None, 0, {}
        with paused_gc():
            for inst in self.instruments:
                inst.run_begin(graph, ctx)
            self._run_items(self.pipeline, graph, ctx)
            for inst in self.instruments:
                inst.run_end(graph, ctx)
        return self.records

    def _run_items(self, items: Sequence, graph: gs.Graph, ctx: PassContext) -> bool:
        changed = False
        for item in items:
            if isinstance(item, Fixpoint):
                for _ in range(item.max_iterations):
                    if not self._run_items(item.items, graph, ctx):
                        break
                    changed = True
            else:
                changed |= self._run_one(item, graph, ctx)
        return changed

    def _run_one(self, p: Pass, graph: gs.Graph, ctx: PassContext) -> bool:
        record = PassRecord(index=len(self.records) + 1, name=p.name, pass_=p)
        self.records.append(record)
        if not all(inst.before_pass(record, graph, ctx) for inst in self.instruments):
            record.skipped = True
            return False
        # A change is proven by fingerprints before and after the pass, unless the pass reports
        # its changes itself. The fingerprint the last pass left is still good when it changed
        # nothing and no instrument (which might edit the graph) ran since.
        checked = not p.reports_changes
        known, self._known = self._known, None
        # A built-in pass that changed nothing would change nothing again on the same graph (they
        # are deterministic): a fixpoint's last round then only runs the passes that saw a change.
        idle = self._idle.get(id(p)) if p.reports_changes and not self.instruments else None
        before = (known if known is not None else fingerprint(graph)) if checked else None
        start = time.perf_counter()
        try:
            if idle is not None and idle[0] == self._version:
                result = PassResult(False, dict(idle[1]))
            else:
                result = p.run(graph, ctx)
        except InfoptcError:
            raise
        except Exception as e:  # a pass bug must name the pass, not surface as a traceback
            raise CompileError(f"pass {p.name!r} failed: {type(e).__name__}: {e}") from e
        if isinstance(result, dict):
            result = PassResult(counters=result)  # changes are then found by fingerprint
        result = result or PassResult()
        after = fingerprint(graph) if checked and not result.changed else None
        record.changed = bool(result.changed) or (checked and after != before)
        if record.changed:
            cleanup(graph)  # graphsurgeon's cleanup().toposort(), in linear time
            if not p.keeps_order:
                toposort(graph)
            ctx.analyses.clear()
            self._version += 1
            if not self.instruments:  # (an instrument might edit the graph after this)
                ctx.analyses[SORTED] = True
        record.seconds = time.perf_counter() - start
        record.counters = {k: int(v) for k, v in result.counters.items()}
        log.debug("pass %s: changed=%s %s", p.name, record.changed, record.counters)
        for inst in self.instruments:
            inst.after_pass(record, graph, ctx)
        if not record.changed and not self.instruments:
            self._known = after if checked else known
            if p.reports_changes:
                self._idle[id(p)] = (self._version, record.counters)
        return record.changed


def _flatten(items: Sequence) -> Iterable[Pass]:
    for item in items:
        if isinstance(item, Fixpoint):
            yield from _flatten(item.items)
        else:
            yield item
