"""The command line: bare form, subcommands, JSON output, config files, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from _models import chain


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(chain(), path)
    return path


def test_bare_form_compiles_and_prints_before_after_table(tmp_path, cli, model_path):
    code, out, err = cli(model_path, "-O2", "-o", tmp_path / "o.onnx")
    assert code == 0, err
    assert "before / after" in out and "Identity" in out and "wrote" in out
    assert err == ""  # nothing on stderr when all is well
    m = onnx.load(tmp_path / "o.onnx")
    assert [n.op_type for n in m.graph.node] == ["MatMul", "Relu"]


def test_default_output_name_in_current_folder(tmp_path, cli, model_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(model_path)
    assert code == 0, err
    assert (tmp_path / "m.opt.onnx").exists()


def test_compile_json_report(tmp_path, cli, model_path):
    code, out, _ = cli("compile", model_path, "-o", tmp_path / "o.onnx", "--json", "--stats", "--time-passes")
    report = json.loads(out)
    assert report["before"]["nodes"] == 6 and report["after"]["nodes"] == 2
    assert report["stats"]["eliminate-noops"]["removed_identity"] == 1
    assert {"dce", "eliminate-noops", "toposort"} <= {r["pass"] for r in report["time_passes"]}
    assert report["target"]["target"] == "onnx"


def test_print_after_goes_to_stderr(tmp_path, cli, model_path):
    code, out, err = cli(model_path, "-o", tmp_path / "o.onnx", "--print-after", "all", "--json")
    assert code == 0
    json.loads(out)  # stdout stays machine-readable
    assert "IR after dce" in err and "IR after eliminate-noops" in err


def test_opt_bisect_limit_lists_what_ran(tmp_path, cli, model_path):
    code, _, err = cli(model_path, "-o", tmp_path / "o.onnx", "--opt-bisect-limit", "1")
    assert code == 0
    assert "BISECT: running pass (1) dce" in err and "BISECT: NOT running pass (2) eliminate-noops" in err
    assert "Identity" in {n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node}


def test_passes_lists_every_pass_and_pipelines(cli):
    code, out, _ = cli("passes", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert {"dce", "eliminate-noops", "toposort"} <= set(rows)
    assert all(r["summary"] for r in rows.values())
    from infoptc.pipelines import OPT_LEVELS

    for level in ("0", "1", "2", "3", "s"):
        code, out, _ = cli("passes", "--pipeline", f"-O{level}")
        assert code == 0 and out == OPT_LEVELS[f"O{level}"] + "\n"


def test_piped_tables_are_never_cut(cli):
    """stdout is a pipe here (captured): every cell whole, however long, as `infoptc passes | cat`."""
    from infoptc.pass_manager import PASS_REGISTRY

    code, out, _ = cli("passes")
    assert code == 0 and "…" not in out
    for name, cls in PASS_REGISTRY.items():
        assert name in out and cls.summary in out


def test_inspect_reports_symbolic_dims_histogram_params_flops(cli, model_path):
    code, out, _ = cli("inspect", model_path, "--json")
    info = json.loads(out)
    assert info["opset"] == 17
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
    assert info["histogram"]["MatMul"] == 1 and info["nodes"] == 6
    assert info["parameters"] == 12
    assert info["flops"] == 4 + 2 * 3 * 4 + 4 * 3  # Identity on [1,4], MatMul [1,4]x[4,3], 4 ops on [1,3]
    code, out, _ = cli("inspect", model_path)
    assert "x: float32[batch, 4]" in out


def test_run_with_npz_inputs(tmp_path, cli, model_path):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.savez(tmp_path / "in.npz", x=x)
    code, out, err = cli("run", model_path, "--inputs", tmp_path / "in.npz", "--save-outputs", tmp_path / "o.npz", "--json")
    assert code == 0, err
    w = onnx.numpy_helper.to_array(chain().graph.initializer[0])
    np.testing.assert_allclose(np.load(tmp_path / "o.npz")["y"], np.maximum(x @ w, 0), rtol=1e-6)
    np.savez(tmp_path / "bad.npz", x=x.astype(np.float64))
    code, _, err = cli("run", model_path, "--inputs", tmp_path / "bad.npz")
    assert code == 2 and "dtype float64" in err


def test_run_generates_inputs_with_dims(cli, model_path):
    code, out, err = cli("run", model_path, "--json")
    assert code == 0, err
    assert json.loads(out)[0]["shape"] == [2, 3]  # x: [batch, 4], the symbolic batch defaults to 2
    code, out, err = cli("run", model_path, "--dim", "batch=5", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["shape"] == [5, 3]
    code, _, err = cli("run", model_path, "--dim", "batch=0")
    assert code == 2 and "--dim" in err


def test_run_shows_where_the_inputs_came_from_and_output_statistics(tmp_path, cli, model_path):
    code, out, err = cli("run", model_path, "--seed", "4")
    assert code == 0, err
    assert "inputs: generated (seed 4): x 2x4 float32" in out
    for col in ("output", "dtype", "shape", "min", "mean", "max", "std", "2x3"):
        assert col in out
    (row,) = json.loads(cli("run", model_path, "--seed", "4", "--json")[1])
    assert row["min"] <= row["mean"] <= row["max"] and row["std"] >= 0
    np.savez(tmp_path / "in.npz", x=np.ones((3, 4), np.float32))
    code, out, err = cli("run", model_path, "--inputs", tmp_path / "in.npz")
    assert code == 0 and f"inputs: {tmp_path / 'in.npz'}: x 3x4 float32" in out, err


def test_verbose_names_each_stage_and_quiet_pipes_show_nothing(tmp_path, cli, model_path):
    code, _, err = cli(model_path, "-o", tmp_path / "a.onnx", "-v")
    assert code == 0
    for line in (f"infoptc: info: loading {model_path}", "infoptc: info: running the -O2 pipeline",
                 "infoptc: info: lowering for the onnx target", f"infoptc: info: writing {tmp_path / 'a.onnx'}"):
        assert line in err, err
    assert cli(model_path, "-o", tmp_path / "b.onnx")[2] == ""  # stderr is no terminal here: no spinner


def test_long_steps_show_a_spinner_on_a_terminal_only(monkeypatch):
    import io
    import time

    from rich.console import Console

    from infoptc.cli import output
    from infoptc.progress import stage

    def shown(quiet: bool, terminal: bool, own_display: bool = False) -> str:
        stream = io.StringIO()
        monkeypatch.setattr(output, "err", Console(file=stream, force_terminal=terminal, width=80))
        with output.stage_spinner(quiet):
            with stage("building the library", own_display=own_display) as step:
                step.update("building the library: kernel 3 of 7")
                time.sleep(0.3)
        return stream.getvalue()

    assert "building the library: kernel 3 of 7" in shown(quiet=False, terminal=True)
    assert shown(quiet=True, terminal=True) == ""
    assert shown(quiet=False, terminal=False) == ""
    assert "building" not in shown(quiet=False, terminal=True, own_display=True)  # its own bar has the terminal


def test_targets_lists_onnx(cli):
    code, out, _ = cli("targets", "--json")
    assert "onnx" in {t["name"] for t in json.loads(out)}


def test_config_file_sets_defaults_and_flags_win(tmp_path, cli, model_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "infoptc.toml").write_text('opt-level = "0"\nstats = true\n')
    code, out, _ = cli(model_path, "-o", "a.onnx", "--json")
    report = json.loads(out)
    assert report["after"]["nodes"] == 6 and "stats" in report  # -O0 and --stats from the file
    code, out, _ = cli(model_path, "-o", "b.onnx", "-O1", "--json")
    assert json.loads(out)["after"]["nodes"] == 2  # the flag wins
    (tmp_path / "infoptc.toml").unlink()
    (tmp_path / "pyproject.toml").write_text('[tool.infoptc]\npasses = "dce"\n')
    code, out, _ = cli(model_path, "-o", "c.onnx", "--json")
    assert json.loads(out)["pipeline"] == "dce"
    (tmp_path / "pyproject.toml").write_text('[tool.infoptc]\nopt-levle = "2"\n')
    code, _, err = cli(model_path, "-o", "d.onnx")
    assert code == 2 and "unknown setting 'opt-levle'" in err


def test_console_script_installed_and_no_command_prints_help():
    exe = os.path.join(os.path.dirname(sys.executable), "infoptc")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("infoptc ")
    proc = subprocess.run([exe], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
