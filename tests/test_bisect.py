"""Bisection: a deliberately wrong pass planted in a pipeline is named, with its application
index, what it rewrote and a reproducer; contracts decide what counts as broken."""

from __future__ import annotations

import argparse
import json
import shlex
import textwrap

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from infoptc import Contract, register_pass
from infoptc.bisect import bisect
from infoptc.cli.reduce import run_bisect_cli
from infoptc.pass_manager import PASS_REGISTRY


def _flip_relu(graph: gs.Graph, ctx):
    relus = [n for n in graph.nodes if n.op == "Relu"]
    if relus:
        relus[-1].op = "Sigmoid"
    return {"flipped": len(relus[-1:])}


def _nudge(graph: gs.Graph, scale: float) -> dict:
    """Scale every value of the last bias-like constant by (1 + scale), in place."""
    const = [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t.values.ndim == 1
             and t.values.dtype == np.float32 and t.values.size > 1][-1]
    const.values = (const.values * np.float32(1 + scale)).astype(np.float32)
    return {"nudged": 1}


def _nudge_exact(graph, ctx):
    return _nudge(graph, 1e-6)


def _nudge_reassoc(graph, ctx):
    return _nudge(graph, 1e-6)


@pytest.fixture(autouse=True, scope="module")
def planted_passes():
    """Register the wrong passes for this module only, so no other test meets them."""
    register_pass(name="bisect-test-flip-relu", summary="(test) turns the last Relu into a Sigmoid",
                  replace=True)(_flip_relu)
    # the same tiny numerical change, declared at two contracts
    register_pass(name="bisect-test-nudge-exact", summary="(test) nudges a bias, claims exact",
                  replace=True)(_nudge_exact)
    register_pass(name="bisect-test-nudge-reassoc", summary="(test) nudges a bias, reassociating",
                  contract=Contract.REASSOCIATING, replace=True)(_nudge_reassoc)
    yield
    for name in [n for n in PASS_REGISTRY if n.startswith("bisect-test-")]:
        del PASS_REGISTRY[name]


# no fixpoint, so application numbers are the pipeline positions
PIPELINE = "dce,toposort,eliminate-noops,dce,bisect-test-flip-relu,dce,toposort,dce"


def test_bisect_names_the_planted_pass_and_its_application(golden):
    probes = []
    result = bisect(str(golden("mlp")), {"passes": PIPELINE}, on_probe=probes.append)
    assert result.found
    assert result.index == 5 and result.pass_name == "bisect-test-flip-relu"
    assert result.total == 8
    assert result.contract == Contract.EXACT
    assert "differs from the original" in result.error
    (changed,) = result.rewrite.changed
    assert changed[0] == "/act2/Relu" and changed[1] == "Sigmoid" and "Relu -> Sigmoid" in changed[2]
    assert not result.rewrite.removed and not result.rewrite.added
    # the search: full pipeline broken, nothing applied fine, then a handful of probes
    assert probes[0].limit is None and not probes[0].ok
    assert probes[1].limit == 0 and probes[1].ok
    assert {p.limit: p.ok for p in probes if p.limit} == {4: True, 6: False, 5: False}
    argv = shlex.split(result.reproducer)
    assert argv[argv.index("--passes") + 1] == PIPELINE
    assert argv[argv.index("--opt-bisect-limit") + 1] == "5" and "--verify-each" in argv


def test_contract_decides_what_is_broken(golden):
    ok = bisect(str(golden("mlp")), {"passes": "dce,bisect-test-nudge-reassoc,toposort"})
    assert not ok.found and not ok.error and "stays equivalent" in ok.message
    bad = bisect(str(golden("mlp")), {"passes": "dce,toposort,bisect-test-nudge-exact,toposort"})
    assert bad.found and bad.index == 3 and bad.pass_name == "bisect-test-nudge-exact"
    assert bad.rewrite.constants_changed and not bad.rewrite.changed  # a value, not a node, changed


def test_reduce_cli_with_a_plugin_file(cli, golden, tmp_path):
    plugin = tmp_path / "bad_plugin.py"
    plugin.write_text(textwrap.dedent('''
        from infoptc import register_pass

        @register_pass(name="bisect-test-plugin-sigmoid", summary="(test plugin) Relu -> Sigmoid, wrongly")
        def swap(graph, ctx):
            for node in graph.nodes:
                if node.op == "Relu":
                    node.op = "Sigmoid"
                    return {"swapped": 1}
            return {"swapped": 0}
    '''))
    passes = "dce,toposort,dce,bisect-test-plugin-sigmoid,toposort"
    code, out, err = cli("reduce", golden("mlp"), "--passes", passes, "--load-plugin", plugin)
    assert code == 3, err
    assert "first bad pass application: 4 of 5" in out and "bisect-test-plugin-sigmoid" in out
    assert "/act1/Relu" in out and "--load-plugin" in out
    assert "bisect: limit 0" in err  # progress on stderr

    code, out, err = cli("reduce", golden("mlp"), "--passes", passes, "--load-plugin", plugin, "--json", "-q")
    data = json.loads(out)
    assert set(data) >= {"found", "index", "pass", "contract", "error", "rewrite", "reproducer", "probes"}
    assert (data["found"], data["index"], data["pass"]) == (True, 4, "bisect-test-plugin-sigmoid")
    assert data["rewrite"]["changed"][0]["node"] == "/act1/Relu"
    assert err == ""


def test_reduce_clean_pipeline_and_bad_input(cli, golden, tmp_path):
    code, out, err = cli("reduce", golden("mlp"), "--passes", "fixpoint(dce,eliminate-noops),toposort", "-q")
    assert code == 0 and out.startswith("PASSED")
    code, out, err = cli("reduce", tmp_path / "missing.onnx")
    assert code == 6 and "no such file" in err and "Traceback" not in err
    code, out, err = cli("reduce", golden("mlp"), "--passes", "dce,no-such-pass")
    assert code == 2 and "unknown pass" in err and len(err.strip().splitlines()) == 1


def test_run_bisect_cli_takes_compile_arguments(golden, capsys):
    """The entry point for `infoptc compile ... --bisect`: the compile parser's namespace."""
    args = argparse.Namespace(command="compile", model=str(golden("mlp")), opt_level=None, passes=PIPELINE,
                              target=None, input_shape=None, threads=None, load_plugin=[], json=True, quiet=True,
                              verbose=0, output=None, bisect=True)
    assert run_bisect_cli(args) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["index"] == 5 and data["pass"] == "bisect-test-flip-relu"
