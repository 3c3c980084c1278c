"""`infoptc verify REFERENCE CANDIDATE`: pass/fail, reported errors and minimum atol, tolerance
flags, user inputs, and one-line errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import infoptc
from infoptc.compare import min_atol, parse_tolerances, resolve_tolerances
from infoptc.errors import UsageError


@pytest.fixture(scope="module")
def models(tmp_path_factory, golden):
    """The mlp golden model, its -O2 build, and a copy with the last bias nudged by 1e-3."""
    folder = tmp_path_factory.mktemp("verify")
    src = golden("mlp")
    opt = folder / "mlp.opt.onnx"
    infoptc.compile(src, opt_level=2).save(opt)
    model = onnx.load(src)
    init = next(t for t in model.graph.initializer if t.name == "fc3.bias")  # shifts every output
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(1e-3), init.name))
    nudged = folder / "mlp.nudged.onnx"
    onnx.save(model, nudged)
    return {"src": src, "opt": opt, "nudged": nudged}


def test_equivalent_models_pass(cli, models):
    code, out, err = cli("verify", models["src"], models["opt"], "--samples", "2")
    assert code == 0, err
    assert out.strip().endswith("PASSED")
    for col in ("max abs err", "max rel err", "min atol to pass", "y", "float32"):
        assert col in out


def test_a_difference_fails_with_exit_3_and_the_minimum_atol_is_right(cli, models):
    code, out, err = cli("verify", models["src"], models["nudged"], "--json")
    assert code == 3
    data = json.loads(out)
    assert set(data) >= {"reference", "candidate", "inputs", "outputs", "passed"}
    (y,) = data["outputs"]
    assert set(y) >= {"name", "dtype", "atol", "rtol", "max_abs_error", "max_rel_error", "min_atol_to_pass", "passed"}
    assert data["passed"] is False and y["passed"] is False
    assert (y["atol"], y["rtol"]) == (1e-5, 1e-4)  # float32 defaults
    need = y["min_atol_to_pass"]
    assert 1e-5 < need <= y["max_abs_error"]
    # the reported minimum is what it claims: a little more passes, a little less fails
    assert cli("verify", models["src"], models["nudged"], "--atol", f"{need * 1.01}")[0] == 0
    assert cli("verify", models["src"], models["nudged"], "--atol", f"y:{need * 0.99}")[0] == 3
    code, out, err = cli("verify", models["src"], models["nudged"])
    assert "FAILED" in out and "out of tolerance" in out
    assert "output 'y'" in err and "Traceback" not in err


def test_each_output_says_which_bound_decided(cli, models):
    """A max abs err above atol that passes did so on rtol: the row says so, not a bare "ok"."""
    code, out, _ = cli("verify", models["src"], models["opt"])
    assert code == 0 and "ok: abs err <= atol " in out
    code, out, _ = cli("verify", models["src"], models["nudged"], "--rtol", "10")  # 1e-3 > atol, within rtol
    assert code == 0 and "ok: abs err <= atol + rtol*|ref|" in out, out
    code, out, _ = cli("verify", models["src"], models["nudged"], "--json")
    assert code == 3 and json.loads(out)["outputs"][0]["criterion"] == "abs err > atol + rtol*|ref|"
    code, out, _ = cli("verify", models["src"], models["nudged"])
    assert "FAILED: abs err > atol + rtol*|ref| in 3 sample(s)" in out


def test_exact_comparison_with_zero_tolerances(cli, models):
    code, out, _ = cli("verify", models["src"], models["src"], "--atol", "0", "--rtol", "0", "--json")
    assert code == 0 and json.loads(out)["outputs"][0]["exact"] is True


def test_user_inputs_file_and_folder(cli, models, tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"s{i}.npz", x=rng.standard_normal((2 + i, 64)).astype(np.float32))
    code, out, err = cli("verify", models["src"], models["nudged"], "--inputs", folder, "--json")
    data = json.loads(out)
    assert code == 3 and data["inputs"] == str(folder)
    assert data["outputs"][0]["failed_samples"] == ["s0.npz", "s1.npz", "s2.npz"]
    code, out, err = cli("verify", models["src"], models["opt"], "--inputs", folder / "s1.npz")
    assert code == 0, err


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((2, 64), np.float64)}, "dtype float64"),
    ({"x": np.zeros((2, 63), np.float32)}, "shape [2, 63]"),
    ({"x": np.zeros((64,), np.float32)}, "rank"),
    ({"input": np.zeros((2, 64), np.float32)}, "missing input(s) 'x'"),
])
def test_bad_inputs_one_line_exit_2(cli, models, tmp_path, arrays, message):
    path = tmp_path / "in.npz"
    np.savez(path, **arrays)
    code, out, err = cli("verify", models["src"], models["opt"], "--inputs", path)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_mismatched_models_and_missing_files(cli, models, golden, tmp_path):
    code, out, err = cli("verify", models["src"], golden("bert"))
    assert code == 2 and "different inputs" in err and "'x'" in err and "'input_ids'" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = cli("verify", tmp_path / "nope.onnx", models["src"])
    assert code == 6 and "no such file" in err and "Traceback" not in err
    code, out, err = cli("verify", models["src"], models["opt"], "--inputs", tmp_path / "none.npz")
    assert code == 2 and "no such inputs file" in err
    code, out, err = cli("verify", models["src"], models["opt"], "--atol", "nope:1e-3")
    assert code == 2 and "not an output" in err
    code, out, err = cli("verify", models["src"], models["opt"], "--rtol", "abc")
    assert code == 2 and "bad --rtol" in err


def test_tolerance_helpers():
    assert parse_tolerances(["1e-3", "logits:0.5", "a:b:2"], "--atol") == (1e-3, {"logits": 0.5, "a:b": 2.0})
    with pytest.raises(UsageError):
        parse_tolerances(["-1"], "--atol")
    tols = resolve_tolerances({"f": "float32", "h": "float16", "i": "int64"}, atol=["h:0.1"], rtol=["0.01"])
    assert (tols["f"].atol, tols["f"].rtol) == (1e-5, 0.01)
    assert (tols["h"].atol, tols["h"].rtol) == (0.1, 0.01)
    assert tols["i"].atol == 0.0  # integer outputs compare exactly
    ref = np.array([1.0, 100.0, -2.0], np.float32)
    got = np.array([1.5, 101.0, -2.0], np.float32)
    # |err| - rtol*|ref| = [0.5 - 0.01, 1 - 1, 0]: atol 0.49 suffices at rtol 0.01
    assert min_atol(ref, got, 0.01) == pytest.approx(0.49, rel=1e-6)
    assert min_atol(np.array([np.nan]), np.array([1.0]), 0.0) == np.inf
    assert min_atol(np.array([1, 2]), np.array([1, 3]), 0.0) is None
