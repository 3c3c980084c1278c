"""Pattern rewriting: a fusion is the graph it matches, a condition, and what replaces it.

    def pattern(op, x, w=Const(), b=Const()):          # parameters are pattern variables
        return op.Add(op.MatMul(x, w), b)               # Add matches either input order

    def check(ctx, x, b):                               # optional side condition
        return ctx.rank(x) == 2 or "input is not 2-D"   # True, a dict of derived values, or a reason

    def replacement(op, x, w, b):
        return op.Gemm(x, w, b)

    rule = Rule("matmul_add", pattern, replacement, check)
    stats = apply_rules(graph, [rule])                  # to a fixed point; stats.applied["matmul_add"]
    explain(rule, graph, node)                          # why it does (not) match at ``node``

Pattern language (the ``op`` builder of a pattern function):

* ``op.Name(*inputs, **attrs)`` matches one node. Inputs are pattern values, variables,
  literals (``0.5``: a one-element constant of that value that cannot broadcast the result) or
  ``None`` (an absent optional input). Attributes match by value (floats to 1e-6), or by a
  predicate ``axis=lambda a: a in (-1, 3)``; absent attributes take their schema default.
  ``_domain=``, ``_outputs=n`` (a multi-output node: returns a tuple), ``_bind="name"`` (the
  matched node is passed to check/replacement under that name), ``_allow_other_inputs=True``.
* A parameter with default ``Const(pred)`` binds only constants (initializers or Constant
  nodes) whose value satisfies ``pred``; other parameters bind any value. A variable used
  twice must bind the same tensor both times.
* Add, Mul, Max, Min, And, Or, Xor, Equal match their two inputs in either order.
* Every value computed inside the pattern, except the pattern's outputs, must have no consumer
  outside the match and must not be a graph output (``one_use=False`` lifts this: shared nodes
  are then kept alive). ``allow_shape_uses=True`` (or a list of op types, e.g. ``("Shape", "Reshape")``)
  also accepts Shape nodes (or those ops) reading a ``_bind``-named
  intermediate (exporters compute reshape targets that way); the replacement gets them as
  ``shape_uses={bind name: [Shape nodes]}`` and should re-point them with ``op.replace_uses``.
  Whatever it leaves alone keeps the old nodes alive, so a forgotten use costs speed, not meaning. Nodes are only matched inside one graph: an If/Loop body never pulls in
  nodes of the outer graph, so outer-scope references stay intact.
* A pattern may return several values (the first is the root, where matching starts); the
  replacement then returns as many, and each replaces its counterpart's uses.

The check receives a ``MatchContext`` (opset, target, pass options, and helpers ``value``,
``shape``, ``rank``, ``dtype``, ``attr``) and the bindings it names as parameters. Returning a
dict both accepts the match and adds derived values (fused weights, head counts) to the
bindings the replacement sees. The replacement builder creates nodes the same way
(``op.Gemm(x, w, b, transB=1)``); numpy arrays and Python numbers become new initializers.
``rewrite_pass`` turns a list of rules into a registered pass with one counter per rule.

Matching is local: the driver indexes each graph's nodes by op type once per sweep and tries a
rule only at nodes of its root's op type.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .pass_manager import Contract, Option, Pass, PassContext, PassResult, register_pass
from .rewrite import Namer, all_graphs, detach_now, graphs_of, replace_uses, toposort

log = logging.getLogger("infoptc")

__all__ = [
    "Const",
    "GraphBuilder",
    "Match",
    "MatchContext",
    "RewritePass",
    "RewriteStats",
    "Rule",
    "apply_rules",
    "constant_value",
    "explain",
    "find_matches",
    "rewrite_pass",
]

COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "And", "Or", "Xor", "Equal"})
LITERAL_RTOL = 1e-6


# ----------------------------------------------------------------------------- pattern values


class Const:
    """Default value of a pattern parameter that binds only constants: ``w=Const()``,
    ``eps=Const(lambda v: v.size == 1)``. Used inline (``op.Mul(x, Const(pred))``) it is an
    anonymous constant."""

    def __init__(self, pred: Callable[[np.ndarray], bool] | None = None):
        self.pred = pred


class _Var:
    def __init__(self, name: str, const: bool = False, pred: Callable | None = None):
        self.name, self.const, self.pred = name, const, pred

    def __repr__(self) -> str:
        return self.name


class _Literal:
    def __init__(self, value: Any):
        self.value = np.asarray(value)
        if self.value.size != 1:
            raise ValueError(f"pattern literal {value!r} must have exactly one element")

    def __repr__(self) -> str:
        return repr(self.value.item())


class _PNode:
    """One node of a pattern."""

    def __init__(self, index, op, domain, inputs, attrs, n_outputs, bind, allow_other_inputs):
        self.index, self.op, self.domain = index, op, domain
        self.inputs: list = inputs
        self.attrs: dict = attrs
        self.bind: str | None = bind
        self.allow_other_inputs = allow_other_inputs
        self.outputs = [_Out(self, i) for i in range(n_outputs)]

    @property
    def label(self) -> str:
        return f"{self.op}#{self.index}"

    def __repr__(self) -> str:
        ins = ", ".join("None" if i is None else i.node.label if isinstance(i, _Out) else repr(i) for i in self.inputs)
        attrs = "".join(f", {k}={'<predicate>' if callable(v) else v!r}" for k, v in self.attrs.items())
        return f"{self.label} = {self.op}({ins}{attrs})"


class _Out:
    def __init__(self, node: _PNode, index: int):
        self.node, self.index = node, index


class _PatternBuilder:
    """The ``op`` of a pattern function: ``op.Add(a, b)`` records a pattern node."""

    def __init__(self):
        self.nodes: list[_PNode] = []
        self.anonymous = 0

    def __getattr__(self, op: str):
        if op.startswith("_"):
            raise AttributeError(op)

        def make(*inputs, _domain: str = "", _outputs: int = 1, _bind: str | None = None,
                 _allow_other_inputs: bool = False, **attrs):
            node = _PNode(len(self.nodes) + 1, op, _domain, [self._value(i) for i in inputs], attrs,
                          _outputs, _bind, _allow_other_inputs)
            self.nodes.append(node)
            return node.outputs[0] if _outputs == 1 else tuple(node.outputs)

        return make

    def _value(self, x):
        if x is None or isinstance(x, (_Var, _Out, _Literal)):
            return x
        if isinstance(x, Const):
            self.anonymous += 1
            return _Var(f"_const{self.anonymous}", const=True, pred=x.pred)
        if isinstance(x, (int, float, np.number, np.ndarray, list, tuple)):
            return _Literal(x)
        raise TypeError(f"cannot use {type(x).__name__} as a pattern input")


class Pattern:
    """A compiled pattern function."""

    def __init__(self, fn: Callable):
        self.fn = fn
        params = list(inspect.signature(fn).parameters.values())
        if not params:
            raise TypeError(f"pattern {fn.__name__} must take the op builder as its first parameter")
        self.vars: dict[str, _Var] = {}
        for p in params[1:]:
            default = p.default
            if default is inspect.Parameter.empty:
                self.vars[p.name] = _Var(p.name)
            elif isinstance(default, Const):
                self.vars[p.name] = _Var(p.name, const=True, pred=default.pred)
            else:
                raise TypeError(f"pattern {fn.__name__}: parameter {p.name!r} may only default to Const(...)")
        builder = _PatternBuilder()
        result = fn(builder, *self.vars.values())
        outputs = list(result) if isinstance(result, (tuple, list)) else [result]
        if not outputs or not all(isinstance(o, _Out) for o in outputs):
            raise TypeError(f"pattern {fn.__name__} must return the output(s) of op builder calls")
        self.outputs: list[_Out] = outputs
        self.root: _PNode = outputs[0].node
        self.nodes = builder.nodes
        reachable = self._reachable(self.root)
        missing = [n for n in self.nodes if id(n) not in reachable]
        if missing:
            raise TypeError(f"pattern {fn.__name__}: {missing[0].label} is not an input of the root {self.root.label}")
        for o in outputs[1:]:
            if id(o.node) not in reachable:
                raise TypeError(f"pattern {fn.__name__}: every output must lie inside the root's input cone")

    @staticmethod
    def _reachable(root: _PNode) -> set[int]:
        seen, stack = set(), [root]
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            stack.extend(i.node for i in n.inputs if isinstance(i, _Out))
        return seen

    @property
    def root_key(self) -> tuple[str, str]:
        return (self.root.domain, self.root.op)

    @property
    def ops(self) -> frozenset[tuple[str, str]]:
        """(domain, op) of every pattern node: a graph lacking one cannot match."""
        return frozenset((n.domain, n.op) for n in self.nodes)

    @property
    def name(self) -> str:
        return self.fn.__name__


# ----------------------------------------------------------------------------- rules


class Rule:
    """A named rewrite: one or more alternative patterns, an optional check, a replacement."""

    def __init__(self, name: str, pattern: Callable | Sequence[Callable], replacement: Callable,
                 check: Callable | None = None, *, one_use: bool = True,
                 allow_shape_uses: bool | Sequence[str] = False):
        self.name = name
        fns = list(pattern) if isinstance(pattern, (list, tuple)) else [pattern]
        self.patterns = [Pattern(fn) for fn in fns]
        arity = {len(p.outputs) for p in self.patterns}
        if len(arity) != 1:
            raise TypeError(f"rule {name!r}: alternative patterns return different numbers of outputs")
        self.n_outputs = arity.pop()
        self.replacement = replacement
        self.check = check
        self.one_use = one_use
        # True: Shape readers of bound intermediates are allowed; a list names the op types allowed
        # (("Shape", "Reshape"): a Reshape of an intermediate the replacement can re-point too)
        self.allow_shape_uses = allow_shape_uses
        self.shape_use_ops = frozenset(("Shape",) if allow_shape_uses is True else allow_shape_uses or ())

    def __repr__(self) -> str:
        return f"Rule({self.name!r})"


def _call_with(fn: Callable, first: Any, values: dict[str, Any]) -> Any:
    """Call ``fn(first, **values)`` passing only the names ``fn`` accepts (all with ``**kw``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(first, **values)
    names = list(params)[1:]
    missing = [n for n in names if n not in values and params[n].default is inspect.Parameter.empty]
    if missing:
        raise TypeError(f"{fn.__name__} asks for {missing[0]!r}, which the pattern does not bind")
    return fn(first, **{n: values[n] for n in names if n in values})


# ----------------------------------------------------------------------------- graph facts


def _domain(node: gs.Node) -> str:
    return "" if node.domain in (None, "", "ai.onnx") else node.domain


def _present(t: gs.Tensor | None) -> bool:
    return t is not None and bool(t.name) or isinstance(t, gs.Constant)


def _inputs(node: gs.Node) -> list:
    ins = list(node.inputs)
    while ins and not _present(ins[-1]):
        ins.pop()
    return ins


def _position(tensors: Sequence[gs.Tensor], t: gs.Tensor) -> int | None:
    """Index of ``t`` by identity (gs tensors compare equal by name)."""
    return next((i for i, x in enumerate(tensors) if x is t), None)


def constant_value(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None for anything else."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if t is None or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op != "Constant" or _domain(node):
        return None
    a = node.attrs
    if isinstance(a.get("value"), gs.Constant):
        return np.asarray(a["value"].values)
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in a:
            return np.asarray(a[key], dtype=dtype)
    return None


_SCHEMA_DEFAULTS: dict[tuple, Any] = {}
_NO_DEFAULT = object()


def attr_value(node: gs.Node, name: str, opset: int = 17, default: Any = None) -> Any:
    """An attribute of ``node``, or its schema default at ``opset`` when absent."""
    if name in node.attrs:
        return node.attrs[name]
    key = (_domain(node), node.op, opset if not _domain(node) else 1, name)
    if key not in _SCHEMA_DEFAULTS:
        value = _NO_DEFAULT
        try:
            schema = onnx.defs.get_schema(node.op, max_inclusive_version=key[2], domain=key[0])
            attr = schema.attributes.get(name)
            if attr is not None and attr.default_value.type != onnx.AttributeProto.UNDEFINED:
                value = onnx.helper.get_attribute_value(attr.default_value)
                value = value.decode() if isinstance(value, bytes) else value
        except onnx.defs.SchemaError:  # unknown op or domain: no schema, no default
            pass
        _SCHEMA_DEFAULTS[key] = value
    value = _SCHEMA_DEFAULTS[key]
    return default if value is _NO_DEFAULT else value


def _same_attr(want: Any, got: Any) -> bool:
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(want) == len(got) and all(_same_attr(a, b) for a, b in zip(want, got))
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, (int, float)) and bool(np.isclose(got, want, rtol=LITERAL_RTOL, atol=0))
    return want == got


class _GraphInfo:
    """One graph being rewritten: its node set (for producer lookups) and shared state."""

    def __init__(self, graph: gs.Graph, names: Namer):
        self.graph = graph
        self.names = names
        self._ids: set[int] | None = None
        self.dead: set[int] = set()
        self.outputs = {id(t) for t in graph.outputs}

    @property
    def ids(self) -> set[int]:
        """Ids of the graph's nodes, taken when first needed (most sweeps never look a producer
        up); ``apply_rules`` takes them before its first edit at the latest."""
        if self._ids is None:
            self._ids = {id(n) for n in self.graph.nodes}
        return self._ids

    def producer(self, t: gs.Tensor) -> gs.Node | None:
        if isinstance(t, gs.Constant) or len(t.inputs) != 1:
            return None
        node = t.inputs[0]
        return node if id(node) in self.ids and id(node) not in self.dead else None


# ----------------------------------------------------------------------------- matching


@dataclass
class _State:
    bindings: dict = field(default_factory=dict)
    nodes: dict = field(default_factory=dict)  # id(_PNode) -> (pattern node, gs.Node)

    def copy(self) -> _State:
        return _State(dict(self.bindings), dict(self.nodes))


class _Matcher:
    """Backtracking matcher of one pattern; remembers the deepest failure for ``explain``."""

    def __init__(self, pattern: Pattern, info: _GraphInfo, opset: int):
        self.pattern, self.info, self.opset = pattern, info, opset
        self.best: tuple[int, str] | None = None

    def fail(self, st: _State, msg: str, depth: int | None = None) -> None:
        depth = len(st.nodes) if depth is None else depth
        if self.best is None or depth > self.best[0]:
            self.best = (depth, msg)

    def match(self, node: gs.Node) -> Iterator[_State]:
        yield from self._node(self.pattern.root, node, _State())

    def _node(self, pn: _PNode, node: gs.Node, st: _State) -> Iterator[_State]:
        if node.op != pn.op or _domain(node) != pn.domain:
            got = f"{_domain(node)}::{node.op}" if _domain(node) else node.op
            self.fail(st, f"{pn.label} wants {pn.op}, found {got} node {node.name!r}")
            return
        ins = _inputs(node)
        if len(ins) < len(pn.inputs) or (len(ins) > len(pn.inputs) and not pn.allow_other_inputs):
            self.fail(st, f"{pn.label} wants {len(pn.inputs)} input(s), node {node.name!r} has {len(ins)}")
            return
        for key, want in pn.attrs.items():
            got = attr_value(node, key, self.opset)
            ok = bool(want(got)) if callable(want) else _same_attr(want, got)
            if not ok:
                self.fail(st, f"{pn.label}: attribute {key}={got!r} of node {node.name!r} does not match")
                return
        st = st.copy()
        st.nodes[id(pn)] = (pn, node)
        if pn.bind:
            st.bindings[pn.bind] = node
        n = len(pn.inputs)
        orders = [list(range(n))]
        if pn.op in COMMUTATIVE and not pn.domain and n == 2:
            orders.append([1, 0])
        for order in orders:
            pairs = [(k, pn.inputs[k], ins[order[k]]) for k in range(n)]
            yield from self._inputs(pn, node, pairs, st)

    def _inputs(self, pn: _PNode, node: gs.Node, pairs: list, st: _State) -> Iterator[_State]:
        if not pairs:
            yield st
            return
        (k, pv, t), rest = pairs[0], pairs[1:]
        for st2 in self._value(pn, node, k, pv, t, st):
            yield from self._inputs(pn, node, rest, st2)

    def _value(self, pn: _PNode, node: gs.Node, k: int, pv: Any, t: gs.Tensor, st: _State) -> Iterator[_State]:
        where = f"{pn.label} input {k}"
        if pv is None:
            if not _present(t):
                yield st
            else:
                self.fail(st, f"{where}: wants no input, node {node.name!r} has {t.name!r}")
            return
        if not _present(t):
            self.fail(st, f"{where}: node {node.name!r} has no such input")
            return
        if isinstance(pv, _Var):
            if pv.name in st.bindings:
                if st.bindings[pv.name] is t:
                    yield st
                else:
                    self.fail(st, f"{where}: {pv.name} is already {st.bindings[pv.name].name!r}, here it is {t.name!r}")
                return
            if pv.const:
                value = constant_value(t)
                if value is None:
                    self.fail(st, f"{where}: {pv.name} must be a constant, {t.name!r} is computed")
                    return
                if pv.pred is not None and not pv.pred(value):
                    self.fail(st, f"{where}: constant {t.name!r} fails the value condition of {pv.name}")
                    return
            st = st.copy()
            st.bindings[pv.name] = t
            yield st
            return
        if isinstance(pv, _Literal):
            reason = self._literal(pv, t, node)
            if reason:
                self.fail(st, f"{where}: {reason}")
            else:
                yield st
            return
        producer = self.info.producer(t)
        if producer is None:
            kind = "a constant" if constant_value(t) is not None else "not computed in this graph"
            self.fail(st, f"{where}: wants the output of {pv.node.label} ({pv.node.op}), {t.name!r} is {kind}")
            return
        if _position(producer.outputs, t) != pv.index:
            self.fail(st, f"{where}: {t.name!r} is output {_position(producer.outputs, t)} of its producer, "
                          f"{pv.node.label} wants output {pv.index}")
            return
        seen = st.nodes.get(id(pv.node))
        if seen is not None:
            if seen[1] is producer:
                yield st
            else:
                self.fail(st, f"{where}: {pv.node.label} already matched node {seen[1].name!r}, not {producer.name!r}")
            return
        yield from self._node(pv.node, producer, st)

    @staticmethod
    def _literal(pv: _Literal, t: gs.Tensor, node: gs.Node) -> str | None:
        value = constant_value(t)
        if value is None:
            return f"wants the constant {pv!r}, {t.name!r} is not a constant"
        if value.size != 1 or value.dtype.kind not in "fiub":
            return f"wants the constant {pv!r}, {t.name!r} has shape {list(value.shape)}"
        if not np.isclose(float(value.reshape(-1)[0]), float(pv.value), rtol=LITERAL_RTOL, atol=0):
            return f"wants the constant {pv!r}, {t.name!r} is {value.reshape(-1)[0]!r}"
        if value.ndim:  # a [1] or [1, 1] constant must not raise the rank of the result
            others = [i for i in _inputs(node) if i is not t]
            if not others or any(o.shape is None or len(o.shape) < value.ndim for o in others):
                return f"constant {t.name!r} of rank {value.ndim} might broadcast the result up"
        return None


def _structural_reason(rule: Rule, pattern: Pattern, st: _State, info: _GraphInfo) -> tuple[str | None, dict]:
    """One-use and graph-output conditions on the values computed inside a match; also the
    Shape nodes reading intermediates, where the rule allows them."""
    shape_uses: dict[str, list[gs.Node]] = {}
    if not rule.one_use:  # the rewrite keeps shared nodes alive, so sharing breaks nothing
        return None, shape_uses
    matched = {id(node) for _, node in st.nodes.values()}
    outputs = {id(_output_tensor(st, o)) for o in pattern.outputs}
    for pn, node in st.nodes.values():
        for t in node.outputs:
            if id(t) in outputs:
                continue
            if id(t) in info.outputs:
                return f"intermediate {t.name!r} ({pn.label}) is a graph output", shape_uses
            others = [c for c in t.outputs if id(c) not in matched]
            if others and rule.shape_use_ops and pn.bind and all(c.op in rule.shape_use_ops and not _domain(c)
                                                                 for c in others):
                shape_uses.setdefault(pn.bind, []).extend(others)
            elif others:
                return (f"intermediate {t.name!r} ({pn.label}) has another consumer: "
                        f"{others[0].op} node {others[0].name!r}"), shape_uses
    return None, shape_uses


def _output_tensor(st: _State, out: _Out) -> gs.Tensor:
    return st.nodes[id(out.node)][1].outputs[out.index]


@dataclass
class Match:
    """A successful match: where, the bindings (plus derived values from the check), the nodes."""

    rule: Rule
    pattern: Pattern
    root: gs.Node
    bindings: dict
    nodes: list
    outputs: list


class MatchContext:
    """What a check and a replacement may ask about a match and the model."""

    def __init__(self, graph: gs.Graph, root: gs.Node, nodes: Sequence[gs.Node], pass_ctx: PassContext,
                 options: dict, info: _GraphInfo | None = None):
        self.graph, self.root, self.nodes = graph, root, list(nodes)
        self.pass_ctx, self.options = pass_ctx, options
        self._info = info

    @property
    def opset(self) -> int:
        return self.pass_ctx.opset

    @property
    def target(self) -> str:
        return self.pass_ctx.target

    @staticmethod
    def value(t: gs.Tensor) -> np.ndarray | None:
        return constant_value(t)

    @staticmethod
    def shape(t: gs.Tensor) -> tuple | None:
        if isinstance(t, gs.Constant):
            return tuple(t.shape)
        return None if t.shape is None else tuple(t.shape)

    def rank(self, t: gs.Tensor) -> int | None:
        shape = self.shape(t)
        return None if shape is None else len(shape)

    @staticmethod
    def dtype(t: gs.Tensor) -> np.dtype | None:
        try:
            return None if t.dtype is None else np.dtype(t.dtype)
        except TypeError:
            return None

    def attr(self, node: gs.Node, name: str, default: Any = None) -> Any:
        return attr_value(node, name, self.opset, default)

    def producer(self, t: gs.Tensor) -> gs.Node | None:
        """The node computing ``t`` in this graph (None for inputs, constants, outer values)."""
        if self._info is not None:
            return self._info.producer(t)
        return t.inputs[0] if len(t.inputs) == 1 else None

    def is_graph_output(self, t: gs.Tensor) -> bool:
        return any(o is t for o in self.graph.outputs)


def _may_match(pn: _PNode, node: gs.Node, info: _GraphInfo) -> bool:
    """A cheap necessary condition for ``pn`` to match at ``node``: the ops, input counts and
    wiring of the pattern, without variables, constants, attributes or failure messages. Most
    nodes fail here, before a matcher is built."""
    if node.op != pn.op or _domain(node) != pn.domain:
        return False
    ins = _inputs(node)
    n = len(pn.inputs)
    if len(ins) < n or (len(ins) > n and not pn.allow_other_inputs):
        return False
    orders = [range(n), (1, 0)] if pn.op in COMMUTATIVE and not pn.domain and n == 2 else [range(n)]
    return any(all(not isinstance(pv, _Out) or _may_compute(pv, ins[order[k]], info) for k, pv in enumerate(pn.inputs))
               for order in orders)


def _may_compute(out: _Out, t: gs.Tensor, info: _GraphInfo) -> bool:
    producer = info.producer(t) if _present(t) else None
    return (producer is not None and _position(producer.outputs, t) == out.index
            and _may_match(out.node, producer, info))


def _try(rule: Rule, pattern: Pattern, node: gs.Node, info: _GraphInfo, pass_ctx: PassContext,
         options: dict, matcher: _Matcher) -> tuple[Match | None, bool]:
    """First acceptable match of ``pattern`` at ``node``; also whether any structure matched."""
    structural = False
    for st in matcher.match(node):
        structural = True
        reason, shape_uses = _structural_reason(rule, pattern, st, info)
        if rule.allow_shape_uses:
            st.bindings["shape_uses"] = shape_uses
        nodes = [n for _, n in st.nodes.values()]
        if reason is None and rule.check is not None:
            ctx = MatchContext(info.graph, node, nodes, pass_ctx, options, info)
            verdict = _call_with(rule.check, ctx, st.bindings)
            if isinstance(verdict, dict):
                st.bindings.update(verdict)
            elif isinstance(verdict, str):
                reason = f"check: {verdict}"
            elif verdict is not True:
                reason = "check returned False"
        if reason is not None:  # a whole structure matched: its refusal outranks any partial mismatch
            matcher.fail(_State(), reason, depth=len(pattern.nodes) + 1)
            continue
        outputs = [_output_tensor(st, o) for o in pattern.outputs]
        return Match(rule, pattern, node, st.bindings, nodes, outputs), True
    return None, structural


# ----------------------------------------------------------------------------- replacing


class GraphBuilder:
    """The ``op`` of a replacement function: ``op.Gemm(x, w, b, transB=1)`` adds a node.

    Inputs may be tensors, ``None`` (absent optional input), numpy arrays or Python numbers
    (new initializers; floats become float32, ints int64). ``_domain``, ``_outputs=n``,
    ``_dtype`` and ``_shape`` (of the first output) are keywords; the rest are attributes.
    """

    def __init__(self, ctx: MatchContext, info: _GraphInfo, scope: str):
        self.ctx = ctx
        self._info = info
        self._scope = scope
        self.created: list[gs.Node] = []
        self._taken: set[int] = set()

    def constant(self, value: Any, name: str = "const") -> gs.Constant:
        if isinstance(value, float):
            value = np.float32(value)
        elif isinstance(value, bool):
            value = np.bool_(value)
        elif isinstance(value, int):
            value = np.int64(value)
        array = np.ascontiguousarray(np.asarray(value))
        return gs.Constant(self._info.names(f"{self._scope}/{name}"), array)

    def _input(self, x: Any) -> gs.Tensor:
        if x is None:
            return gs.Variable.empty()
        if isinstance(x, gs.Tensor):
            return x
        return self.constant(x)

    def __getattr__(self, op: str):
        if op.startswith("_"):
            raise AttributeError(op)

        def make(*inputs, _domain: str = "", _outputs: int = 1, _dtype=None, _shape=None, **attrs):
            name = self._info.names(f"{self._scope}/{op}")
            outs = [gs.Variable(self._info.names(f"{name}_output_{i}")) for i in range(_outputs)]
            if _dtype is not None:
                outs[0].dtype = _dtype
            if _shape is not None:
                outs[0].shape = list(_shape)
            node = gs.Node(op, name=name, attrs=attrs, inputs=[self._input(i) for i in inputs], outputs=outs,
                           domain=_domain or None)
            self._add(node)
            return outs[0] if _outputs == 1 else tuple(outs)

        return make

    def _add(self, node: gs.Node) -> None:
        self.created.append(node)
        self._info.graph.nodes.append(node)
        self._info.ids.add(id(node))

    def replace_uses(self, old: gs.Tensor, new: gs.Tensor) -> None:
        """Make ``new`` take the place of ``old`` for all its consumers and as a graph output.

        A fresh output of a node built here is renamed to ``old`` (its producer writes ``old``),
        so names and graph outputs stay; otherwise consumers are re-pointed, and a graph output
        gets an Identity from ``new``."""
        if new is old:
            return
        info = self._info
        producer = new.inputs[0] if isinstance(new, gs.Variable) and len(new.inputs) == 1 else None
        if producer is not None and any(n is producer for n in self.created) and id(new) not in self._taken:
            self._taken.add(id(new))
            _detach(old, info)
            replace_uses(new, old)
            producer.outputs[_position(producer.outputs, new)] = old
        elif id(old) in info.outputs:
            _detach(old, info)
            self._add(gs.Node("Identity", name=info.names(f"{self._scope}/Identity"), inputs=[new], outputs=[old]))
        else:
            replace_uses(old, new)


def _scope_of(node: gs.Node) -> str:
    name = node.name or node.op
    return name.rsplit("/", 1)[0] if "/" in name else name


def _rewrite(match: Match, info: _GraphInfo, pass_ctx: PassContext, options: dict) -> None:
    ctx = MatchContext(info.graph, match.root, match.nodes, pass_ctx, options, info)
    op = GraphBuilder(ctx, info, _scope_of(match.root))
    result = _call_with(match.rule.replacement, op, match.bindings)
    news = list(result) if isinstance(result, (tuple, list)) else [result]
    if len(news) != len(match.outputs):
        raise TypeError(f"replacement of rule {match.rule.name!r} returned {len(news)} value(s), "
                        f"the pattern has {len(match.outputs)}")
    for old, new in zip(match.outputs, news):
        op.replace_uses(old, new)
    extra = [n for uses in match.bindings.get("shape_uses", {}).values() for n in uses]
    _drop_dead(extra + match.nodes, info)


def _detach(t: gs.Tensor, info: _GraphInfo) -> None:
    """Give ``t``'s producer a fresh dummy output instead, so ``t`` can get a new producer."""
    for prev in list(t.inputs):
        prev.outputs[_position(prev.outputs, t)] = gs.Variable(info.names(f"{t.name}_replaced"))


def _drop_dead(nodes: Sequence[gs.Node], info: _GraphInfo) -> None:
    """Detach matched nodes whose outputs nobody reads any more (repeat: chains die together)."""
    alive = [n for n in nodes if id(n) not in info.dead]
    changed = True
    while changed:
        changed = False
        for node in alive:
            if id(node) in info.dead:
                continue
            if any(t.outputs or id(t) in info.outputs for t in node.outputs):
                continue
            detach_now(node)
            node.outputs.clear()
            info.dead.add(id(node))
            changed = True


# ----------------------------------------------------------------------------- the driver


@dataclass
class RewriteStats:
    """What ``apply_rules`` did: rewrites per rule, matches refused by a condition, sweeps."""

    applied: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    reasons: dict = field(default_factory=dict)  # rule name -> why it was first refused (as ``explain`` says)
    iterations: int = 0
    converged: bool = True

    @property
    def total(self) -> int:
        return sum(self.applied.values())


def _index(graph: gs.Graph) -> dict[tuple[str, str], list[gs.Node]]:
    by_op: dict[tuple[str, str], list[gs.Node]] = {}
    for node in graph.nodes:
        by_op.setdefault((_domain(node), node.op), []).append(node)
    return by_op


def apply_rules(graph: gs.Graph, rules: Sequence[Rule], *, pass_ctx: PassContext | None = None,
                options: dict | None = None, max_iterations: int = 16, subgraphs: bool = True) -> RewriteStats:
    """Apply ``rules`` until none matches (at most ``max_iterations`` sweeps), in every graph.

    Each sweep indexes a graph's nodes by op type once and tries each rule only at nodes of its
    root's op type. The graph is left topologically sorted, with replaced nodes removed.
    """
    pass_ctx = pass_ctx or PassContext(opset=graph.opset)
    options = options or {}
    stats = RewriteStats()
    graphs = graphs_of(graph, pass_ctx)
    names = Namer(graphs)  # collected before the first rewrite, which may free a name
    rejected_at: dict[str, set[int]] = {}
    stats.converged = False
    rewritten = False  # until then, the graph is as the pass context's analyses saw it
    for _ in range(max_iterations):
        stats.iterations += 1
        sweep = 0
        for g in (graphs if subgraphs else [graph]):
            info = _GraphInfo(g, names)
            by_op = _index(g) if rewritten else pass_ctx.analysis(f"nodes_by_op:{id(g)}", lambda g=g: _index(g))
            present = set(by_op)  # the ops in the graph now; taken again after a rewrite
            for rule in rules:
                for pattern in rule.patterns:
                    if present is None:
                        present = {(_domain(n), n.op) for n in g.nodes}
                    # Nothing changes the graph until a match: a pattern whose ops are not all
                    # present cannot match at any of its roots.
                    if not pattern.ops <= present:
                        continue
                    for node in by_op.get(pattern.root_key, ()):
                        if id(node) in info.dead or not _may_match(pattern.root, node, info):
                            continue
                        matcher = _Matcher(pattern, info, pass_ctx.opset)
                        match, structural = _try(rule, pattern, node, info, pass_ctx, options, matcher)
                        if match is None:
                            if structural:
                                rejected_at.setdefault(rule.name, set()).add(id(node))
                                if rule.name not in stats.reasons and matcher.best is not None:
                                    stats.reasons[rule.name] = (f"at {node.name or node.op!r}: {matcher.best[1]} "
                                                                f"[pattern {pattern.name}]")
                            continue
                        names.collect()
                        info.ids  # noqa: B018 -- the node set as it was before any edit
                        _rewrite(match, info, pass_ctx, options)
                        present, rewritten = None, True
                        stats.applied[rule.name] += 1
                        sweep += 1
            if info.dead:
                g.nodes = [n for n in g.nodes if id(n) not in info.dead]
        if not sweep:
            stats.converged = True
            break
        graphs = all_graphs(graph)
    for name, ids in rejected_at.items():
        stats.rejected[name] = len(ids)
    if stats.total:
        toposort(graph)
        pass_ctx.analyses.clear()  # they describe the graph before the rewrites
    return stats


def find_matches(graph: gs.Graph, rule: Rule, pass_ctx: PassContext | None = None,
                 options: dict | None = None) -> list[Match]:
    """Every place ``rule`` matches now (in ``graph`` itself), without rewriting anything."""
    pass_ctx = pass_ctx or PassContext(opset=graph.opset)
    info = _GraphInfo(graph, Namer(all_graphs(graph)))
    by_op = _index(graph)
    found = []
    for pattern in rule.patterns:
        for node in by_op.get(pattern.root_key, ()):
            match, _ = _try(rule, pattern, node, info, pass_ctx, options or {}, _Matcher(pattern, info, pass_ctx.opset))
            if match is not None:
                found.append(match)
    return found


def explain(rule: Rule, graph: gs.Graph, node: gs.Node, pass_ctx: PassContext | None = None,
            options: dict | None = None) -> str:
    """Why ``rule`` does or does not match with ``node`` as its root, in one line.

    Names the pattern node and input where matching failed (``Mul#3 input 1: wants the constant
    0.5, '/c' is 2.0``), or the one-use or check condition that refused a structural match.
    """
    pass_ctx = pass_ctx or PassContext(opset=graph.opset)
    graphs = all_graphs(graph)
    owner = next((g for g in graphs if any(n is node for n in g.nodes)), None)
    where = f"rule {rule.name!r} at node {node.name or node.op!r}"
    if owner is None:
        return f"{where}: the node is not in this graph"
    info = _GraphInfo(owner, Namer(graphs))
    best: tuple[int, int, str] | None = None
    for k, pattern in enumerate(rule.patterns, 1):
        matcher = _Matcher(pattern, info, pass_ctx.opset)
        match, _ = _try(rule, pattern, node, info, pass_ctx, options or {}, matcher)
        if match is not None:
            return f"{where}: matches (pattern {pattern.name})"
        depth, msg = matcher.best or (0, "no match")
        if best is None or depth > best[0]:
            best = (depth, k, f"{msg} [pattern {pattern.name}]")
    return f"{where}: no match: {best[2]}"


# ----------------------------------------------------------------------------- rules as passes


class RewritePass(Pass):
    """A pass that applies ``rules`` to a fixed point. Counters: the pass's ``counter`` (total),
    one per rule, and ``rejected`` (places where the structure matched but a condition did not).
    Override ``rules_for(ctx)`` to choose rules by opset, target or options."""

    rules: ClassVar[Sequence[Rule]] = ()
    counter: ClassVar[str] = "fused"
    max_iterations: ClassVar[int] = 16
    contract = Contract.REASSOCIATING
    reports_changes = True  # every rewrite is counted (a subclass overriding run must keep that)

    def rules_for(self, ctx: PassContext) -> Sequence[Rule]:
        return self.rules

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = apply_rules(graph, self.rules_for(ctx), pass_ctx=ctx, options=self.opts,
                            max_iterations=self.max_iterations)
        counters = {self.counter: stats.total, **{r.name: stats.applied[r.name] for r in self.rules_for(ctx)}}
        if stats.rejected:
            counters["rejected"] = sum(stats.rejected.values())
            # the first reason of each rule, for --stats (reports are keyed by pass name)
            first = ctx.reports.setdefault(self.name, {}).setdefault("rejected", {})
            for rule, reason in stats.reasons.items():
                first.setdefault(rule, reason)
        if not stats.converged:
            counters["iteration_cap_reached"] = 1
        return PassResult(changed=stats.total > 0, counters=counters)


def rewrite_pass(name: str, summary: str, rules: Sequence[Rule], *, contract: Contract | str = Contract.REASSOCIATING,
                 options: dict[str, Option] | None = None, counter: str = "fused", max_iterations: int = 16,
                 register: bool = True) -> type[RewritePass]:
    """Make (and by default register) a pass that applies ``rules``; ``name`` is its pipeline spelling."""
    cls = type(
        "".join(part.capitalize() for part in name.split("-")) + "Pass",
        (RewritePass,),
        {"name": name, "summary": summary, "rules": tuple(rules), "contract": Contract(contract),
         "options": dict(options or {}), "counter": counter, "max_iterations": max_iterations,
         "__module__": _caller_module()},
    )
    return register_pass(cls) if register else cls


def _caller_module() -> str:
    frame = inspect.currentframe()
    try:
        return frame.f_back.f_back.f_globals.get("__name__", __name__)
    finally:
        del frame
