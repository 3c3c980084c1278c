"""The memory analysis (infoptc.memory): liveness, sizes, arena plans and their checker, and the
`inspect --memory` / `compile --memory-report` commands."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from infoptc import memory

from _models import fvi, model

QUICK = settings(max_examples=100, deadline=None, derandomize=True, database=None)


@st.composite
def programs(draw, max_ops: int = 10) -> memory.Program:
    """Random DAGs: each op writes one tensor and reads up to three earlier ones (branches and
    joins), some ops have scratch; sizes include 0 and unaligned ones."""
    ops, sizes, names = [], {}, []
    for i in range(draw(st.integers(1, max_ops))):
        reads = tuple(dict.fromkeys(draw(st.lists(st.sampled_from(names), max_size=3)))) if names else ()
        name = f"t{i}"
        sizes[name] = draw(st.sampled_from([0, 4, 64, 100, 256, 1000, 4096]))
        op_type = draw(st.sampled_from(["Relu", "Add", "Conv", "Concat", "Reshape"]))
        ops.append(memory.Op(f"n{i}", op_type, reads, (name,), draw(st.sampled_from([0, 0, 0, 96]))))
        names.append(name)
    outputs = frozenset(draw(st.lists(st.sampled_from(names), min_size=1, max_size=2)))
    return memory.Program(ops, sizes, outputs)


@st.composite
def scheduled(draw, max_ops: int = 10):
    """A program and a random topological order of it."""
    prog = draw(programs(max_ops))
    producer = {w: i for i, op in enumerate(prog.ops) for w in op.writes}
    deps = [{producer[r] for r in op.reads} for op in prog.ops]
    order, done = [], set()
    while len(order) < len(prog.ops):
        ready = [i for i in range(len(prog.ops)) if i not in done and deps[i] <= done]
        pick = ready[draw(st.integers(0, len(ready) - 1))]
        order.append(pick)
        done.add(pick)
    return prog, order


@QUICK
@given(scheduled())
def test_every_plan_passes_the_checker_and_respects_the_bounds(case):
    prog, order = case
    rep = memory.report(prog, order)
    assert memory.plan_conflicts(rep.plan) == []
    assert rep.lower_bound <= rep.planned
    assert rep.lower_bound <= rep.no_reuse
    assert all(o % memory.ALIGNMENT == 0 for o in rep.plan.offsets)
    # every arena tensor is in exactly one buffer, and every scratch has its own
    placed = [t for b in rep.plan.buffers for t in b.tensors]
    assert sorted(t for t in placed if "#" not in t) == sorted(prog.sizes)
    assert sum("#scratch" in t for t in placed) == sum(1 for op in prog.ops if op.scratch)


@QUICK
@given(scheduled())
def test_the_checker_finds_two_live_buffers_put_at_one_offset(case):
    prog, order = case
    plan = memory.plan_memory(prog, order)
    live = memory.live_bytes(plan.buffers, len(order))
    pairs = [(a, b) for a in range(len(plan.buffers)) for b in range(a + 1, len(plan.buffers))
             if plan.buffers[a].size and plan.buffers[b].size
             and plan.buffers[a].start <= plan.buffers[b].end and plan.buffers[b].start <= plan.buffers[a].end]
    if not pairs:
        assert max(live, default=0) <= plan.planned
        return
    a, b = pairs[0]
    plan.offsets[b] = plan.offsets[a]
    assert memory.plan_conflicts(plan)
    with pytest.raises(Exception, match="overlap"):
        memory.check_plan(plan)


@QUICK
@given(scheduled(max_ops=12))
def test_best_order_is_topological_and_never_raises_the_lower_bound(case):
    prog, order = case
    prog.ops = [prog.ops[i] for i in order]  # the random order becomes the given one
    best = memory.best_order(prog)
    assert sorted(best) == list(range(len(prog.ops)))
    seen: set[str] = set()
    for i in best:
        assert all(r in seen for r in prog.ops[i].reads)
        seen.update(prog.ops[i].writes)
    assert memory.lower_bound(prog, best) <= memory.lower_bound(prog)


def _step_peak(prog, order):
    return max(memory.live_bytes(memory.buffers(prog, order, inplace=False), len(order)), default=0)


def _all_orders(prog):
    producer = {w: i for i, op in enumerate(prog.ops) for w in op.writes}
    deps = [{producer[r] for r in op.reads} for op in prog.ops]

    def extend(order, done):
        if len(order) == len(prog.ops):
            yield list(order)
            return
        for i in range(len(prog.ops)):
            if i not in done and deps[i] <= done:
                yield from extend(order + [i], done | {i})

    return extend([], frozenset())


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(programs(max_ops=7))
def test_exact_search_finds_the_lowest_peak_of_all_orders(prog):
    order = prog.identity()
    found = memory._exact(prog, order, 0, order, 10**6)
    assert _step_peak(prog, found) == min(_step_peak(prog, o) for o in _all_orders(prog))


def test_liveness_and_inplace_by_hand():
    # x -> Exp -> a -> Relu -> b (writes over a: a dies there) ; a is also read by nothing else
    # b -> MatMul(W) -> c [2, 8] ; Add(b, b) would not be in place: b is still read later
    w = nh.from_array(np.ones((4, 8), np.float32), "W")
    nodes = [h.make_node("Exp", ["x"], ["a"], name="exp"), h.make_node("Relu", ["a"], ["b"], name="relu"),
             h.make_node("Add", ["b", "b"], ["s"], name="add"), h.make_node("MatMul", ["b", "W"], ["c"], name="mm"),
             h.make_node("Add", ["c", "s2"], ["y"], name="add2"),
             h.make_node("ReduceSum", ["s"], ["s2"], name="rs", keepdims=0)]
    m = model([nodes[0], nodes[1], nodes[2], nodes[5], nodes[3], nodes[4]], [fvi("x", [2, 4])], [fvi("y", [2, 8])],
              [w])
    prog = memory.program_of(m)
    assert prog.sizes == {"a": 32, "b": 32, "s": 32, "s2": 4, "c": 64, "y": 64}
    assert prog.weight_bytes == 128 and prog.input_bytes == 32
    bufs = memory.buffers(prog, prog.identity())
    by_first = {b.tensors[0]: b for b in bufs}
    assert by_first["a"].tensors == ["a", "b"] and (by_first["a"].start, by_first["a"].end) == (0, 4)
    assert by_first["s"].tensors == ["s"]  # b is read after the Add: no writing over it
    assert by_first["c"].tensors == ["c", "y"]  # c dies at add2, same size as y
    rep = memory.report(prog)
    # step 4 (mm): a/b 32 + s2 4 + c 64 live; s died at rs (step 3)
    assert rep.live == [32, 32, 64, 68, 100, 68]
    assert rep.lower_bound == 100 and rep.peak_node == "mm"
    assert rep.no_reuse == 32 + 32 + 32 + 4 + 64 + 64


def test_unbound_symbols_are_sized_per_unit_and_bound_ones_are_multiplied():
    m = model([h.make_node("Relu", ["x"], ["a"]), h.make_node("Neg", ["a"], ["y"])],
              [fvi("x", ["N", 16])], [fvi("y", ["N", 16])])
    per_unit = memory.program_of(m)
    assert per_unit.symbols == ["N"] and per_unit.sizes == {"a": 64, "y": 64}
    bound = memory.program_of(m, {"x": (8, 16)})
    assert bound.symbols == [] and bound.sizes == {"a": 512, "y": 512}


def test_a_tensor_of_unknown_shape_is_listed_not_fatal():
    m = model([h.make_node("Relu", ["x"], ["a"]), h.make_node("Mystery", ["a"], ["y"], domain="custom")],
              [fvi("x", [4])], [h.make_tensor_value_info("y", T.FLOAT, None)])
    m.opset_import.append(h.make_opsetid("custom", 1))
    rep = memory.report(memory.program_of(m))
    assert rep.unknown == ["y"] and rep.lower_bound == 16


def _if_model() -> onnx.ModelProto:
    """t is read only inside the If's branches: it must stay live through the If."""
    then_g = h.make_graph([h.make_node("Add", ["t", "t"], ["o1"]), h.make_node("Neg", ["o1"], ["o"])], "then", [],
                          [fvi("o", [64])])
    else_g = h.make_graph([h.make_node("Neg", ["t"], ["o"])], "else", [], [fvi("o", [64])])
    nodes = [h.make_node("Relu", ["x"], ["t"], name="relu"), h.make_node("ReduceSum", ["x"], ["s"], name="sum"),
             h.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             h.make_node("Squeeze", ["c"], ["cs"], name="sq"),
             h.make_node("If", ["cs"], ["y"], then_branch=then_g, else_branch=else_g, name="if")]
    zero = nh.from_array(np.zeros((1,), np.float32), "zero")
    return model(nodes, [fvi("x", [64])], [fvi("y", [64])], [zero])


def test_subgraph_reads_keep_outer_tensors_live_and_bodies_are_scratch():
    prog = memory.program_of(_if_model())
    if_op = prog.ops[-1]
    assert "t" in if_op.reads
    # the then branch holds o1 (256 bytes, aligned) and its output o
    assert if_op.scratch >= 256
    buf = next(b for b in memory.buffers(prog, prog.identity()) if b.tensors[0] == "t")
    assert buf.end == len(prog.ops) - 1
    rep = memory.report(prog)
    assert "if#scratch" in {t for t, _ in rep.live_at_peak}


def test_metadata_value_is_compact_and_deterministic():
    prog = memory.program_of(_if_model())
    a, b = memory.metadata_value(memory.report(prog)), memory.metadata_value(memory.report(prog))
    assert a == b and " " not in a
    data = json.loads(a)
    assert data["arena"] == memory.report(prog).planned and data["alignment"] == 64


# ----------------------------------------------------------------------------- command line


@pytest.fixture
def chain_path(tmp_path):
    m = model([h.make_node("Relu", ["x"], ["a"], name="r"), h.make_node("Exp", ["x"], ["b"], name="e"),
               h.make_node("Add", ["a", "b"], ["y"], name="add")], [fvi("x", ["batch", 256])], [fvi("y", ["batch", 256])])
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    return path


def test_inspect_memory_json_and_plot(tmp_path, cli, chain_path):
    code, out, _ = cli("inspect", chain_path, "--memory", "--json", "--input-shape", "x:2x256",
                       "--plot", tmp_path / "mem.png")
    assert code == 0
    rep = json.loads(out)
    assert rep["symbols"] == [] and rep["lower_bound"] == 2 * 2 * 256 * 4  # a and b live at the Add
    assert rep["planned"] >= rep["lower_bound"] and rep["no_reuse"] == 3 * 2 * 256 * 4
    assert (tmp_path / "mem.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = cli("inspect", chain_path, "--memory")
    assert code == 0 and "per unit of batch" in out


def test_inspect_memory_bad_input_shape_is_a_usage_error(cli, chain_path):
    code, _, err = cli("inspect", chain_path, "--memory", "--input-shape", "nope:1x2")
    assert code == 2 and "nope" in err
    code, _, err = cli("inspect", chain_path, "--plot", "x.png")
    assert code == 2


def test_compile_memory_report_writes_the_plan_into_metadata(tmp_path, cli, chain_path):
    code, out, _ = cli("compile", chain_path, "-o", tmp_path / "o.onnx", "--memory-report", "--json")
    assert code == 0
    report = json.loads(out)["memory"]
    meta = {p.key: p.value for p in onnx.load(tmp_path / "o.onnx").metadata_props}
    assert json.loads(meta[memory.METADATA_KEY])["arena"] == report["planned"]
    code, _, err = cli("compile", chain_path, "-o", tmp_path / "t.so", "--target", "llvm", "--memory-report")
    assert code == 2 and "onnx target" in err
