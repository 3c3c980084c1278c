"""Pass manager: registration, options, change detection, fixpoint, instruments."""

from __future__ import annotations

import pytest

import infoptc
from infoptc import Contract, Option, Pass, PassManager, PassResult, ir, register_pass
from infoptc.errors import CompileError, UsageError, VerificationError
from infoptc.instruments import BisectLimit, PrintAfter, Stats, TimePasses
from infoptc.pass_manager import PASS_REGISTRY, fingerprint, parse_size

from _models import chain, double_neg


@pytest.fixture
def scratch_registry():
    from infoptc.plugins import load_builtin_passes

    load_builtin_passes()
    saved = dict(PASS_REGISTRY)
    yield
    PASS_REGISTRY.clear()
    PASS_REGISTRY.update(saved)


def graph_of(m):
    return ir.to_graph(ir.infer_shapes(m))


def test_class_pass_options_defaults_and_str(scratch_registry):
    @register_pass
    class Demo(Pass):
        name = "demo-pass"
        summary = "a demo"
        options = {"limit": Option(4, "how many"), "size-limit": Option(1000, parse=parse_size), "flag": Option(False)}

        def run(self, graph, ctx):
            return PassResult(counters={"seen": len(graph.nodes)})

    p = Demo(**{"size-limit": "2KB", "flag": "true"})
    assert p.opts == {"limit": 4, "size-limit": 2000, "flag": True}
    assert str(p) == "demo-pass{size-limit=2000,flag=true}"
    with pytest.raises(UsageError, match="did you mean 'limit'"):
        Demo(limt=3)
    with pytest.raises(UsageError, match="bad value 'x'"):
        Demo(limit="x")


def test_function_pass_and_registry_rules(scratch_registry):
    @register_pass(name="count-relu", contract="exact", options={"scale": Option(1)})
    def count_relu(graph, ctx, scale):
        """count Relu nodes"""
        return {"relus": scale * sum(n.op == "Relu" for n in graph.nodes)}

    cls = PASS_REGISTRY["count-relu"]
    assert cls.summary == "count Relu nodes" and cls.contract is Contract.EXACT
    records = PassManager("count-relu{scale=3}").run(graph_of(chain()))
    assert records[0].counters == {"relus": 3} and records[0].changed is False
    with pytest.raises(ValueError, match="already registered"):
        register_pass(name="count-relu", summary="again")(lambda g, c: None)
    with pytest.raises(ValueError, match="kebab-case"):
        register_pass(name="Bad_Name", summary="x")(lambda g, c: None)


def test_manager_detects_changes_and_cleans_up(scratch_registry):
    @register_pass(name="drop-relu", summary="bypass Relu (wrong on purpose)", contract="lossy")
    def drop_relu(graph, ctx):
        relu = next(n for n in graph.nodes if n.op == "Relu")
        graph.outputs = [relu.inputs[0]]
        return None  # reports nothing: the manager must notice by itself

    g = graph_of(chain())
    records = PassManager("drop-relu").run(g)
    assert records[0].changed is True
    assert "Relu" not in {n.op for n in g.nodes}


def test_fixpoint_stops_when_nothing_changes(scratch_registry):
    calls = []

    @register_pass(name="shrink-once", summary="remove one Neg per run")
    def shrink(graph, ctx):
        calls.append(1)
        for n in graph.nodes:
            if n.op == "Neg":
                infoptc.rewrite.bypass(graph, n, n.inputs[0])
                return {"removed": 1}
        return {}

    g = graph_of(double_neg())
    PassManager("fixpoint(shrink-once)").run(g)
    assert len(calls) == 3  # two removals, then one run that changes nothing
    assert [n.op for n in g.nodes] == ["Relu", "Sigmoid"]
    calls.clear()
    PassManager("fixpoint{max-iterations=1}(shrink-once)").run(graph_of(double_neg()))
    assert len(calls) == 1


def test_a_crashing_pass_is_named(scratch_registry):
    @register_pass(name="crashy", summary="raises")
    def crashy(graph, ctx):
        raise KeyError("boom")

    with pytest.raises(CompileError, match="pass 'crashy' failed: KeyError"):
        PassManager("dce,crashy").run(graph_of(chain()))


def test_time_stats_and_print_after_instruments():
    timing, stats, dumps = TimePasses(), Stats(), []
    printer = PrintAfter({"eliminate-noops"}, dumps.append)
    PassManager("fixpoint(dce,eliminate-noops),toposort", [timing, stats, printer]).run(graph_of(chain()))
    names = [r[0] for r in timing.rows()]
    assert set(names) == {"dce", "eliminate-noops", "toposort"}
    assert dict((r[0], r[1]) for r in timing.rows())["dce"] == 2  # fixpoint ran twice
    assert stats.as_dict()["eliminate-noops"] == {"removed_identity": 1, "removed_dropout": 1, "removed_cast": 1}
    assert stats.as_dict()["dce"]["removed_nodes"] == 1
    assert len(dumps) == 2 and "IR after eliminate-noops" in dumps[0] and "MatMul" in dumps[0]


def test_bisect_limit_runs_only_the_first_n_applications():
    g = graph_of(chain())
    lines = []
    records = PassManager("dce,eliminate-noops,toposort", [BisectLimit(1, lines.append)]).run(g)
    assert [r.skipped for r in records] == [False, True, True]
    assert "Identity" in {n.op for n in g.nodes}  # eliminate-noops did not run
    assert lines[1] == "BISECT: NOT running pass (2) eliminate-noops"


def test_verify_each_names_the_pass_that_broke_the_model(scratch_registry, tmp_path):
    @register_pass(name="break-sigmoid", summary="turns Sigmoid into Relu (a planted bug)")
    def break_sigmoid(graph, ctx):
        for n in graph.nodes:
            if n.op == "Sigmoid":
                n.op = "Relu"
                return PassResult(changed=True, counters={"broken": 1})

    with pytest.raises(VerificationError, match="pass 'break-sigmoid' \\(application 3\\)"):
        infoptc.compile(double_neg(), passes="dce,toposort,break-sigmoid,dce", verify_each=True)
    # and a correct pipeline passes verification
    infoptc.compile(double_neg(), opt_level=2, verify_each=True)


def test_fingerprint_sees_rewiring_and_subgraphs():
    g = graph_of(chain())
    before = fingerprint(g)
    relu = next(n for n in g.nodes if n.op == "Relu")
    relu.op = "Sigmoid"
    assert fingerprint(g) != before


def test_pass_contract_of_a_pipeline():
    assert PassManager("dce,toposort").contract is Contract.EXACT
