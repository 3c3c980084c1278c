"""The pipeline language and the -O levels."""

from __future__ import annotations

import pytest

from infoptc.errors import UsageError
from infoptc.pass_manager import Fixpoint
from infoptc.pipelines import OPT_LEVELS, parse_pipeline, pipeline_for_level


def test_parse_nested_fixpoint_and_print_back():
    items = parse_pipeline("dce, fixpoint{max-iterations=3}(eliminate-noops,dce), toposort")
    assert [type(i).__name__ for i in items] == ["DeadCodeElimination", "Fixpoint", "TopologicalSort"]
    assert isinstance(items[1], Fixpoint) and items[1].max_iterations == 3
    assert ",".join(map(str, items)) == "dce,fixpoint{max-iterations=3}(eliminate-noops,dce),toposort"
    assert parse_pipeline("") == []


def test_default_level_inline():
    items = parse_pipeline("default<O1>,toposort")
    assert ",".join(map(str, items)) == OPT_LEVELS["O1"] + ",toposort"


@pytest.mark.parametrize("text,message", [
    ("dce,,toposort", "expected a pass name"),
    ("dce toposort", "unexpected 'toposort'"),
    ("fixpoint(dce", "expected ')'"),
    ("dce{", "expected"),
    ("toposrt", "did you mean 'toposort'"),
    ("fixpoint{depth=2}(dce)", "unknown option 'depth' for fixpoint"),
    ("default<O9>", "unknown optimization level"),
])
def test_errors_are_usage_errors(text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_pipeline(text)


@pytest.mark.parametrize("level", ["O0", "O1", "O2", "O3", "Os"])
def test_every_level_parses_and_levels_accept_spellings(level):
    parse_pipeline(OPT_LEVELS[level])
    assert pipeline_for_level(level) == pipeline_for_level("-" + level) == OPT_LEVELS[level]
    if level[1].isdigit():
        assert pipeline_for_level(int(level[1])) == OPT_LEVELS[level]
