"""cluster-weights: a per-tensor k-means codebook."""

from __future__ import annotations

import numpy as np
import onnx
from infoptc import driver
from infoptc.passes.compress.cluster_weights import kmeans_1d
from infoptc.verify import run_onnx

from _compress_mlp import feed, mlp


def _valid(model) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def _few_values(seed: int, count: int):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(count)
    return values[rng.integers(0, count, (64, 96))]


def test_weights_with_few_values_are_reproduced_exactly_through_the_gather():
    model = mlp(weights=(_few_values(0, 16), _few_values(1, 11)))
    out = driver.optimize(model, opt_level=0, passes="cluster-weights{clusters=16,min-size=16}")
    _valid(out)
    assert [n.op_type for n in out.graph.node].count("Gather") == 2
    assert {t.data_type for t in out.graph.initializer if t.name.endswith("_indices")} == {onnx.TensorProto.UINT8}
    assert out.ByteSize() < model.ByteSize() / 3
    np.testing.assert_array_equal(run_onnx(out, feed())["y"], run_onnx(model, feed())["y"])


def test_expanded_store_has_k_values_per_tensor_and_beats_a_uniform_grid():
    model = mlp()
    out = driver.optimize(model, opt_level=0, passes="cluster-weights{clusters=32,store=expanded}")
    _valid(out)
    weights = [onnx.numpy_helper.to_array(t) for t in out.graph.initializer if t.name.endswith("_clustered")]
    assert len(weights) == 2 and all(len(np.unique(w)) <= 32 for w in weights)
    original = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for w, name in zip(weights, ("W1", "W2")):
        o = original[name]
        grid = np.linspace(o.min(), o.max(), 32)
        uniform = grid[np.abs(o[..., None] - grid).argmin(-1)]  # 32 evenly spaced levels, same count
        assert np.square(w - o).sum() < 0.6 * np.square(uniform - o).sum()


def test_kmeans_is_deterministic_and_no_worse_than_its_quantile_start():
    x = np.random.default_rng(3).standard_normal(5000)
    c1, i1 = kmeans_1d(x, 8)
    c2, i2 = kmeans_1d(x, 8)
    assert np.array_equal(c1, c2) and np.array_equal(i1, i2)
    start = np.quantile(x, (np.arange(8) + 0.5) / 8)
    start_err = np.min(np.square(x[:, None] - start[None]), axis=1).sum()
    assert np.square(x - c1[i1]).sum() < start_err


def test_cli_flag(tmp_path):
    from infoptc.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(mlp(), src)
    assert main([str(src), "-Os", "--cluster", "16", "-o", str(out)]) == 0
    assert out.stat().st_size < src.stat().st_size / 3
    assert main([str(src), "--cluster-store", "gather", "-o", str(out)]) == 2  # needs --cluster
    assert main([str(src), "--cluster", "300", "-o", str(out)]) == 2
