"""IR: loading from every source, round trips that keep model-level data, external data,
atomic deterministic saving."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh

import infoptc
from infoptc import ir
from infoptc.errors import InvalidModelError, UsageError

from _models import chain, fvi, model, with_subgraph


def test_load_from_path_bytes_and_proto_without_modifying_the_proto(tmp_path):
    m = chain()
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    before = m.SerializeToString()
    for source in (path, str(path), path.read_bytes(), m):
        loaded = ir.load_model(source)
        assert loaded.graph.node[1].op_type == "MatMul"
        assert loaded is not m
    infoptc.optimize(m, opt_level=2)
    assert m.SerializeToString() == before


def test_round_trip_keeps_metadata_docs_functions_and_value_info():
    m = chain()
    m.doc_string = "model doc"
    m.graph.doc_string = "graph doc"
    m.producer_name, m.producer_version, m.model_version, m.domain = "exporter", "9.9", 7, "org.example"
    onnx.helper.set_model_props(m, {"author": "me", "license": "MIT"})
    fn = h.make_function("custom", "Twice", ["a"], ["b"], [h.make_node("Add", ["a", "a"], ["b"])],
                         [h.make_opsetid("", 17)])
    m.functions.append(fn)
    m.opset_import.append(h.make_opsetid("custom", 1))
    m.graph.node.append(h.make_node("Twice", ["y0"], ["y"], domain="custom", name="twice"))
    m.graph.node[4].output[0] = "y0"  # Relu -> y0 -> Twice -> y
    m.graph.value_info.append(fvi("b", ["batch", 3]))
    out = infoptc.optimize(m, opt_level=0)
    assert out.doc_string == "model doc" and out.graph.doc_string == "graph doc"
    assert (out.producer_name, out.producer_version, out.model_version, out.domain) == ("exporter", "9.9", 7, "org.example")
    assert {p.key: p.value for p in out.metadata_props} == {"author": "me", "license": "MIT"}
    assert [f.name for f in out.functions] == ["Twice"]
    assert {i.domain: i.version for i in out.opset_import} == {"": 17, "custom": 1}
    assert "b" in {vi.name for vi in out.graph.value_info}
    x = {"x": np.ones((2, 4), np.float32)}
    from infoptc.verify import run_onnx

    np.testing.assert_array_equal(run_onnx(out, x)["y"], run_onnx(m, x)["y"])


def test_subgraph_bodies_survive_and_outer_scope_references_hold():
    m = with_subgraph()
    out = infoptc.optimize(m, opt_level=1)
    body = [a.g for n in out.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch"][0]
    assert [n.op_type for n in body.node] == ["Add"]  # the Identity inside the branch is gone
    assert "r" in list(body.node[0].input)  # still reads the outer-scope value
    from infoptc.verify import check_equivalent
    from infoptc import Contract

    check_equivalent(m, out, Contract.EXACT, samples=3)


def test_same_input_and_flags_give_byte_identical_files(tmp_path, golden):
    outs = []
    for i in range(2):
        path = tmp_path / f"out{i}.onnx"
        infoptc.compile(golden("bert"), opt_level=2).save(path)
        outs.append(path.read_bytes())
    assert outs[0] == outs[1]


def test_save_is_atomic_and_reports_bad_folders(tmp_path):
    m = chain()
    written = ir.save_model(m, tmp_path / "a.onnx")
    assert written == [tmp_path / "a.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]  # no temp files left
    with pytest.raises(UsageError, match="does not exist"):
        ir.save_model(m, tmp_path / "missing" / "a.onnx")
    with pytest.raises(UsageError, match="directory"):
        ir.save_model(m, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_save_to_unwritable_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="not writable"):
            ir.save_model(chain(), ro / "a.onnx")
    finally:
        ro.chmod(0o700)


def _big_model(n=3) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [nh.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}") for i in range(n)]
    nodes, prev = [], "x"
    for i in range(n):
        nodes.append(h.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    nodes.append(h.make_node("Relu", [prev], ["y"], name="relu"))
    return model(nodes, [fvi("x", [1, 64])], [fvi("y", [1, 64])], inits)


def test_external_data_round_trip(tmp_path):
    m = _big_model()
    written = ir.save_model(m, tmp_path / "big.onnx", external_data=True)
    assert [p.name for p in written] == ["big.onnx.data", "big.onnx"]
    assert (tmp_path / "big.onnx").stat().st_size < 2000  # payloads went to the side file
    loaded = ir.load_model(tmp_path / "big.onnx")
    for a, b in zip(loaded.graph.initializer, m.graph.initializer):
        np.testing.assert_array_equal(nh.to_array(a), nh.to_array(b))
    # compile from the external-data model, written with external data again
    art = infoptc.compile(tmp_path / "big.onnx", opt_level=2)
    out = ir.save_model(art.model, tmp_path / "opt.onnx", external_data=True)
    assert (tmp_path / "opt.onnx.data").exists() and out[-1] == tmp_path / "opt.onnx"


def test_size_threshold_switches_to_external_data(tmp_path, monkeypatch):
    """The >2 GB path: above the threshold tensors go to a side file automatically."""
    monkeypatch.setattr(ir, "EXTERNAL_DATA_THRESHOLD", 10_000)
    ir.save_model(_big_model(), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").exists()
    ir.save_model(chain(), tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()


def _externalize(tmp_path, location: str) -> os.PathLike:
    m = _big_model(1)
    t = m.graph.initializer[0]
    data = t.raw_data
    onnx.external_data_helper.set_external_data(t, location=location, offset=0, length=len(data))
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(m.SerializeToString())
    return path, data


@pytest.mark.parametrize("location,message", [
    ("../secret.bin", "leaves the model's folder"),
    ("sub/../../secret.bin", "leaves the model's folder"),
    ("/etc/passwd", "absolute"),
    ("missing.bin", "missing"),
])
def test_external_data_locations_outside_or_missing_are_refused(tmp_path, location, message):
    path, data = _externalize(tmp_path, location)
    (tmp_path / "secret.bin").write_bytes(data)
    with pytest.raises(InvalidModelError, match=message):
        ir.load_model(path)


def test_external_data_symlink_is_refused(tmp_path):
    path, data = _externalize(tmp_path, "link.bin")
    (tmp_path / "secret.bin").write_bytes(data)
    (path.parent / "link.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(InvalidModelError, match="symbolic link"):
        ir.load_model(path)


def test_external_data_truncated_file_is_refused(tmp_path):
    path, data = _externalize(tmp_path, "w.bin")
    (path.parent / "w.bin").write_bytes(data[:100])
    with pytest.raises(InvalidModelError, match="runs past the end"):
        ir.load_model(path)


def test_external_data_inside_folder_loads(tmp_path):
    path, data = _externalize(tmp_path, "sub/w.bin")
    (path.parent / "sub").mkdir()
    (path.parent / "sub" / "w.bin").write_bytes(data)
    loaded = ir.load_model(path)
    assert loaded.graph.initializer[0].raw_data == data


@pytest.mark.parametrize("ir_version,opset", [(3, 9), (8, 17)])
def test_initializers_listed_as_inputs_stay_inputs_and_unfolded(ir_version, opset):
    """Old exporters list weights as graph inputs; a caller may override them (IR >= 4)."""
    w = nh.from_array(np.ones(3, np.float32), "w")
    two = nh.from_array(np.full(3, 2, np.float32), "two")
    m = model([h.make_node("Mul", ["w", "two"], ["w2"]), h.make_node("Add", ["x", "w2"], ["y"])],
              [fvi("x", [3]), fvi("w", [3]), fvi("two", [3])], [fvi("y", [3])], [w, two], opset=opset)
    m.ir_version = ir_version
    for level in (0, 2, 3):
        out = infoptc.optimize(m, opt_level=level)
        onnx.checker.check_model(out)
        assert [i.name for i in out.graph.input] == ["x", "w", "two"]
        assert [n.op_type for n in out.graph.node] == ["Mul", "Add"]  # nothing folded away


def test_type_proto_attributes_survive():
    """graphsurgeon skips TYPE_PROTO attributes; Optional's `type` must still come back."""
    opt_type = h.make_tensor_type_proto(onnx.TensorProto.FLOAT, [2])
    nodes = [h.make_node("Optional", [], ["o"], type=opt_type, name="empty"),
             h.make_node("OptionalHasElement", ["o"], ["has"], name="has"),
             h.make_node("Relu", ["x"], ["y"], name="relu")]
    m = model(nodes, [fvi("x", [2])], [fvi("y", [2]), h.make_tensor_value_info("has", onnx.TensorProto.BOOL, [])],
              opset=18)
    for level in (0, 3):
        out = infoptc.optimize(m, opt_level=level)
        attr = next(n for n in out.graph.node if n.op_type == "Optional").attribute[0]
        assert attr.name == "type" and attr.tp == opt_type
        onnx.checker.check_model(out, full_check=True)
