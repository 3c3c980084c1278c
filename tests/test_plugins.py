"""Plugins: the documented example loaded through its entry point, plugin files, and
broken plugins that warn instead of crashing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx

from _models import double_neg

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "infoptc_plugin_example"


def _fake_install(site: Path, module_src: Path, group: str = "infoptc.passes", name: str = "cancel-double-neg"):
    """Install like pip would: the module plus a dist-info with entry_points.txt."""
    shutil.copy(module_src, site / module_src.name)
    dist = site / "infoptc_plugin_example-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: infoptc-plugin-example\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {module_src.stem}\n")


def _infoptc(*argv, pythonpath: Path | None = None):
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "infoptc.cli", *map(str, argv)], capture_output=True, text=True, env=env)


def test_example_plugin_through_its_entry_point(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _fake_install(site, EXAMPLE / "infoptc_plugin_example.py")
    entry = (EXAMPLE / "pyproject.toml").read_text()
    assert 'cancel-double-neg = "infoptc_plugin_example"' in entry  # the docs declare what we install here
    proc = _infoptc("passes", "--json", pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    assert "cancel-double-neg" in {r["name"] for r in json.loads(proc.stdout)}
    model = tmp_path / "m.onnx"
    onnx.save(double_neg(), model)
    proc = _infoptc(model, "--passes", "cancel-double-neg,dce", "-o", tmp_path / "o.onnx", "--json", "--stats",
                    pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["cancel-double-neg"] == {"rewritten": 1}
    assert [n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node] == ["Relu", "Sigmoid"]


def test_plugin_file_with_load_plugin(tmp_path, cli):
    model = tmp_path / "m.onnx"
    onnx.save(double_neg(), model)
    code, out, err = cli(model, "--load-plugin", EXAMPLE / "infoptc_plugin_example.py",
                         "--passes", "cancel-double-neg{max-rewrites=0}", "-o", tmp_path / "o.onnx", "--json")
    assert code == 0, err
    assert json.loads(out)["after"]["nodes"] == 4  # max-rewrites=0 leaves the graph alone


def test_broken_plugins_warn_and_name_themselves(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("import definitely_not_a_module_xyz\n")
    _fake_install(site, broken, name="broken")
    proc = _infoptc("passes", "--json", "--load-plugin", tmp_path / "also_missing.py", pythonpath=site)
    assert proc.returncode == 0
    assert "dce" in {r["name"] for r in json.loads(proc.stdout)}
    assert "plugin broken (broken_plugin) failed to load" in proc.stderr
    assert "ModuleNotFoundError" in proc.stderr and "also_missing.py" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plugin_registering_a_duplicate_name_is_a_warning(tmp_path, cli):
    plugin = tmp_path / "dup.py"
    plugin.write_text("from infoptc import register_pass\n@register_pass(name='dce', summary='impostor')\n"
                      "def dce(graph, ctx):\n    pass\n")
    code, out, err = cli("passes", "--json", "--load-plugin", plugin)
    assert code == 0 and "already registered" in err
    assert {r["name"]: r["summary"] for r in json.loads(out)}["dce"] != "impostor"


def test_a_target_plugin_file(tmp_path, cli):
    plugin = tmp_path / "echo_target.py"
    plugin.write_text(
        "import numpy as np\n"
        "from infoptc import Artifact, Target, register_target\n"
        "class EchoArtifact(Artifact):\n"
        "    target = 'echo'\n"
        "    def __init__(self, model): self.model = model\n"
        "    def save(self, path):\n"
        "        open(path, 'w').write(str(len(self.model.graph.node)))\n"
        "        return [path]\n"
        "@register_target\n"
        "class EchoTarget(Target):\n"
        "    name = 'echo'\n"
        "    summary = 'writes the node count'\n"
        "    suffix = '.txt'\n"
        "    def lower(self, model): return EchoArtifact(model)\n")
    model = tmp_path / "m.onnx"
    onnx.save(double_neg(), model)
    code, out, err = cli("targets", "--json", "--load-plugin", plugin)
    assert "echo" in {t["name"] for t in json.loads(out)}
    code, out, err = cli(model, "--load-plugin", plugin, "--target", "echo", "-O0", "-o", tmp_path / "o.txt")
    assert code == 0, err
    assert (tmp_path / "o.txt").read_text() == "4"
