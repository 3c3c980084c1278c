"""sparsify: magnitude and 2:4 sparsity of weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from infoptc import driver
from infoptc.passes.compress.sparsify import two_of_four
from infoptc.verify import run_onnx

from _compress_mlp import feed, mlp


def _weights(model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_two_of_four_along_the_input_axis():
    out = driver.optimize(mlp(), opt_level=0, passes="sparsify{pattern=2:4}")
    onnx.checker.check_model(out, full_check=True)
    w = _weights(out)
    w1 = next(v for k, v in w.items() if k.startswith("W1"))  # MatMul [K, N]: groups along K (axis 0)
    w2 = next(v for k, v in w.items() if k.startswith("W2"))  # Gemm transB [N, K]: along axis 1
    assert (np.count_nonzero(w1.T.reshape(96, 16, 4), axis=-1) <= 2).all()
    assert (np.count_nonzero(w2.reshape(64, 24, 4), axis=-1) <= 2).all()
    original = _weights(mlp())
    kept = w1 != 0
    assert np.array_equal(w1[kept], original["W1"][kept])  # survivors are untouched...
    assert np.abs(original["W1"][~kept]).mean() < np.abs(original["W1"][kept]).mean()  # ...and the larger


def test_weights_already_two_of_four_are_unchanged():
    sparse = two_of_four(np.random.default_rng(0).standard_normal((64, 96)), 0)
    sparse2 = two_of_four(np.random.default_rng(1).standard_normal((64, 96)), 1)
    model = mlp(weights=(sparse, sparse2))
    out = driver.optimize(model, opt_level=0, passes="sparsify{pattern=2:4}")
    np.testing.assert_array_equal(run_onnx(out, feed())["y"], run_onnx(model, feed())["y"])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_unstructured_zeroes_the_smallest_fraction(ratio):
    out = driver.optimize(mlp(), opt_level=0, passes=f"sparsify{{pattern=unstructured,ratio={ratio}}}")
    w = next(v for k, v in _weights(out).items() if k.startswith("W1"))
    assert np.count_nonzero(w == 0) == int(ratio * w.size)
    original = _weights(mlp())["W1"]
    assert np.abs(original[w == 0]).max() <= np.abs(original[w != 0]).min()


def test_cli_flag(tmp_path):
    from infoptc.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(mlp(), src)
    assert main([str(src), "--sparsify", "unstructured=0.5", "-o", str(out)]) == 0
    w = next(v for k, v in _weights(onnx.load(out)).items() if k.startswith("W1"))
    assert np.count_nonzero(w == 0) == w.size // 2
    assert main([str(src), "--sparsify", "unstructured=1.5", "-o", str(out)]) == 2
    assert main([str(src), "--sparsify", "3:4", "-o", str(out)]) == 2
