"""Bad input: each gets a clear one-line error, the right exit code, no traceback and no
output file left behind."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh

from _models import chain, fvi, model

USAGE, VERIFY, COMPILE, MISSING, BAD_MODEL = 2, 3, 4, 5, 6


def _write(tmp_path, m, name="m.onnx"):
    path = tmp_path / name
    path.write_bytes(m.SerializeToString() if isinstance(m, onnx.ModelProto) else m)
    return path


def _cycle():
    nodes = [h.make_node("Add", ["x", "b"], ["a"], name="n1"), h.make_node("Relu", ["a"], ["b"], name="n2"),
             h.make_node("Neg", ["a"], ["y"], name="n3")]
    return model(nodes, [fvi("x", [2])], [fvi("y", [2])])


def _duplicate_names():
    nodes = [h.make_node("Relu", ["x"], ["a"], name="n1"), h.make_node("Neg", ["x"], ["a"], name="n2"),
             h.make_node("Abs", ["a"], ["y"], name="n3")]
    return model(nodes, [fvi("x", [2])], [fvi("y", [2])])


def _unknown_op():
    return model([h.make_node("FrobnicateV2", ["x"], ["y"], name="weird")], [fvi("x", [2])], [fvi("y", [2])])


def _unknown_domain():
    m = model([h.make_node("Relu", ["x"], ["y"], domain="org.nowhere", name="r")], [fvi("x", [2])], [fvi("y", [2])])
    m.opset_import.append(h.make_opsetid("org.nowhere", 1))
    return m


def _future_opset():
    return model([h.make_node("Relu", ["x"], ["y"])], [fvi("x", [2])], [fvi("y", [2])],
                 opset=onnx.defs.onnx_opset_version() + 5)


def _empty_graph():
    return model([], [fvi("x", [2])], [fvi("y", [2])])


def _lying_tensor():
    t = nh.from_array(np.zeros((4,), np.float32), "w")
    t.dims[:] = [1000000, 1000000]  # absurd shape for 16 bytes of data
    return model([h.make_node("Add", ["x", "w"], ["y"])], [fvi("x", [4])], [fvi("y", [4])], [t])


def _inconsistent_shapes():
    w = nh.from_array(np.ones((4, 5), np.float32), "W")
    return model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [fvi("x", [2, 3])], [fvi("y", [2, 5])], [w])


def _missing_external(tmp_path):
    m = chain()
    t = m.graph.initializer[0]
    onnx.external_data_helper.set_external_data(t, location="weights.bin", offset=0, length=48)
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")
    return m


def _outside_external(tmp_path):
    m = _missing_external(tmp_path)
    entry = next(e for e in m.graph.initializer[0].external_data if e.key == "location")
    entry.value = "../weights.bin"
    (tmp_path / "weights.bin").write_bytes(b"\0" * 48)
    return m


BAD_MODELS = {
    "truncated": lambda tmp: chain().SerializeToString()[:57],
    "not protobuf": lambda tmp: b"\xff\xfe this is not an onnx file \x00\x01",
    "empty file": lambda tmp: b"",
    "empty graph": lambda tmp: _empty_graph(),
    "cycle": lambda tmp: _cycle(),
    "duplicate names": lambda tmp: _duplicate_names(),
    "unknown op": lambda tmp: _unknown_op(),
    "unknown domain": lambda tmp: _unknown_domain(),
    "opset too new": lambda tmp: _future_opset(),
    "absurd tensor shape": lambda tmp: _lying_tensor(),
    "inconsistent shapes": lambda tmp: _inconsistent_shapes(),
    "missing external data": _missing_external,
    "external data outside folder": _outside_external,
}

MESSAGES = {
    "truncated": "not an ONNX model", "not protobuf": "not an ONNX model", "empty file": "empty file",
    "empty graph": "graph is empty", "cycle": "cycle", "duplicate names": "duplicate tensor name 'a'",
    "unknown op": "unknown op 'FrobnicateV2'", "unknown domain": "unknown op domain 'org.nowhere'",
    "opset too new": "newer than the installed onnx", "absurd tensor shape": "holds 16 bytes",
    "inconsistent shapes": "node 'mm' (MatMul): incompatible dimensions for matrix multiplication; "
                           "inputs x [2, 3], W [4, 5]",
    "missing external data": "external data file 'weights.bin' is missing",
    "external data outside folder": "leaves the model's folder",
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_is_a_one_line_error_with_exit_6(tmp_path, cli, case):
    (tmp_path / "model").mkdir()
    path = _write(tmp_path / "model", BAD_MODELS[case](tmp_path))
    out = tmp_path / "out.onnx"
    code, stdout, stderr = cli(path, "-o", out)
    assert code == BAD_MODEL, stderr
    assert MESSAGES[case] in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"] + (
        ["weights.bin"] if case == "external data outside folder" else [])


def test_missing_input_file(tmp_path, cli):
    code, _, stderr = cli(tmp_path / "nope.onnx")
    assert code == BAD_MODEL and "no such file" in stderr


@pytest.mark.parametrize("argv,message", [
    (["--frobnicate"], "unrecognized arguments: --frobnicate (see 'infoptc compile --help')"),
    (["--passes", "dce,eliminate-noop"], "did you mean 'eliminate-noops'"),
    (["--passes", "toposort{depth=3}"], "unknown option 'depth' for pass 'toposort'"),
    (["--passes", "fixpoint(dce"], "expected ')'"),
    (["-O", "7"], "invalid choice"),
    (["--target", "onxx"], "did you mean 'onnx'"),
    (["--input-shape", "x:1xfoo"], "bad --input-shape"),
    (["--input-shape", "nope:1x4"], "not a model input"),
])
def test_usage_errors_exit_2(tmp_path, cli, argv, message):
    path = _write(tmp_path, chain())
    code, stdout, stderr = cli(path, "-o", tmp_path / "out.onnx", *argv)
    assert code == USAGE, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_bad_pass_option_value(tmp_path, cli):
    plugin = tmp_path / "p.py"
    plugin.write_text(
        "from infoptc import register_pass, Option\n"
        "@register_pass(name='opt-demo', summary='demo', options={'limit': Option(3), 'size': Option(0, parse=__import__('infoptc').pass_manager.parse_size)})\n"
        "def opt_demo(graph, ctx, limit, size):\n    return None\n")
    path = _write(tmp_path, chain())
    for value, message in (("limit=abc", "bad value 'abc' for option 'limit'"), ("size=12XB", "expected a size")):
        code, _, stderr = cli(path, "--load-plugin", plugin, "--passes", "opt-demo{%s}" % value, "-o", tmp_path / "o.onnx")
        assert code == USAGE and message in stderr, stderr


@pytest.mark.parametrize("argv,message", [
    (["benhc", "model.onnx"], "unknown command 'benhc'; did you mean 'bench'?"),
    (["inspcet", "model.onnx"], "unknown command 'inspcet'; did you mean 'inspect'?"),
    (["nosuch.onnx"], "nosuch.onnx: no such file"),  # a path stays a model path
    (["bench", "m.onnx", "--frobnicate"], "unrecognized arguments: --frobnicate (see 'infoptc bench --help')"),
])
def test_misspelt_command_or_flag_points_at_the_right_help(tmp_path, monkeypatch, cli, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, stderr = cli(*argv)
    assert code in (USAGE, BAD_MODEL) and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["missing-folder", "proc"])
def test_unwritable_output(tmp_path, cli, where):
    path = _write(tmp_path, chain())
    out = tmp_path / "missing" / "out.onnx" if where == "missing-folder" else "/proc/infoptc-out.onnx"
    code, _, stderr = cli(path, "-o", out)
    assert code == USAGE and "cannot write" in stderr and len(stderr.strip().splitlines()) == 1


def test_output_must_not_be_the_input(tmp_path, cli):
    path = _write(tmp_path, chain())
    before = path.read_bytes()
    code, _, stderr = cli(path, "-o", path)
    assert code == USAGE and "is the input model" in stderr
    assert path.read_bytes() == before


def test_real_process_has_no_traceback_and_nonzero_exit(tmp_path):
    path = _write(tmp_path, b"garbage")
    proc = subprocess.run([sys.executable, "-m", "infoptc.cli", str(path)], capture_output=True, text=True)
    assert proc.returncode == BAD_MODEL
    assert proc.stdout == "" and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def _paddle_style(dim):
    """An input declared [DIM, 3], as PaddlePaddle exports declare a dynamic batch (DIM = -1)."""
    b = nh.from_array(np.arange(3, dtype=np.float32), "b")
    return model([h.make_node("Add", ["x", "b"], ["a"]), h.make_node("Relu", ["a"], ["y"])],
                 [fvi("x", [dim, 3])], [fvi("y", [dim, 3])], [b], opset=12)


def test_minus_one_dim_is_a_symbolic_dim(tmp_path, cli):
    path = _write(tmp_path, _paddle_style(-1))
    code, _, stderr = cli(path, "-o", tmp_path / "out.onnx")
    assert code == 0, stderr
    out = onnx.load(tmp_path / "out.onnx")
    assert [d.dim_param or d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == ["x_dim0", 3]
    x = np.arange(-6, 6, dtype=np.float32).reshape(4, 3)
    code, stdout, stderr = cli("run", tmp_path / "out.onnx", "--dim", "x_dim0=4", "--json")
    assert code == 0 and json.loads(stdout)[0]["shape"] == [4, 3], stderr
    from infoptc.targets import load

    np.testing.assert_array_equal(load(tmp_path / "out.onnx").run({"x": x})["y"], np.maximum(x + np.arange(3), 0))


def test_other_negative_dims_stay_errors(tmp_path, cli):
    path = _write(tmp_path, _paddle_style(-2))
    code, _, stderr = cli(path, "-o", tmp_path / "out.onnx")
    assert code == BAD_MODEL and "tensor 'x' has a negative dimension -2" in stderr
