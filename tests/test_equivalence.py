"""Every -O level keeps the outputs of every golden model, within the contract of its pipeline.

For inputs drawn by ``infoptc.testing.model_inputs`` (symbolic dims bound consistently, ids
inside the vocabulary, masks 0/1), the compiled model must reproduce ONNX Runtime's outputs on
the original: bit for bit where the pipeline is ``exact`` (-O1), within the ``reassociating``
tolerances otherwise. Each model is compiled once per level per session.
"""

from __future__ import annotations

import os

import infoptc
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from infoptc import Contract, PassManager, testing
from infoptc.pipelines import pipeline_for_level

from golden_models import MODEL_NAMES

LEVELS = ["1", "2", "3", "s"]
EXAMPLES = int(os.environ.get("INFOPTC_EQUIV_EXAMPLES", "5"))
# Symbolic dims: the transformers take up to 128 positions; a few keep them fast.
DIMS = {"bert": {"batch": st.integers(1, 2), "seq": st.integers(1, 8)},
        "gpt": {"batch": st.integers(1, 2), "seq": st.integers(1, 8)}}

_checks: dict[tuple[str, str], testing.Equivalence] = {}


def contract_of(level: str) -> Contract:
    return PassManager(pipeline_for_level(level)).contract


def equivalence(golden, name: str, level: str) -> testing.Equivalence:
    """The compiled model and its sessions, built once per (model, level)."""
    key = (name, level)
    if key not in _checks:
        if name == "digits_cnn":
            pytest.importorskip("sklearn")
        path = golden(name)
        artifact = infoptc.compile(path, opt_level=level)
        _checks[key] = testing.Equivalence(onnx.load(path), artifact, contract_of(level))
    return _checks[key]


def test_o1_is_exact():
    assert contract_of("1") == Contract.EXACT


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", MODEL_NAMES)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_level_keeps_outputs(golden, name, level, data):
    check = equivalence(golden, name, level)
    inputs = data.draw(testing.model_inputs(check.original, dims=DIMS.get(name)), label="inputs")
    check.check(inputs)
