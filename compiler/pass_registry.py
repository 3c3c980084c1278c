"""What a pass is, and the registry of passes by name.

A pass is a class with a kebab-case ``name`` (its pipeline spelling), a one-line ``summary``,
typed ``options`` and a numerical ``contract``; ``run(graph, ctx)`` rewrites an
onnx-graphsurgeon graph in place and returns a ``PassResult`` with counters. ``register_pass``
adds one to ``PASS_REGISTRY``; ``get_pass`` finds one by name. The pipeline parser
(pipelines.py) and the pass manager (pass_manager.py) both build on this module.
"""

from __future__ import annotations

import difflib
import enum
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import onnx_graphsurgeon as gs

from .errors import UsageError


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
    # True when the pass chooses the node order itself (reorder-for-memory): after it the manager
    # cleans up but does not sort again, which would undo that order.
    keeps_order: ClassVar[bool] = False

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
