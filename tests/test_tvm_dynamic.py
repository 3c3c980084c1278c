"""Symbolic input dims on the llvm target (target option ``dynamic_dims``, on by default).

An unbound symbolic input dim stays a TIR variable: the manifest names it, ``run`` takes any
value of it, and the rules schedule its kernels (padded register tiles, guarded edges, parallel
loops that turn serial at run time below the fork/join threshold). A model whose shapes TVM's
frontend cannot keep symbolic falls back to binding the dims to 1, with the usual warning.

Numerical checks compare against ONNX Runtime with the tolerance of tests/test_tvm_backend.py.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest

tvm = pytest.importorskip("tvm")

import infoptc
from infoptc.analysis import estimate_flops
from infoptc.errors import UsageError
from infoptc.verify import OrtRunner, random_inputs
from onnx import TensorProto, helper, numpy_helper
from test_tvm_backend import _check


@pytest.fixture(scope="module")
def dynamic(golden):
    """``dynamic(name) -> (artifact, ORT runner of the original)``, compiled without input shapes."""

    @functools.cache
    def get(name: str):
        path = golden(name)
        return infoptc.compile(path, target="llvm"), OrtRunner(onnx.load(path))

    return get


def test_symbolic_dim_stays_symbolic_and_runs_at_any_value(dynamic, tmp_path):
    from infoptc.backends.tvm import read_manifest

    artifact, ort = dynamic("mlp")
    assert [s.shape for s in artifact.inputs] == [("batch", 64)]
    assert [s.shape for s in artifact.outputs] == [("batch", 10)]
    facts = artifact.describe()
    assert facts["symbolic_dims"] == ["batch"] and "defaulted_dims" not in facts
    assert facts["relax_options"]["dynamic_dims"] is True
    # batch 1 and 5 run the serial copies of the kernels, 300 the parallel ones.
    for batch in (1, 5, 300):
        feeds = random_inputs(artifact.model, seed=batch, dims={"batch": batch})
        assert feeds["x"].shape == (batch, 64)
        _check(ort.run(feeds), artifact.run(feeds))

    library = artifact.save(tmp_path / "mlp.so")[0]
    manifest = read_manifest(library)
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}]
    assert manifest["outputs"][0]["shape"] == ["batch", 10]
    assert manifest["symbolic_dims"] == ["batch"] and manifest["defaulted_dims"] == {}
    loaded = infoptc.load(library)
    x = np.random.default_rng(7).standard_normal((7, 64)).astype(np.float32)
    _check(ort.run({"x": x}), loaded.run({"x": x}))
    with pytest.raises(UsageError, match=r"expects \['batch', 64\]"):
        loaded.run({"x": np.zeros((2, 63), np.float32)})


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_transformers_keep_batch_and_seq_symbolic(name, dynamic):
    """GPT's position ids are Range(0, seq): imported as arange(0, seq) so later shapes stay known."""
    artifact, ort = dynamic(name)
    assert artifact.describe()["symbolic_dims"] == ["batch", "seq"]
    assert all(s.shape == ("batch", "seq") for s in artifact.inputs)
    for dims in ({"batch": 1, "seq": 7}, {"batch": 2, "seq": 19}):
        feeds = random_inputs(artifact.model, seed=1, dims=dims)
        outputs = artifact.run(feeds)
        assert next(iter(outputs.values())).shape[:2] == (dims["batch"], dims["seq"])
        _check(ort.run(feeds), outputs)


def test_inputs_must_agree_on_a_symbolic_dim(dynamic):
    artifact, _ = dynamic("bert")
    feeds = {"input_ids": np.zeros((1, 7), np.int64), "attention_mask": np.ones((1, 8), np.int64)}
    with pytest.raises(UsageError, match="dimension 'seq' is 7 in input 'input_ids' but 8"):
        artifact.run(feeds)


def test_cli_run_and_bench_a_symbolic_library(golden, cli, tmp_path):
    library = tmp_path / "mlp.so"
    code, _, err = cli("compile", golden("mlp"), "--target", "llvm", "-o", library, "-q")
    assert code == 0, err
    data = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=data)
    code, out, err = cli("run", library, "--inputs", tmp_path / "in.npz", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["shape"] == [6, 10]
    code, out, err = cli("bench", library, "--dim", "batch=4", "--iterations", "3", "--warmup", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["results"][0]["input_shapes"] == {"x": [4, 64]}
    # FLOPs of the .so come from the model recorded in it, at the dims it runs with
    code, out, err = cli("bench", golden("mlp"), library, "--dim", "batch=4", "--iterations", "3", "--warmup", "1",
                         "--json")
    assert code == 0, err
    flops = [r["flops_estimate"] for r in json.loads(out)["results"]]
    assert flops[1] == estimate_flops(infoptc.optimize(golden("mlp")), {"batch": 4}) and flops[0] > 0


def _shape_from_data_model() -> onnx.ModelProto:
    """y = x + Range(0.0, float(seq), 1.0): TVM's frontend computes a float Range's length at run
    time, so y's shape is unknown with a symbolic seq (with seq bound, the Range is a constant)."""
    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value)))

    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        const("one", np.int64(1)),
        helper.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
        helper.make_node("Cast", ["seq"], ["seq_f"], to=TensorProto.FLOAT),
        const("start", np.float32(0)), const("delta", np.float32(1)),
        helper.make_node("Range", ["start", "seq_f", "delta"], ["positions"]),
        helper.make_node("Add", ["x", "positions"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dims_that_cannot_stay_symbolic_are_set_to_one_with_the_warning(caplog):
    model = _shape_from_data_model()
    with caplog.at_level("WARNING", logger="infoptc"):
        artifact = infoptc.compile(model, target="llvm", opt_level=0)
    facts = artifact.describe()
    assert facts["defaulted_dims"] == {"x[0] (batch)": 1, "x[1] (seq)": 1}
    assert "symbolic_dims" not in facts and "at run time" in facts["symbolic_fallback"]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "set to 1" in warning and "--input-shape" in warning and "cannot keep them symbolic" in warning
    assert [s.shape for s in artifact.inputs] == [(1, 1)]
    x = np.array([[2.5]], np.float32)
    _check(OrtRunner(model).run({"x": x}), artifact.run({"x": x}))


def test_symbolic_kernels_are_scheduled_not_naive(golden):
    """BERT's kernels over (batch, seq) get the rules' schedules: matmuls tiled with padded
    accumulators, parallel and vectorized, and a run-time choice of their serial copy."""
    from infoptc.backends.tvm import build as _tvm_build, prepare as _tvm_prepare
    from tvm import tirx

    lowered = infoptc.compile(golden("bert"), target="llvm").model  # optimized for llvm, dims named
    prepared = _tvm_prepare.prepare(lowered, keep_symbolic=True)
    assert set(prepared.symbolic_dims.values()) == {"batch", "seq"}
    mod = _tvm_prepare.import_onnx(prepared.model)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    mod, _ = _tvm_build.optimize(mod, target, cpu_layout=True, schedules="rules")
    kernels = {gv.name_hint: f.script() for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    matmuls = {name: text for name, text in kernels.items() if "matmul" in name}
    assert len(matmuls) >= 5
    for name, text in matmuls.items():
        assert "seq" in text, name  # symbolic, not specialised
        assert "T.parallel" in text and "T.vectorized" in text, name
        assert "_pad_local" in text, name  # the register tile over a padded extent
        assert ">= T.int64(16384)" in text, name  # parallel above the threshold, serial below
    softmax = next(text for name, text in kernels.items() if "softmax" in name)
    assert "T.parallel" in softmax


def test_dynamic_dims_option(golden, tmp_path):
    from infoptc.targets import get_target

    llvm = get_target("llvm")
    assert llvm().dynamic_dims is True
    assert llvm(dynamic_dims="false").dynamic_dims is False
    assert llvm(tune=4, tuning_db=str(tmp_path)).dynamic_dims is False  # tuning measures static shapes
    with pytest.raises(UsageError, match="tuning needs static shapes"):
        llvm(tune=4, tuning_db=str(tmp_path), dynamic_dims=True)
    with pytest.raises(UsageError, match="dynamic_dims='maybe'"):
        llvm(dynamic_dims="maybe")
    # Bound dims are static whatever the option says.
    artifact = infoptc.compile(golden("mlp"), target="llvm", input_shapes={"x": (3, 64)})
    assert [s.shape for s in artifact.inputs] == [(3, 64)] and "symbolic_dims" not in artifact.describe()
