"""dedup-initializers: merge initializers with identical dtype, shape and bytes.

Exporters often store one tensor several times (tied weights saved twice, the same scale or
mask constant per layer). Initializers are grouped by (dtype, shape, hash of the bytes) and
compared byte for byte within a group, so a hash collision can never merge different tensors;
every user of a duplicate then reads the first one, and the duplicate dies. Initializers that are
graph inputs (a user may override them) or graph outputs keep their identity.

Bytes are compared, not values: 0.0 and -0.0, or NaNs with different payloads, stay apart.
Contract: ``exact``.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from infoptc.pass_manager import Contract, Option, Pass, PassContext, PassResult, parse_size, register_pass
from infoptc.rewrite import graphs_of, numpy_dtype, overridable, replace_uses, tensor_map


def constant_bytes(t: gs.Constant) -> bytes | memoryview:
    """The tensor's payload in little-endian numpy layout, without loading it where possible."""
    proto = getattr(t._values, "tensor", None)  # still lazily loaded from the model
    if isinstance(proto, onnx.TensorProto) and proto.raw_data:
        return proto.raw_data
    values = np.ascontiguousarray(t.values)
    return memoryview(values).cast("B") if values.size else b""


class ConstantPool:
    """Finds, for each constant, the first one seen with the same dtype, shape and bytes."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.groups: dict[tuple, list[tuple[gs.Constant, bytes | memoryview]]] = {}
        self.memo: dict[int, gs.Constant] = {}  # id -> representative: each tensor hashed once

    def key(self, t: gs.Constant) -> tuple | None:
        dtype = numpy_dtype(t)
        if dtype is None:
            return None  # bfloat16, strings...: their bytes are not what numpy shows
        size = int(getattr(t._values, "nbytes", 0))
        if self.max_bytes is not None and size > self.max_bytes:
            return None
        return dtype.str, tuple(int(d) for d in t.shape)

    def canonical(self, t: gs.Constant) -> gs.Constant:
        """The representative of ``t``'s value (``t`` itself when it is the first)."""
        if id(t) in self.memo:
            return self.memo[id(t)]
        rep = t
        key = self.key(t)
        if key is not None:
            data = constant_bytes(t)
            members = self.groups.setdefault(key + (hashlib.blake2b(data, digest_size=16).digest(),), [])
            rep = next((r for r, r_data in members if r_data == data), None)
            if rep is None:
                members.append((t, data))
                rep = t
        self.memo[id(t)] = rep
        return rep


@register_pass
class DedupInitializers(Pass):
    name = "dedup-initializers"
    summary = "merge initializers with identical dtype, shape and bytes (hash, then compare)"
    contract = Contract.EXACT
    reports_changes = True
    options = {
        "min-size": Option("0", "ignore initializers smaller than this (bytes)", parse=parse_size),
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counters = Counter({"merged": 0, "saved_bytes": 0})
        graphs = graphs_of(graph, ctx)
        keep = overridable(graphs)
        minimum = parse_size(self.opts["min-size"])
        pool = ConstantPool()
        seen: set[int] = set()
        # Outer graphs first: a subgraph may use an outer initializer, never the reverse.
        for g in graphs:
            keep |= {id(t) for t in g.outputs}
            for t in list(tensor_map(g).values()):
                if not isinstance(t, gs.Constant) or id(t) in seen or id(t) in keep:
                    continue
                seen.add(id(t))
                size = int(getattr(t._values, "nbytes", 0))
                if size < minimum:
                    continue
                rep = pool.canonical(t)
                if rep is not t:
                    replace_uses(t, rep)
                    counters["merged"] += 1
                    counters["saved_bytes"] += size
        return PassResult(changed=counters["merged"] > 0, counters=dict(counters))
