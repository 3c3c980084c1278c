"""The README stays true: its test command is what CI runs, the config keys and -O3's contrib
ops are as it says, the outputs of its commands are ignored by git."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _code_blocks() -> list[str]:
    return re.findall(r"```\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(b.strip() for b in _code_blocks() if "python -m pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == test_command


def test_the_readme_names_the_real_config_keys_and_how_to_run_slow_tests():
    from infoptc import config

    keys = re.findall(r"`([a-z-]+) = ", README)
    assert "opt-level" in keys and all(k in config.KEYS for k in keys), keys
    assert "python -m pytest -m slow" in README and "slow:" in (ROOT / "pyproject.toml").read_text()


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_readme_commands_outputs_are_ignored_by_git():
    outputs = set(re.findall(r"-o (\S+\.(?:onnx|so))", README))
    assert {"resnet.opt.onnx", "bert.O3.onnx", "model.so"} <= outputs
    ignored = subprocess.run(["git", "check-ignore", *sorted(outputs)], cwd=ROOT, capture_output=True, text=True)
    assert set(ignored.stdout.split()) == outputs - {"out.onnx"}  # `-o out.onnx`: the user's choice of name


def test_o3_on_the_onnx_target_emits_onnx_runtime_ops_and_o1_does_not(golden):
    import infoptc
    from infoptc.analysis import op_histogram

    def contrib(level):
        return {op for op in op_histogram(infoptc.optimize(golden("bert"), opt_level=level)) if "::" in op}

    assert contrib("3") & {"com.microsoft::MultiHeadAttention", "com.microsoft::Attention"}  # packed Q/K/V or not
    assert contrib("3") & {"com.microsoft::Gelu", "com.microsoft::BiasGelu"}  # the bias joins the GELU at -O3
    assert contrib("1") == set() and contrib("s") == set()
