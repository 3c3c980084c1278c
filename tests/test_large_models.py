"""Models above protobuf's 2 GiB limit: loaded and saved through external data."""

import numpy as np
import onnx
import pytest
from onnx import helper as h

import infoptc
from infoptc import ir

from _models import fvi, model


@pytest.mark.slow
def test_model_above_2gb_round_trips_through_external_data(tmp_path):
    n = 2**29 + 2**26  # 2.25 GiB of float32
    placeholder = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[0])
    m = model([h.make_node("ReduceSum", ["w"], ["s"], keepdims=0), h.make_node("Add", ["x", "s"], ["y"])],
              [fvi("x", [1])], [fvi("y", [1])], [placeholder])
    w = m.graph.initializer[0]  # filled in place: protobuf cannot copy a >2 GiB message into a list
    w.dims[:] = [n]
    values = np.zeros(n, np.float32)
    values[[0, n // 2, n - 1]] = (1.0, 2.0, 4.0)  # a sum that float32 accumulation gets exactly
    w.raw_data = values.tobytes()
    del values
    written = ir.save_model(m, tmp_path / "big.onnx")  # too big for one protobuf: goes external
    assert [p.name for p in written] == ["big.onnx.data", "big.onnx"]
    del m
    art = infoptc.compile(tmp_path / "big.onnx", opt_level=1)
    art.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").stat().st_size >= n * 4
    del art
    reloaded = infoptc.load(tmp_path / "out.onnx")
    assert reloaded.run({"x": np.ones(1, np.float32)})["y"][0] == np.float32(8.0)
