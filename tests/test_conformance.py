"""Conformance sweep: ONNX's node tests and light model-zoo models keep passing after infoptc.

For every node test that ONNX Runtime passes on the original model (expected outputs at rtol
1e-3, atol 1e-5), the model after -O3 must pass too, and must match ORT on the original within
the pipeline's contract. The light models go through every -O level against their stored
outputs. CI runs every 10th node test and one light model; ``pytest -m slow
tests/test_conformance.py`` runs all of them. Skips say that ORT cannot run (or fails) the
original; a failure names the first pass application that breaks the case.
"""

from __future__ import annotations

import functools

import _conformance as conf
import pytest

CI_EVERY = 10
CI_LIGHT = ["squeezenet"]
LEVELS = ["0", "1", "2", "3", "s"]


@functools.lru_cache(maxsize=1)
def node_root():
    return conf.node_data()


def pytest_generate_tests(metafunc):
    if "node_test" not in metafunc.fixturenames:
        return
    try:
        names = conf.node_names(node_root())
    except conf.Unavailable as e:
        metafunc.parametrize("node_test", [pytest.param("unavailable", marks=pytest.mark.skip(reason=str(e)))])
        return
    full = metafunc.definition.get_closest_marker("slow") is not None
    metafunc.parametrize("node_test", names if full else names[::CI_EVERY])


@pytest.fixture
def slow_only(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("full conformance sweep: select it with -m slow")


def check_node(name: str) -> None:
    case = conf.load_node_case(node_root(), name)
    try:
        reference = conf.original_outputs(case)
    except conf.OriginalFails as e:
        pytest.skip(f"original not runnable by ORT: {e}")
    why = conf.optimize_and_check(case, "3", reference=reference)
    if why:
        pytest.fail(f"{name}: {why}\n{conf.first_bad_pass(case, '3')}", pytrace=False)


def check_light(name: str, level: str) -> None:
    case = conf.load_light_case(name)
    try:
        reference = conf.original_outputs(case)
    except conf.OriginalFails as e:
        pytest.skip(f"original not runnable by ORT: {e}")
    why = conf.optimize_and_check(case, level, reference=reference)
    if why:
        pytest.fail(f"light {name}: {why}\n{conf.first_bad_pass(case, level)}", pytrace=False)


def test_node(node_test):
    check_node(node_test)


@pytest.mark.slow
def test_node_full(slow_only, node_test):
    check_node(node_test)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", CI_LIGHT)
def test_light(name, level):
    check_light(name, level)


@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", conf.light_names())
def test_light_full(slow_only, name, level):
    check_light(name, level)


def test_node_data_is_complete():
    """The cache holds the node tests of the installed onnx, with their data sets."""
    try:
        root = node_root()
    except conf.Unavailable as e:
        pytest.skip(str(e))
    names = conf.node_names(root)
    assert len(names) > 1000, f"only {len(names)} node tests in {root} ({conf.data_source()})"
    case = conf.load_node_case(root, "test_add")
    assert case.data_sets and all(feeds and expected for feeds, expected in case.data_sets)
