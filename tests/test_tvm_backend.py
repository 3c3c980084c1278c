"""The TVM targets (backends/tvm/): llvm and cuda.

Skipped where TVM is not installed. Numerical checks compare against ONNX Runtime on the
original model with atol = rtol = 1e-4 (fp32): TVM's kernels reassociate every reduction
(tiled and vectorized dot products, convolutions in NHWC with a different summation order,
erf/exp from TVM's own approximations), so results differ from ORT's MLAS in the last bits of
each accumulation; over reductions of up to ~1000 terms that is ~1e-5 relative, and the worst
case seen on the golden models is 2.1e-5 (ResNet logits). 1e-4 leaves a 5x margin and still
catches any real bug (a wrong layout or padding moves outputs by O(1)).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

tvm = pytest.importorskip("tvm")

import infoptc
from _tvm import kernels_by_name, lowered
from infoptc.errors import MissingDependencyError, UnsupportedOpError, UsageError
from infoptc.verify import OrtRunner, Tolerance, compare_outputs, random_inputs

ROOT = Path(__file__).resolve().parents[1]
TOL = Tolerance(atol=1e-4, rtol=1e-4)

# Golden models TVM's ONNX frontend lowers, with the (non-unit) shapes we bind for them.
SUPPORTED = {
    "mlp": {"x": (3, 64)},
    "digits_cnn": {"input": (2, 1, 8, 8)},
    "resnet": {},
    "mobilenet": {},
    "bert": {"input_ids": (2, 16), "attention_mask": (2, 16)},
    "gpt": {"input_ids": (2, 16)},
}
# Golden models it does not lower, and the op that stops each.
UNSUPPORTED = {"control_flow": "Loop"}


def _check(expected: dict, actual: dict) -> None:
    diffs = compare_outputs(expected, actual, tolerances={k: TOL for k in expected})
    bad = [d.describe() for d in diffs if not d.ok]
    assert not bad, bad


def _check_llvm(model, feeds: dict) -> None:
    """``model`` compiled for llvm (-O0: the lowering alone) against ORT on the same feeds."""
    _check(OrtRunner(model).run(feeds), infoptc.compile(model, target="llvm", opt_level=0).run(feeds))


def _two_input_matmul(m: int, k: int, n: int, rng) -> tuple:
    """``x[m, k] @ w[k, n]`` with both operands inputs (as attention's are: no constant weight
    to pack), and random feeds for it."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])])
    feeds = {"x": rng.standard_normal((m, k)).astype(np.float32), "w": rng.standard_normal((k, n)).astype(np.float32)}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), feeds


@pytest.fixture(scope="module")
def compiled(golden):
    """``compiled(name) -> (artifact, path of the original model)``, built once per module."""

    @functools.cache
    def get(name: str):
        path = golden(name)
        return infoptc.compile(path, target="llvm", input_shapes=SUPPORTED[name]), path

    return get


def test_every_golden_model_is_classified():
    from golden_models import MODEL_NAMES

    assert set(SUPPORTED) | set(UNSUPPORTED) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_llvm_matches_ort_after_reload_in_a_fresh_process(name, compiled, tmp_path):
    artifact, source = compiled(name)
    feeds = random_inputs(artifact.model, seed=1)
    assert {k: v.shape for k, v in feeds.items()} == {
        s.name: tuple(s.shape) for s in artifact.inputs}
    expected = OrtRunner(onnx.load(source)).run(feeds)
    _check(expected, artifact.run(feeds))  # in this process, from memory

    library = tmp_path / f"{name}.so"
    assert artifact.save(library) == [library]
    np.savez(tmp_path / "in.npz", **feeds)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "infoptc.cli", "run", str(library), "--inputs",
                           str(tmp_path / "in.npz"), "--save-outputs", str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "out.npz") as out:
        _check(expected, {k: out[k] for k in out.files})


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_avx2_build_matches_ort(name, golden):
    """The CPU changes between machines: built for an AVX2-only CPU (8-lane vectors: other tile
    widths, Winograd channel splits, pad vectors), the CNNs still match ORT. Runs here when the
    host has AVX2, which every x86 machine this project uses has."""
    from infoptc.backends.tvm import _host_has

    if not _host_has("avx2"):
        pytest.skip("host CPU without AVX2")
    path = golden(name)
    artifact = infoptc.compile(path, target="llvm", mcpu="haswell")
    feeds = random_inputs(artifact.model)
    _check(OrtRunner(onnx.load(path)).run(feeds), artifact.run(feeds))


@pytest.mark.parametrize("name,op", sorted(UNSUPPORTED.items()))
def test_unsupported_golden_models_name_the_op(name, op, golden, cli, tmp_path):
    with pytest.raises(UnsupportedOpError, match=rf"\b{op}\b.*--target onnx"):
        infoptc.compile(golden(name), target="llvm")
    code, _, err = cli("compile", golden(name), "--target", "llvm", "-o", tmp_path / "x.so")
    assert code == 6  # an op the target cannot lower: bad input for it, named with its node
    node = next(n.name for n in onnx.load(golden(name)).graph.node if n.op_type == op)
    assert op in err and repr(node) in err and "--target onnx" in err and "Traceback" not in err
    assert not (tmp_path / "x.so").exists()


def test_unsupported_custom_domain_op_is_named(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")  # ONNX Runtime's contrib op
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UnsupportedOpError, match="com.microsoft::FastGelu"):
        infoptc.compile(model, target="llvm", opt_level=0)


def test_artifact_manifest(compiled, tmp_path):
    artifact, source = compiled("bert")
    path = artifact.save(tmp_path / "bert.so")[0]
    from infoptc.backends.tvm import read_manifest

    manifest = read_manifest(path)
    import hashlib

    assert manifest["target"] == "llvm"
    assert manifest["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [2, 16]},
                                  {"name": "attention_mask", "dtype": "int64", "shape": [2, 16]}]
    assert manifest["outputs"] == [{"name": "last_hidden_state", "dtype": "float32", "shape": [2, 16, 256]}]
    assert manifest["versions"]["tvm"] == tvm.__version__
    assert manifest["versions"]["infoptc"] == infoptc.__version__
    source_model = onnx.load(source)
    assert manifest["source_sha256"] == hashlib.sha256(source_model.SerializeToString(deterministic=True)).hexdigest()
    assert manifest["tvm_target"]["kind"] == "llvm"
    # The library part is a plain shared object: the manifest only follows it.
    with open(path, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    assert manifest["library_bytes"] < path.stat().st_size
    reloaded = infoptc.load(path)
    assert reloaded.describe()["tvm_target"] == artifact.describe()["tvm_target"]
    assert [s.name for s in reloaded.outputs] == ["last_hidden_state"]


def test_host_cpu_is_detected_and_overridable(golden):
    from tvm.target import codegen

    default = infoptc.compile(golden("mlp"), target="llvm")
    assert default.describe()["tvm_target"]["mcpu"] == codegen.llvm_get_system_cpu()
    required = default.describe()["cpu_features"]["required"]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx2" in flags:
        assert "avx2" in required
    if " avx512f" not in flags:
        assert "avx512f" not in required  # never emit instructions this CPU lacks
    older = infoptc.compile(golden("mlp"), target="llvm", mcpu="haswell", mattr="-avx512f")
    assert older.describe()["tvm_target"]["mcpu"] == "haswell"
    assert "-avx512f" in older.describe()["tvm_target"]["mattr"]
    feeds = random_inputs(older.model)
    _check(OrtRunner(onnx.load(golden("mlp"))).run(feeds), older.run(feeds))
    with pytest.raises(UsageError, match="not a CPU"):
        infoptc.compile(golden("mlp"), target="llvm", mcpu="pentium-9000")


def test_unknown_option_and_bad_values(golden):
    with pytest.raises(UsageError, match="unknown option"):
        infoptc.compile(golden("mlp"), target="llvm", vectorize="yes")
    with pytest.raises(UsageError, match="tuning_db"):
        infoptc.compile(golden("mlp"), target="llvm", tune=4)
    with pytest.raises(UsageError, match="threads"):
        infoptc.compile(golden("mlp"), target="llvm", threads="many")


def test_symbolic_dims_set_to_one_without_dynamic_dims_and_are_reported(golden, caplog):
    """dynamic_dims=false (the default keeps them symbolic: tests/test_tvm_dynamic.py)."""
    with caplog.at_level("WARNING", logger="infoptc"):
        artifact = infoptc.compile(golden("mlp"), target="llvm", dynamic_dims=False)
    assert artifact.describe()["defaulted_dims"] == {"x[0] (batch)": 1}
    assert [tuple(s.shape) for s in artifact.inputs] == [(1, 64)]
    assert any("--input-shape" in r.getMessage() for r in caplog.records)
    with pytest.raises(UsageError, match=r"expects \[1, 64\]"):
        artifact.run({"x": np.zeros((2, 64), np.float32)})


def test_threads_option_sizes_the_runtime_pool(golden):
    import tvm_ffi

    num_threads = tvm_ffi.get_global_func("runtime.NumThreads")
    for threads in sorted({1, min(2, os.cpu_count() or 1)}):
        artifact = infoptc.compile(golden("mlp"), target="llvm", threads=threads)
        artifact.run(random_inputs(artifact.model))
        assert num_threads() == threads
        assert artifact.describe()["tvm_target"]["num-cores"] == threads


def test_save_is_atomic_and_checks_the_folder(compiled, tmp_path):
    artifact, _ = compiled("mlp")
    path = tmp_path / "m.so"
    path.write_bytes(b"old")
    artifact.save(path)
    assert path.read_bytes()[:4] == b"\x7fELF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.so"]  # no temp file left
    with pytest.raises(UsageError, match="does not exist"):
        artifact.save(tmp_path / "missing" / "m.so")
    # A renamed copy still loads, and re-saving a loaded artifact keeps it intact.
    renamed = tmp_path / "model.bin"
    shutil.copy(path, renamed)
    again = infoptc.load(renamed).save(tmp_path / "again.so")[0]
    assert again.read_bytes() == path.read_bytes()
    feeds = random_inputs(artifact.model)
    _check(artifact.run(feeds), infoptc.load(renamed).run(feeds))


def test_cli_default_output_name_and_run(golden, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("compile", golden("digits_cnn"), "--target", "llvm", "--input-shape", "input:4x1x8x8",
                         "--threads", "1")
    assert code == 0, err
    assert (tmp_path / "digits_cnn.opt.so").is_file()
    target_line = next(line for line in out.splitlines() if line.strip().startswith("target:"))
    assert target_line.strip().startswith("target: llvm -mcpu=") and "{" not in target_line, out
    assert repr(infoptc.load("digits_cnn.opt.so")).startswith(
        "<TvmArtifact target='llvm' inputs=(input: float32[4, 1, 8, 8]) outputs=(logits: float32[4, 10]) size=")
    data = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=data)
    code, out, err = cli("run", "digits_cnn.opt.so", "--inputs", "in.npz", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert rows[0]["name"] == "logits" and rows[0]["shape"] == [4, 10]
    expected = OrtRunner(onnx.load(golden("digits_cnn"))).run({"input": data})["logits"]
    assert rows[0]["mean"] == pytest.approx(float(expected.mean()), abs=1e-5)


def test_target_text_is_one_readable_line():
    from infoptc.backends.tvm import target_text

    cuda = {"kind": "cuda", "tag": "", "keys": ["cuda", "gpu"], "max_num_threads": 1024, "arch": "sm_90",
            "host": {"kind": "llvm", "tag": "", "keys": ["cpu"], "mtriple": "x86_64-conda-linux-gnu"}}
    assert target_text(cuda) == "cuda -arch=sm_90 -max_num_threads=1024 (host: llvm x86_64-linux-gnu)"
    llvm = {"kind": "llvm", "tag": "", "keys": ["cpu"], "num-cores": 2, "mcpu": "znver3", "mattr": ["-avx512f"]}
    assert target_text(llvm) == "llvm -mcpu=znver3 -mattr=-avx512f -num-cores=2"


def test_missing_tvm_is_exit_5_with_the_pip_command(golden, cli, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tvm", None)  # `import tvm` now raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install 'apache-tvm=="):
        infoptc.compile(golden("mlp"), target="llvm")
    code, _, err = cli("compile", golden("mlp"), "--target", "llvm", "-o", tmp_path / "m.so")
    assert code == 5 and "pip install" in err


def test_tuning_refuses_an_untested_tvm_ffi(golden, monkeypatch, tmp_path):
    import tvm_ffi

    monkeypatch.setattr(tvm_ffi, "__version__", "0.1.15.post2")
    with pytest.raises(MissingDependencyError, match=r"apache-tvm-ffi==0\.1\.14\.post1"):
        infoptc.compile(golden("mlp"), target="llvm", tune=2, tuning_db=str(tmp_path / "db"))


def test_relax_fixes_make_clip_layout_friendly_and_gather_safe():
    """Clip(x, 0, 6) imports as maximum/minimum (not stacked reductions), Gather as take(wrap)."""
    from infoptc.backends.tvm import prepare as _tvm_prepare
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(np.array(0, np.float32))),
        helper.make_node("Constant", [], ["hi"], value=numpy_helper.from_array(np.array(6, np.float32))),
        helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
        helper.make_node("Gather", ["c", "idx"], ["y"], axis=0),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3]),
                                           helper.make_tensor_value_info("idx", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    prepared = _tvm_prepare.prepare(model)
    assert prepared.counters["clips_split"] == 1
    text = _tvm_prepare.import_onnx(prepared.model)["main"].script()
    assert "R.maximum" in text and "R.minimum" in text and "R.stack" not in text
    assert 'mode="wrap"' in text
    artifact = infoptc.compile(model, target="llvm", opt_level=0)
    x = np.linspace(-10, 10, 12, dtype=np.float32).reshape(4, 3)
    idx = np.array([-1, 1], np.int64)  # ONNX allows negative indices
    _check(OrtRunner(model).run({"x": x, "idx": idx}), artifact.run({"x": x, "idx": idx}))


def test_profile_times_each_tvm_kernel(compiled, cli, tmp_path):
    """`infoptc profile model.so` times the library's own kernels (the VM's instrument hook),
    grouped by fusion pattern, with the VM's builtins apart; not ONNX Runtime on the model."""
    path = tmp_path / "resnet.so"
    compiled("resnet")[0].save(path)
    code, out, err = cli("profile", path, "--iterations", "3", "--warmup", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["target"] == "llvm" and data["runs"] == 3
    ops = {r["op_type"]: r for r in data["by_op"]}
    assert "winograd_conv2d_add_relu" in ops and "vm.builtin" in ops, sorted(ops)
    assert not any(op[0].isupper() for op in ops)  # kernel patterns, not ONNX op types
    assert 0 < data["kernel_us"] <= data["run_us"]


def test_log_handlers_made_during_native_capture_survive_it(capfd, monkeypatch):
    """A library that sets up logging while TVM's native output is captured (a StreamHandler on
    the stand-in stderr) keeps logging afterwards, to the real stderr, instead of failing with
    "I/O operation on closed file" on every later line (seen after an llvm compile)."""
    import io
    import logging

    from infoptc.backends.tvm.runtime import native_output_to_log

    real = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)  # Python's stderr on fd 2
    monkeypatch.setattr(sys, "stderr", real)
    logger = logging.getLogger("infoptc.test.capture")
    with native_output_to_log():
        assert sys.stderr is not real  # the capture stands in for it
        handler = logging.StreamHandler()  # binds whatever sys.stderr is now
        logger.addHandler(handler)
    try:
        assert handler.stream is real
        logger.warning("after the capture")
        assert "after the capture" in capfd.readouterr().err
    finally:
        logger.removeHandler(handler)


def test_constant_scalar_gathers_become_slices_and_match_ort():
    """Gather(x, i) with a constant scalar index (ViT's split of its fused QKV) imports as a
    strided slice, no ``take``; negative indices count from the end; an integer Gather (shape
    arithmetic) and a Gather with a tensor of indices stay Gathers. Data movement only: exact."""
    from infoptc.backends.tvm import prepare as _tvm_prepare
    from onnx import TensorProto, helper, numpy_helper

    const = lambda name, value: helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.int64)))
    nodes = [const("i0", 2), const("i1", -1), const("ids", [0, 2]),
             helper.make_node("Gather", ["x", "i0"], ["a"], axis=0),
             helper.make_node("Gather", ["x", "i1"], ["b"], axis=1),
             helper.make_node("Gather", ["x", "ids"], ["c"], axis=2),
             helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i1"], ["d"], axis=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4, 5])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 5]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 5]),
                               helper.make_tensor_value_info("c", TensorProto.FLOAT, [3, 4, 2]),
                               helper.make_tensor_value_info("d", TensorProto.INT64, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    prepared = _tvm_prepare.prepare(model)
    assert prepared.counters["gathers_sliced"] == 2
    text = _tvm_prepare.import_onnx(prepared.model)["main"].script()
    assert text.count("R.take") == 2 and "R.strided_slice" in text  # the index tensor, the integer data
    x = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    expected = OrtRunner(model).run({"x": x})
    actual = infoptc.compile(model, target="llvm", opt_level=0).run({"x": x})
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])


@pytest.mark.parametrize("opset,sizes", [(17, [5, 2, 3]), (17, None), (18, None), (11, [4, 6])])
def test_splits_become_slices_and_match_ort(opset, sizes):
    """A float Split with known sizes (an input, the opset-11 attribute, or equal parts: opset
    18's num_outputs with a smaller last part) imports as one strided slice per output; no
    ``split`` kernel is left. Data movement only: exact."""
    from infoptc.backends.tvm import prepare as _tvm_prepare
    from onnx import TensorProto, helper, numpy_helper

    parts = len(sizes) if sizes else 3 if opset >= 18 else 2
    lengths = sizes or ([4, 4, 2] if opset >= 18 else [5, 5])
    outputs = [f"y{i}" for i in range(parts)]
    inputs, attrs, nodes = ["x"], {"axis": -1}, []
    if sizes and opset >= 13:
        nodes.append(helper.make_node("Constant", [], ["sizes"], value=numpy_helper.from_array(np.array(sizes, np.int64))))
        inputs.append("sizes")
    elif sizes:
        attrs["split"] = sizes
    if opset >= 18 and not sizes:
        attrs["num_outputs"] = parts
    nodes.append(helper.make_node("Split", inputs, outputs, **attrs))
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 10])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, size])
                               for n, size in zip(outputs, lengths)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    prepared = _tvm_prepare.prepare(model)
    assert prepared.counters["splits_sliced"] == 1
    assert "R.split" not in _tvm_prepare.import_onnx(prepared.model)["main"].script()
    x = np.arange(60, dtype=np.float32).reshape(2, 3, 10)
    expected = OrtRunner(model).run({"x": x})
    actual = infoptc.compile(model, target="llvm", opt_level=0).run({"x": x})
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])


@pytest.mark.parametrize("m,k,n", [(197, 64, 197), (197, 192, 576), (5, 32, 1000)])
def test_odd_matmul_extents_get_padded_register_tiles(m, k, n):
    """A matmul extent with no divisor of 4 or more (ViT's 197 tokens; both operands computed,
    as attention's are, so no packed weight) is padded to whole
    register tiles rather than tiled 1 wide (scalar code); extents a good tile divides, and
    ones that fit one vector, are not padded. Results match ORT within fp32 reassociation."""
    model, feeds = _two_input_matmul(m, k, n, np.random.default_rng(m * k + n))
    (text,) = [f.script() for f in kernels_by_name(lowered(model)).values()]
    assert ("_pad" in text) == (m == 197), text
    # columns padded (197 -> 224): the padded copy of the right operand and the crop of the
    # result each take their own pass, not a lane-by-lane copy inside every tile
    if n == 197:
        assert text.index('T.sblock("w_pad")') < text.index("T.parallel"), text
        assert text.count("T.parallel") == 2, text
    _check_llvm(model, feeds)


@pytest.mark.parametrize("shape,n,gemm", [((1, 128, 96), 256, False), ((197, 64), 96, False), ((3, 5, 48), 100, True),
                                           ((8, 32), 16, False)])
def test_constant_weights_are_packed_in_column_strips(shape, n, gemm):
    """A matmul (or a Gemm, whose transposed weight folds first) with a constant weight at
    least two register tiles wide reads it packed [N / w, K, w]: odd row counts (197) are
    computed padded, odd column counts (100) read zero columns; a narrow weight (16 columns)
    keeps the plain matmul. Results match ORT within fp32 reassociation."""
    from onnx import TensorProto, helper, numpy_helper

    k = shape[-1]
    rng = np.random.default_rng(n)
    weight = rng.standard_normal((n, k) if gemm else (k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")]
    if gemm:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"))
        nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]),
                 helper.make_node("Gemm", ["x2", "w", "b"], ["y2"], transB=1),
                 helper.make_node("Reshape", ["y2", "back"], ["y"])]
        inits += [numpy_helper.from_array(np.array([-1, k], np.int64), "flat"),
                  numpy_helper.from_array(np.array([*shape[:-1], n], np.int64), "back")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    names = " ".join(kernels_by_name(lowered(model)))
    assert ("matmul_packed" in names) == (n >= 64), names
    assert "matmul_packed" not in " ".join(kernels_by_name(lowered(model, pack_weights=False)))
    x = rng.standard_normal(shape).astype(np.float32)
    _check_llvm(model, {"x": x})


@pytest.mark.parametrize("kernel,stride,features", [(1, 1, 256), (3, 2, 100), (1, 1, 16)])
def test_constant_conv_weights_are_packed(kernel, stride, features):
    """An NHWC convolution with a constant weight at least two tiles wide reads it packed
    [F / w, KH, KW, C, w] (a 3x3 stride-1 one goes to Winograd instead); 100 features read zero
    columns; 16 stay plain. Results match ORT within fp32 reassociation."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(features)
    pad = kernel // 2
    out = (9 + 2 * pad - kernel) // stride + 1
    w = numpy_helper.from_array(rng.standard_normal((features, 32, kernel, kernel)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[kernel] * 2, strides=[stride] * 2,
                              pads=[pad] * 4), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, features, out, out])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    names = " ".join(kernels_by_name(lowered(model)))
    assert ("conv2d_packed" in names) == (features >= 64), names
    x = rng.standard_normal((1, 32, 9, 9)).astype(np.float32)
    _check_llvm(model, {"x": x})


@pytest.mark.parametrize("m,k,n,columns_outside", [(128, 512, 2048, True), (2048, 64, 64, False)])
def test_weight_strips_stay_in_cache_across_row_tiles(m, k, n, columns_outside):
    """When the weight is the larger operand (batch-1 inference), the parallel loop walks column
    strips outside row tiles: each strip is read once and reused by every row tile. A large
    activation with a small weight keeps rows outside. Results match ORT."""
    import re


    model, feeds = _two_input_matmul(m, k, n, np.random.default_rng(k))
    (text,) = [f.script() for f in kernels_by_name(lowered(model)).values()]
    row = re.search(rf"v0 = T.axis.spatial\(T.int64\({m}\), (\w+) ([%/]+)", text)
    assert row and ("%" if columns_outside else "//") == row.group(2), text
    _check_llvm(model, feeds)


@pytest.mark.parametrize("size,channels,columns_outside", [(7, 128, True), (27, 32, False)])  # odd: no Winograd
def test_conv_weight_strips_stay_in_cache_across_output_rows(size, channels, columns_outside):
    """A conv whose weight outweighs its input (ResNet's last stage: 3x3x512x512 on 7x7) walks
    column strips outside every output row, so the weight is read once, not once per row; its
    pad is then one pass of its own, not copied again by every strip. A conv over a large map
    keeps the output rows outside. Results match ORT."""
    import re

    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(size)
    w = numpy_helper.from_array(rng.standard_normal((2 * channels, channels, 3, 3)).astype(np.float32) / 30, "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2 * channels, size, size])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (text,) = [f.script() for name, f in kernels_by_name(lowered(model)).items() if "conv2d" in name]
    conv = text[text.index('T.sblock("packed_conv2d_nhwc_update")'):]
    row = re.search(rf"v0 = T.axis.spatial\(T.int64\({size}\), (\w+) ([%/]+)", conv)
    assert row and ("%" if columns_outside else "//") == row.group(2), text
    own_pass = text.index('T.sblock("pad_temp")') < text.index("T.parallel")  # else copied per tile
    assert own_pass == columns_outside, text
    _check_llvm(model, {"x": rng.standard_normal((1, channels, size, size)).astype(np.float32)})


@pytest.mark.parametrize("kernel,stride,pad,as_conv", [(2, 2, 0, True), (3, 2, 1, False)])
def test_conv_transpose_after_nhwc_convs_compiles_and_matches_ort(kernel, stride, pad, as_conv):
    """A ConvTranspose fed by a conv (which runs NHWC on the CPU). With its stride equal to its
    kernel and no padding (a learned 2x upsampling, as in PP-OCRv4's text detector) it is a 1x1
    conv to O*k*k channels and a DepthToSpace; otherwise it stays NCHW with transposes around
    it, since TVM cannot lower an NHWC conv2d_transpose ("CodeGenVM cannot emit this Relax
    operator")."""
    from onnx import TensorProto, helper, numpy_helper

    from infoptc.backends.tvm.prepare import prepare

    rng = np.random.default_rng(11)
    size, out = 12, (12 - 1) * stride - 2 * pad + kernel
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) / 9, "w"),
             numpy_helper.from_array(rng.standard_normal((16, 8, kernel, kernel)).astype(np.float32) / 4, "wt"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bt")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["y"], kernel_shape=[kernel] * 2,
                              strides=[stride] * 2, pads=[pad] * 4)]
    graph = helper.make_graph(nodes, "upsample", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, out, out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert prepare(model).counters["conv_transposes_as_convs"] == int(as_conv)
    _check_llvm(model, {"x": rng.standard_normal((1, 8, size, size)).astype(np.float32)})


def test_tvm_errors_read_as_one_line_naming_the_op():
    from infoptc.backends.tvm.runtime import error_line

    unlowered = RuntimeError("CodeGenVM cannot emit this Relax operator directly. Run the lowering pass.\n"
                             "Offending call:\nR.nn.conv2d_transpose(alloc108, metadata[0], strides=[2, 2])\n"
                             "# Metadata omitted. Use show_meta=True in script() method to show it.")
    assert error_line(unlowered) == "CodeGenVM cannot emit this Relax operator directly: R.nn.conv2d_transpose"
    assert error_line(ValueError("context\nthe reason\n# Metadata omitted.")) == "the reason"
    assert error_line(ValueError()) == "ValueError"


def test_a_tvm_failure_in_its_graph_passes_is_a_one_line_compile_error(monkeypatch):
    """A static-shape model whose Relax passes fail inside TVM: CompileError (exit 4) with one
    line, not TVM's own exception and traceback (the bf16 ViT build hit one in FoldConstant)."""
    from infoptc.backends.tvm import build
    from infoptc.errors import CompileError

    def failing(*_args, **_kwargs):
        raise RuntimeError("Check failed: layer_norm: only support float32 and float16 for now\n# Metadata omitted.")

    monkeypatch.setattr(build, "optimize", failing)
    with pytest.raises(CompileError, match=r"^TVM failed to compile the model for llvm: Check failed: layer_norm"):
        infoptc.compile(_two_input_matmul(4, 8, 16, np.random.default_rng(0))[0], target="llvm", opt_level=0)


def test_fast_math_sigmoid_is_polynomial_and_matches_ort():
    """With fast_math, fp32 sigmoid (swish, squeeze-excitation gates) is 1 / (1 + fast_exp(-x)):
    no per-element call of the C library's expf; fast_math=false keeps TOPI's. Inputs span
    past fast_exp's clamp (|x| > 88) and the gate stays in [0, 1] there."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
    graph = helper.make_graph(nodes, "swish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8, 8, 16])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 8, 8, 16]) for n in "sy"])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    texts = {fast: " ".join(f.script() for f in kernels_by_name(lowered(model, fast_math=fast)).values())
             for fast in (False, True)}
    assert "T.sigmoid" in texts[False] and "T.sigmoid" not in texts[True] and "T.exp(" not in texts[True]
    x = np.concatenate([np.linspace(-120, 120, 1024), np.linspace(-6, 6, 3072)]).astype(np.float32).reshape(4, 8, 8, 16)
    actual = infoptc.compile(model, target="llvm", opt_level=0).run({"x": x})
    _check(OrtRunner(model).run({"x": x}), actual)
    assert actual["s"].min() >= 0 and actual["s"].max() <= 1


def test_row_reductions_leave_rows_whole_for_llvm():
    """Softmax and layer norm rows are whole loops (LLVM vectorizes them, sums included, under
    the target's fast-math-reassoc), not vectors split with a guard on every lane; fast_math
    sets that flag on the llvm target and fast_math=false does not. Results match ORT."""
    from infoptc.targets import get_target
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    scale, bias = (numpy_helper.from_array(rng.standard_normal(197).astype(np.float32), n) for n in "gb")
    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=-1),
             helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1)]
    graph = helper.make_graph(nodes, "rows", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 197, 197])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 197, 197]) for n in "sn"],
                              [scale, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for name, kernel in kernels_by_name(lowered(model, fast_math=True)).items():
        text = kernel.script()
        assert "T.parallel" in text and "T.vectorized" not in text and "T.where" not in text, name
    x = (3 * rng.standard_normal((3, 197, 197))).astype(np.float32)
    _check_llvm(model, {"x": x})
    assert get_target("llvm")().tvm_target()[0].get("fast-math-reassoc") is True
    assert "fast-math-reassoc" not in get_target("llvm")(fast_math="false").tvm_target()[0]


def test_default_schedules_parallelize_and_vectorize(golden):
    """Without tuning, every ResNet kernel gets a schedule from the rules; the convolutions run
    their outer tiles in parallel and their channel axis in vector registers."""
    kernels = kernels_by_name(lowered(infoptc.optimize(golden("resnet")), "haswell"))
    convs = [name for name in kernels if "conv2d" in name and "winograd" not in name]
    winograd = [name for name in kernels if "winograd" in name]
    assert len(convs) >= 4 and len(winograd) >= 3  # 3x3 stride-1: one kernel per shape and epilogue
    assert all(f.attrs and f.attrs.get("tirx.is_scheduled") for f in kernels.values())
    for name in convs + winograd:
        text = kernels[name].script()
        assert "T.parallel" in text and "T.vectorized" in text, name
    for name in convs:
        assert "conv2d_nhwc" in kernels[name].script(), name  # channels innermost (ConvertLayout)


def test_narrow_input_conv_reads_nchw_in_place(golden):
    """ResNet's 3-channel stem conv reads the NCHW input where it is (no transpose kernel) and
    writes NHWC; the other convs keep NHWC in and out."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    kernels = kernels_by_name(lowered(infoptc.optimize(golden("resnet"))))
    assert not [name for name in kernels if name.startswith("transpose")]
    shapes = {name: [[int(d) for d in a.shape] for a in ArgInfo.from_prim_func(f)] for name, f in kernels.items()}
    stem = [name for name, s in shapes.items() if s[0] == [1, 3, 224, 224]]
    assert len(stem) == 1 and "conv2d" in stem[0] and shapes[stem[0]][-1] == [1, 112, 112, 16]
    # its pad is computed per row of output tiles, inside the conv's one parallel loop
    assert kernels[stem[0]].script().count("T.parallel") == 1


def test_fast_math_rewrites_before_legalization(golden):
    """fast_math replaces Relax's exp/erf before LegalizeOps turns them into TIR: run after it,
    FastMathTransform finds nothing to rewrite (BERT: 2.6 -> 3.6 ms, exact erf and exp)."""
    model = onnx.load(golden("bert"))
    names = {fast: " ".join(kernels_by_name(lowered(model, schedules="none", fast_math=fast)))
             for fast in (False, True)}
    assert "fast_" not in names[False] and "fast_" in names[True], names


@given(channels=st.integers(1, 4), kernel=st.integers(1, 5), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       pads=st.lists(st.integers(0, 3), min_size=4, max_size=4), batch=st.integers(1, 2), size=st.integers(9, 17))
@settings(max_examples=12, deadline=None, derandomize=True, database=None)
def test_narrow_input_conv_matches_ort(channels, kernel, stride, dilation, pads, batch, size, tmp_path_factory):
    """The NCHW-in, NHWC-out conv (inputs with fewer channels than a vector holds) against ORT:
    strides, dilations, asymmetric pads, batches, followed by a ReLU that fuses into it."""
    from onnx import TensorProto, helper, numpy_helper

    pads = [min(p, (kernel - 1) * dilation) for p in pads]  # ONNX allows more; keep outputs non-empty
    span = (kernel - 1) * dilation + 1
    out_h, out_w = (size + pads[0] + pads[2] - span) // stride + 1, (size + pads[1] + pads[3] - span) // stride + 1
    rng = np.random.default_rng(channels * 1000 + kernel * 100 + stride * 10 + dilation)
    weight = numpy_helper.from_array(rng.standard_normal((8, channels, kernel, kernel)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                              dilations=[dilation, dilation], pads=pads),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, out_h, out_w])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("conv") / "conv.onnx"
    onnx.save(model, path)
    feeds = random_inputs(model)
    artifact = infoptc.compile(path, target="llvm")
    _check(OrtRunner(model).run(feeds), artifact.run(feeds))


MISALIGNED_RUN = """
import sys, numpy as np, infoptc
artifact = infoptc.load(sys.argv[1])
with np.load(sys.argv[2]) as saved:
    feeds = {}
    for name in saved.files:
        value = saved[name]
        raw = np.empty(value.nbytes + 64, dtype=np.uint8)
        start = (-raw.ctypes.data) % 64 + value.itemsize  # one element past a 64-byte boundary
        feeds[name] = raw[start:start + value.nbytes].view(value.dtype).reshape(value.shape)
        feeds[name][...] = value
outputs = artifact.run(feeds)
assert not artifact._staging.__dict__, "inputs were copied"
np.savez(sys.argv[3], **outputs)
"""


def test_kernels_read_misaligned_inputs_in_place(compiled, tmp_path):
    """Callers' arrays rarely start on 64 bytes, which TVM assumes of every buffer: the kernels
    reading a model input accept any start (an aligned vector load there faults: the MLP's
    dense did), so inputs are passed without a copy. Every golden model it lowers, each input
    one element past a 64-byte boundary, in a fresh process (a fault would end pytest)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in SUPPORTED:
        artifact, source = compiled(name)
        assert artifact.manifest["unaligned_inputs"]
        feeds = random_inputs(artifact.model, seed=2)
        artifact.save(tmp_path / f"{name}.so")
        np.savez(tmp_path / f"{name}_in.npz", **feeds)
    runs = [(tmp_path / f"{n}.so", tmp_path / f"{n}_in.npz", tmp_path / f"{n}_out.npz") for n in SUPPORTED]
    for library, inputs, outputs in runs:
        proc = subprocess.run([sys.executable, "-c", MISALIGNED_RUN, str(library), str(inputs), str(outputs)],
                              capture_output=True, text=True, env=env, timeout=300, check=False)
        assert proc.returncode == 0, (library.name, proc.returncode, proc.stderr[-2000:])
    for name, (_, inputs, outputs) in zip(SUPPORTED, runs):
        _, source = compiled(name)
        with np.load(inputs) as feeds, np.load(outputs) as out:
            _check(OrtRunner(onnx.load(source)).run({k: feeds[k] for k in feeds.files}),
                   {k: out[k] for k in out.files})


def test_artifacts_that_assume_aligned_inputs_get_aligned_copies(compiled):
    """A library built before kernels accepted unaligned inputs (no ``unaligned_inputs`` in its
    manifest) still gets 64-byte aligned copies, kept between calls and refilled each call."""
    artifact, path = compiled("mlp")
    feeds = random_inputs(artifact.model)
    name = next(iter(feeds))
    raw = np.empty(feeds[name].nbytes + 64, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + 4
    misaligned = raw[start:start + feeds[name].nbytes].view(feeds[name].dtype).reshape(feeds[name].shape)
    reference = OrtRunner(onnx.load(path))
    old = type(artifact)({**artifact.manifest, "unaligned_inputs": False}, executable=artifact.executable)
    for scale in (1.0, -2.0):
        misaligned[...] = feeds[name] * scale
        _check(reference.run({name: misaligned.copy()}), old.run({name: misaligned}))
        assert old._staging.__dict__[name].ctypes.data % 64 == 0


def test_register_tile_width_is_whole_vectors_or_a_power_of_two():
    """The contiguous width of a register tile: two or one whole vectors, else the widest power of
    two that divides the extent (an odd-sized vector such as 24 floats ran 6x slower), else the
    widest divisor (3 channels, 25)."""
    from infoptc.backends.tvm.schedule import vector_tile

    cases = {(64, 16): 32, (48, 16): 16, (24, 16): 8, (1000, 16): 8, (20, 8): 4, (96, 16): 32, (3, 16): 3, (25, 16): 25}
    assert {key: vector_tile(*key) for key in cases} == cases


def test_untuned_rules_match_tvms_naive_kernels(golden):
    plain = infoptc.compile(golden("digits_cnn"), target="llvm", schedules="none", input_shapes={"input": (5, 1, 8, 8)})
    ruled = infoptc.compile(golden("digits_cnn"), target="llvm", input_shapes={"input": (5, 1, 8, 8)})
    assert plain.describe()["schedules"] == "none" and ruled.describe()["schedules"] == "rules"
    feeds = random_inputs(plain.model)
    _check(plain.run(feeds), ruled.run(feeds))


NVCC = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not installed")
def test_cuda_build_path_codegen_and_nvcc(golden, tmp_path):
    from infoptc.backends.tvm import read_blobs, read_manifest

    artifact = infoptc.compile(golden("mlp"), target="cuda", arch="sm_80", input_shapes={"x": (2, 64)})
    facts = artifact.describe()
    assert facts["target"] == "cuda" and facts["tvm_target"]["arch"] == "sm_80"
    assert facts["cuda"]["fatbin_bytes"] > 0 and "release" in facts["cuda"]["nvcc"]
    path = artifact.save(tmp_path / "mlp_cuda.so")[0]
    manifest = read_manifest(path)
    blobs = read_blobs(path, manifest)
    assert blobs["cuda_fatbin"][:4] == b"\x50\xed\x55\xba"  # fatbin magic 0xBA55ED50
    assert b"sm_80" in blobs["cuda_fatbin"] or b"compute_80" in blobs["cuda_fatbin"]
    reloaded = infoptc.load(path)
    assert reloaded.target == "cuda"
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}
    if tvm.cuda(0).exist:
        _check(OrtRunner(onnx.load(golden("mlp"))).run(feeds), reloaded.run(feeds))
    else:
        with pytest.raises(MissingDependencyError, match="NVIDIA GPU"):
            reloaded.run(feeds)


def test_cuda_needs_an_arch_without_a_gpu(golden, cli, tmp_path, monkeypatch):
    """The error names the flag that exists (--arch), on any machine: no GPU and nvcc are faked."""
    from infoptc.backends.tvm import build

    monkeypatch.setattr(tvm, "cuda", lambda *a: type("NoDevice", (), {"exist": False})())
    monkeypatch.setattr(build, "nvcc_path", lambda: "/usr/bin/nvcc")  # checked before the arch
    with pytest.raises(UsageError, match="give it with --arch sm_XX"):
        infoptc.compile(golden("mlp"), target="cuda")
    code, _, err = cli(golden("mlp"), "--target", "cuda", "-o", tmp_path / "m.so")
    assert code == 2 and "--arch sm_90 for H100" in err and "target option" not in err, err


def test_cross_compiling_for_aarch64(golden, tmp_path):
    linker = shutil.which("aarch64-linux-gnu-g++") or shutil.which("aarch64-linux-gnu-gcc")
    if linker is None:
        with pytest.raises(MissingDependencyError, match="aarch64-linux-gnu"):
            infoptc.compile(golden("mlp"), target="llvm", mtriple="aarch64-linux-gnu")
        return
    artifact = infoptc.compile(golden("mlp"), target="llvm", mtriple="aarch64-linux-gnu")
    path = artifact.save(tmp_path / "mlp_arm.so")[0]
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    with pytest.raises(MissingDependencyError, match="aarch64"):
        infoptc.load(path).run({"x": np.zeros((1, 64), np.float32)})


@pytest.mark.slow
def test_tuning_writes_the_database_and_reuses_it(golden, tmp_path, request):
    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr or "not slow" in expr:
        pytest.skip("about 70 s of MetaSchedule trials: run with -m slow")
    db = tmp_path / "db"
    first = infoptc.compile(golden("mlp"), target="llvm", tune=6, tuning_db=str(db))
    tuning = first.describe()["tuning"]
    assert tuning["tasks"] > 0 and tuning["tasks_tuned_now"] == tuning["tasks"]
    assert tuning["records_added"] > 0 and tuning["tasks_without_record"] == []
    assert tuning["kernels_timed_now"] == tuning["tasks"]  # each tuned kernel timed against the rules
    assert first.describe()["schedules"] == ("rules" if tuning.get("model_check", {}).get("use") == "rules" else "metaschedule+rules")
    saved = {name: (db / name).read_bytes() for name in ("database_tuning_record.json", "infoptc_choices.json")}
    second = infoptc.compile(golden("mlp"), target="llvm", tune=6, tuning_db=str(db))
    again = second.describe()["tuning"]
    assert again["tasks_tuned_now"] == 0 and again["tasks_from_database"] == tuning["tasks"]
    assert again["records_added"] == 0 and again["kernels_timed_now"] == 0
    assert again["tuned_vs_rules"] == tuning["tuned_vs_rules"]
    assert {name: (db / name).read_bytes() for name in saved} == saved
    feeds = random_inputs(second.model)
    _check(OrtRunner(onnx.load(golden("mlp"))).run(feeds), second.run(feeds))
