"""Passes, their registry and the pass manager.

A pass is a class with a kebab-case ``name`` (its pipeline spelling), a one-line ``summary``,
typed ``options`` and a numerical ``contract``; ``run(graph, ctx)`` rewrites an
onnx-graphsurgeon graph in place and returns a ``PassResult`` with counters. The manager owns
everything around it: cleanup and topological order after a change, change detection,
and the instruments (timing, printing, verification, bisection, statistics).
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import gc
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import onnx_graphsurgeon as gs

from .errors import CompileError, InfoptcError, UsageError
from .rewrite import cleanup, node_subgraphs, toposort

log = logging.getLogger("infoptc")


class Contract(str, enum.Enum):
    """What a pass may do to the numbers; the verifier picks tolerances from it."""

    EXACT = "exact"  # graph surgery only: outputs bit-identical
    REASSOCIATING = "reassociating"  # fp folding/fusion: tight fp tolerances
    LOSSY = "lossy"  # quantization, pruning, low-rank: judged by a task metric

    @property
    def rank(self) -> int:
        return list(Contract).index(self)

    @staticmethod
    def loosest(contracts: Iterable["Contract"]) -> "Contract":
        return max(contracts, key=lambda c: c.rank, default=Contract.EXACT)


# ----------------------------------------------------------------------------- options

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """``"1MB"`` -> 1_000_000, ``"4KiB"`` -> 4096, ``"123"`` -> 123."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("expected a size such as 1024, 64KB or 1MB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


@dataclass(frozen=True)
class Option:
    """A pass option: its default, a help line, and how to parse it from pipeline text."""

    default: Any
    help: str = ""
    parse: Callable[[str], Any] | None = None  # inferred from the default when None
    choices: tuple | None = None

    def convert(self, value: Any) -> Any:
        parse = self.parse or _parser_for(self.default)
        out = parse(value) if isinstance(value, str) or self.parse else value
        if self.choices is not None and out not in self.choices:
            raise ValueError(f"expected one of {', '.join(map(str, self.choices))}")
        return out


def _parser_for(default: Any) -> Callable[[str], Any]:
    if isinstance(default, bool):
        return parse_bool
    if isinstance(default, int):
        return lambda s: int(s, 0)
    if isinstance(default, float):
        return float
    return str


# ----------------------------------------------------------------------------- passes


@dataclass
class PassResult:
    """What a pass did. ``changed`` may be left False: the manager also detects changes itself,
    except for in-place edits of attributes or constant values, which a pass must report."""

    changed: bool = False
    counters: dict[str, int] = field(default_factory=dict)


# Analysis key the manager sets after it sorted the graph following a change; like every analysis
# it is dropped at the next change. The toposort pass has nothing to do while it is set.
SORTED = "sorted"


@dataclass
class PassContext:
    """Model-level facts a pass may read, and a cache of analyses dropped on every change."""

    opset: int = 17
    target: str = "onnx"
    input_shapes: dict[str, tuple] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    analyses: dict[str, Any] = field(default_factory=dict)
    # What passes leave for the user: reports by pass name (the quantizer's per-tensor table),
    # and key/value pairs the driver writes into the model's metadata_props.
    reports: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def analysis(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.analyses:
            self.analyses[key] = compute()
        return self.analyses[key]


class Pass:
    """Base class. Subclasses set ``name``, ``summary``, ``contract``, ``options`` and ``run``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    contract: ClassVar[Contract] = Contract.EXACT
    options: ClassVar[dict[str, Option]] = {}
    # True when ``run`` returns a PassResult whose ``changed`` covers every edit it makes, and
    # is deterministic: the manager then trusts it instead of fingerprinting the graph before
    # and after, and does not run it again on a graph it left unchanged.
    reports_changes: ClassVar[bool] = False

    def __init__(self, **options: Any):
        self.opts: dict[str, Any] = {k: o.default for k, o in self.options.items()}
        for key, value in options.items():
            key = key.replace("_", "-")
            if key not in self.options:
                raise UsageError(_unknown(f"option {key!r} for pass {self.name!r}", key, self.options))
            try:
                self.opts[key] = self.options[key].convert(value)
            except ValueError as e:
                raise UsageError(f"bad value {value!r} for option {key!r} of pass {self.name!r}: {e}") from None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult | None:
        raise NotImplementedError

    def __str__(self) -> str:
        changed = {k: v for k, v in self.opts.items() if v != self.options[k].default}
        if not changed:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_fmt(v)}" for k, v in changed.items()) + "}"


def _fmt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _unknown(what: str, key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"unknown {what}" + (f"; did you mean {close[0]!r}?" if close else "")


# ----------------------------------------------------------------------------- registry

PASS_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(
    obj: type[Pass] | Callable | None = None,
    *,
    name: str | None = None,
    summary: str | None = None,
    contract: Contract | str = Contract.EXACT,
    options: dict[str, Option] | None = None,
    replace: bool = False,
):
    """Register a pass class, or turn a function ``fn(graph, ctx, **opts)`` into one.

    Usable bare (``@register_pass`` on a class) or with arguments (``@register_pass(name=...)``).
    """

    def wrap(target):
        if isinstance(target, type) and issubclass(target, Pass):
            cls = target
            if name:
                cls.name = name
            if summary:
                cls.summary = summary
        else:
            fn = target
            opts = dict(options or {})

            def run(self, graph, ctx):
                return fn(graph, ctx, **{k.replace("-", "_"): v for k, v in self.opts.items()})

            doc = (fn.__doc__ or "").strip().splitlines()
            cls = type(
                f"{fn.__name__}_pass",
                (Pass,),
                {
                    "name": name or fn.__name__.replace("_", "-"),
                    "summary": summary or (doc[0] if doc else ""),
                    "contract": Contract(contract),
                    "options": opts,
                    "run": run,
                    "__module__": fn.__module__,
                },
            )
        if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", cls.name or ""):
            raise ValueError(f"pass name {cls.name!r} must be kebab-case")
        if not cls.summary:
            raise ValueError(f"pass {cls.name!r} needs a one-line summary")
        if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls and not replace:
            raise ValueError(f"a pass named {cls.name!r} is already registered")
        PASS_REGISTRY[cls.name] = cls
        return target

    return wrap(obj) if obj is not None else wrap


def get_pass(name: str) -> type[Pass]:
    from . import plugins

    plugins.load_builtin_passes()
    if name not in PASS_REGISTRY:
        raise UsageError(_unknown(f"pass {name!r}", name, PASS_REGISTRY))
    return PASS_REGISTRY[name]


# ----------------------------------------------------------------------------- the manager


@dataclass
class Fixpoint:
    """Run ``items`` again until an iteration changes nothing (at most ``max_iterations``)."""

    items: list
    max_iterations: int = 8

    def __str__(self) -> str:
        opt = "" if self.max_iterations == 8 else "{max-iterations=%d}" % self.max_iterations
        return f"fixpoint{opt}(" + ",".join(map(str, self.items)) + ")"


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
        from .pipelines import parse_pipeline

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
