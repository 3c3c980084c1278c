"""infoptc export triton: the repository's config parses as Triton's ModelConfig (tritonclient's
generated protobuf), states the batch the model really has, and the exported model.onnx computes
at every preferred batch size what the original computes one sample at a time. Bad input: no
batch dimension gives max_batch_size 0 and the reason; an existing folder is refused without
--force; a failed export leaves nothing behind."""

from __future__ import annotations

import infoptc
import numpy as np
import onnx
import pytest
from infoptc import triton
from infoptc.bench import LatencyStats, SweepRow, choose_batching
from infoptc.cli import main
from infoptc.errors import UsageError
from infoptc.verify import random_inputs, run_onnx

pytestmark = pytest.mark.timeout(300)


def parse(folder):
    message = triton.model_config_proto()
    assert message is not None, "tritonclient is in the test extra"
    from google.protobuf import text_format

    return text_format.Parse((folder / "config.pbtxt").read_text(), message())


def check_batches(original: onnx.ModelProto, exported: onnx.ModelProto, sizes, dims=None):
    """The exported model at batch n == the original run on each of the n samples."""
    for n in sizes:
        feeds = [random_inputs(original, seed=100 + i, dims=dims) for i in range(n)]
        got = run_onnx(exported, {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
        for name, value in got.items():
            want = np.concatenate([run_onnx(original, f)[name] for f in feeds])
            np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-5, err_msg=f"batch {n}, {name}")


def served_sizes(config):
    """The batch sizes Triton may form: each preferred one, else 1 and the largest."""
    return sorted(set(config.dynamic_batching.preferred_batch_size) or {1, config.max_batch_size})


def test_a_fixed_batch_cnn_exports_with_a_batch_dimension_and_chosen_batching(golden, tmp_path):
    result = triton.export_triton(golden("resnet"), tmp_path / "repo", "resnet", latency_budget_ms=1000,
                                  max_batch_size=4, sweep_iterations=3, threads=1, response_cache=True)
    folder = tmp_path / "repo" / "resnet"
    config = parse(folder)
    assert config.name == "resnet" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4 and "made symbolic" in result.batch_note
    assert list(config.input[0].dims) == [3, 224, 224] and config.input[0].data_type == 11  # TYPE_FP32
    assert list(config.output[0].dims) == [10]
    assert config.instance_group[0].count == 1 and config.instance_group[0].kind == 2  # KIND_CPU
    assert config.response_cache.enable
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    assert config.parameters["inter_op_thread_count"].string_value == "1"
    assert [r["batch"] for r in result.sweep] == [1, 2, 4]
    assert set(config.dynamic_batching.preferred_batch_size) <= {2, 4}
    assert config.dynamic_batching.max_queue_delay_microseconds == result.batching["max_queue_delay_us"]
    assert sorted(p.name for p in folder.rglob("*")) == ["1", "config.pbtxt", "model.onnx"]
    check_batches(onnx.load(golden("resnet")), onnx.load(folder / "1" / "model.onnx"), served_sizes(config))


def test_an_encoder_with_a_symbolic_batch_exports_its_other_dims_as_variable(golden, tmp_path):
    assert main(["export", "triton", str(golden("bert")), "--repo", str(tmp_path), "--name", "bert",
                 "--max-batch-size", "4", "--ort-graph-level", "extended", "--instances", "2", "-q"]) == 0
    config = parse(tmp_path / "bert")
    assert config.max_batch_size == 4
    assert [(t.name, list(t.dims), t.data_type) for t in config.input] == [
        ("input_ids", [-1], 9), ("attention_mask", [-1], 9)]  # TYPE_INT64, seq stays variable
    assert config.optimization.graph.level == 1  # the ORT backend's "extended", not ORT's own 2
    assert config.instance_group[0].count == 2
    assert config.HasField("dynamic_batching") and not config.dynamic_batching.preferred_batch_size
    check_batches(onnx.load(golden("bert")), onnx.load(tmp_path / "bert" / "1" / "model.onnx"), [1, 3],
                  dims={"seq": 8})


def test_the_graph_levels_are_written_in_the_backends_numbering():
    assert triton.ORT_GRAPH_LEVELS == {"all": None, "basic": -1, "extended": 1, "disabled": 2}


def test_a_model_without_a_batch_dimension_gets_max_batch_size_0_and_the_reason(golden, tmp_path):
    result = triton.export_triton(golden("control_flow"), tmp_path, "cf", max_batch_size=8)
    config = parse(tmp_path / "cf")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert "no batch dimension" in result.batch_note and "x (2)" in result.batch_note
    assert list(config.input[0].dims) == [2, 8]


def test_a_symbolic_leading_dim_that_mixes_samples_is_no_batch(tmp_path):
    graph = onnx.helper.make_graph([onnx.helper.make_node("Softmax", ["x"], ["y"], axis=0)], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    result = triton.export_triton(model, tmp_path, "sm")
    assert result.max_batch_size == 0 and "mixes samples" in result.batch_note
    assert list(parse(tmp_path / "sm").input[0].dims) == [-1, 4]


def test_an_existing_folder_is_refused_without_force_and_never_half_written(golden, tmp_path, monkeypatch):
    args = ["export", "triton", str(golden("mlp")), "--repo", str(tmp_path), "--name", "m", "-q"]
    assert main(args) == 0
    before = (tmp_path / "m" / "config.pbtxt").read_text()
    assert main(args) == 2
    assert main([*args, "--max-batch-size", "2", "--force"]) == 0
    assert "max_batch_size: 2" in (tmp_path / "m" / "config.pbtxt").read_text() != before

    def broken(*a, **k):
        raise OSError("disk full (test)")

    monkeypatch.setattr(infoptc.ir, "save_model", broken)
    with pytest.raises(OSError):
        triton.export_triton(golden("mlp"), tmp_path, "m", force=True)
    with pytest.raises(OSError):
        triton.export_triton(golden("mlp"), tmp_path, "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder, no half model
    assert "max_batch_size: 2" in (tmp_path / "m" / "config.pbtxt").read_text()  # the old one intact


def test_bad_names_and_backends_are_usage_errors(golden, tmp_path):
    with pytest.raises(UsageError, match="bad model name"):
        triton.export_triton(golden("mlp"), tmp_path, "a/b")
    with pytest.raises(UsageError, match="takes the .plan"):
        triton.export_triton(golden("mlp"), tmp_path, "m", backend="tensorrt")
    assert not any(tmp_path.iterdir())


def _row(batch, ms_p50, ms_p99):
    samples = [ms_p50 / 1e3] * 98 + [ms_p99 / 1e3] * 2
    return SweepRow(batch, LatencyStats.of(samples, batch))


def test_batching_stops_where_throughput_stops_growing_and_the_delay_keeps_the_budget():
    # per-sample time halves up to batch 4, then flattens: the knee is 4; 16 misses the budget
    rows = [_row(1, 4.0, 5.0), _row(2, 4.0, 5.0), _row(4, 4.0, 6.0), _row(8, 7.6, 9.0), _row(16, 15.0, 21.0)]
    chosen = choose_batching(rows, budget_ms=20)
    assert chosen["preferred"] == [2, 4] and chosen["knee"] == 4
    p99_at_knee = rows[2].stats.percentiles[99] * 1e3
    assert chosen["max_queue_delay_us"] == int((20 - p99_at_knee) * 1e3)
    assert chosen["max_queue_delay_us"] / 1e3 + p99_at_knee <= 20
    # a dip between two sizes (noise) does not end the growth; the size in the dip is no gain
    noisy = [_row(1, 4.0, 5.0), _row(2, 9.0, 10.0), _row(4, 4.0, 6.0)]
    assert choose_batching(noisy, budget_ms=20)["preferred"] == [4]
    flat = [_row(1, 4.0, 5.0), _row(2, 7.5, 9.0), _row(4, 15.0, 16.0)]  # per-sample time never drops by 10%
    assert choose_batching(flat, budget_ms=20)["preferred"] == []
    none = choose_batching(rows, budget_ms=1)
    assert none["preferred"] == [] and none["max_queue_delay_us"] == 0 and "batch 1" in none["reason"]


@pytest.mark.slow
def test_a_real_size_cnn_exports_and_serves_every_preferred_batch(tmp_path):
    from golden_models import module

    original = module("resnet18").build()
    path = tmp_path / "resnet18.onnx"
    onnx.save(original, path)
    optimized = infoptc.optimize(path)
    result = triton.export_triton(optimized, tmp_path / "repo", "resnet18", latency_budget_ms=2000,
                                  sweep_iterations=3, threads=2)
    config = parse(tmp_path / "repo" / "resnet18")
    assert config.max_batch_size == 8 and list(config.input[0].dims) == [3, 224, 224]
    assert [r["batch"] for r in result.sweep] == [1, 2, 4, 8]
    check_batches(original, onnx.load(tmp_path / "repo" / "resnet18" / "1" / "model.onnx"), served_sizes(config))


def test_bench_sweeps_batch_sizes_side_by_side(golden, tmp_path, capsys):
    import json

    plot = tmp_path / "sweep.png"
    assert main(["bench", str(golden("mlp")), "--batch", "4,1,2", "--iterations", "3", "--plot", str(plot),
                 "--json", "-", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["rows"]
    assert [r["batch"] for r in rows] == [1, 2, 4] and all(r["runs"] == 3 for r in rows)
    for r in rows:
        assert r["p50_ms"] <= r["p99_ms"]
        assert r["throughput_per_s"] == pytest.approx(r["batch"] / r["p50_ms"] * 1e3)
        assert r["speedup_per_sample"] == pytest.approx(rows[0]["p50_ms"] / (r["p50_ms"] / r["batch"]))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", str(golden("resnet")), "--batch", "1,2", "-q"]) == 2  # a fixed batch: make it dynamic first
    assert "make-batch-dynamic" in capsys.readouterr().err
    assert main(["bench", str(golden("mlp")), "--batch", "0,2", "-q"]) == 2
