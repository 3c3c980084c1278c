"""reorder-for-memory: a node order with a lower memory peak; outputs bit-identical."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import infoptc
from infoptc import memory, testing
from infoptc.errors import VerificationError
from golden_models import branchy


def _lower_bound(model) -> int:
    return memory.lower_bound(memory.program_of(model))


def test_branchy_model_runs_branch_by_branch_with_a_lower_peak():
    m = branchy.build(channels=8, size=6, blocks=2)
    out = infoptc.optimize(m, passes="reorder-for-memory")
    before, after = _lower_bound(m), _lower_bound(out)
    assert after <= 0.8 * before
    names = [n.name for n in out.graph.node]
    # each branch's expansion is reduced before the next branch expands
    assert names.index("/block0/branch0/reduce/Conv") < names.index("/block0/branch1/expand/Conv")
    testing.assert_equivalent(m, out, "exact", branchy.example_inputs(channels=8, size=6))
    meta = {p.key: p.value for p in out.metadata_props}
    assert memory.METADATA_KEY in meta


def test_the_order_survives_the_os_pipeline():
    m = branchy.build(channels=8, size=6, blocks=2)
    out = infoptc.optimize(m, opt_level="s")
    assert _lower_bound(out) < _lower_bound(infoptc.optimize(m, opt_level="2"))


def test_memory_limit_met_and_not_met():
    m = branchy.build(channels=8, size=6, blocks=2)
    best = memory.report(memory.program_of(infoptc.optimize(m, passes="reorder-for-memory"))).planned
    infoptc.compile(m, opt_level=1, memory_limit=best)
    with pytest.raises(VerificationError, match=f"needs a {best}-byte arena"):
        infoptc.compile(m, opt_level=1, memory_limit=best - 1)


def test_cli_memory_limit_not_met_exits_3_and_writes_nothing(tmp_path, cli):
    import onnx

    path = tmp_path / "b.onnx"
    onnx.save(branchy.build(channels=8, size=6, blocks=2), path)
    code, _, err = cli("compile", path, "-o", tmp_path / "o.onnx", "--memory-limit", "1KB")
    assert code == 3 and "best order found needs" in err
    assert not (tmp_path / "o.onnx").exists()
    code, _, err = cli("compile", path, "-o", tmp_path / "o.onnx", "--memory-limit", "lots")
    assert code == 2


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(model=testing.onnx_graphs(symbolic=False, max_ops=12), data=st.data())
def test_random_graphs_keep_outputs_and_never_raise_the_lower_bound(model, data):
    out = infoptc.optimize(model, passes="reorder-for-memory")
    assert _lower_bound(out) <= _lower_bound(model)
    inputs = data.draw(testing.model_inputs(model))
    testing.assert_equivalent(model, out, "exact", inputs)
