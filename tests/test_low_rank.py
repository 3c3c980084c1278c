"""low-rank: truncated SVD of Gemm/MatMul weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from infoptc import driver
from infoptc.verify import run_onnx

from _compress_mlp import feed, mlp


def _valid(model) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def test_full_rank_is_exact_to_fp32():
    model = mlp()
    out = driver.optimize(model, opt_level=0, passes="low-rank{energy=1.0,only-if-cheaper=false}")
    _valid(out)
    assert [n.op_type for n in out.graph.node].count("MatMul") == 3  # MatMul -> 2, Gemm -> MatMul + Gemm
    np.testing.assert_allclose(run_onnx(out, feed())["y"], run_onnx(model, feed())["y"], rtol=1e-4, atol=1e-4)


def test_a_low_rank_matrix_is_found_and_reproduced():
    rng = np.random.default_rng(1)
    rank4 = lambda: rng.standard_normal((64, 4)) @ rng.standard_normal((4, 96))  # noqa: E731
    model = mlp(weights=(rank4(), rank4()))
    out = driver.optimize(model, opt_level=0, passes="low-rank{energy=0.999999}")
    _valid(out)
    ranks = sorted(min(t.dims) for t in out.graph.initializer if "lowrank" in t.name)
    assert ranks == [4, 4, 4, 4]
    factors = sum(np.prod(t.dims) for t in out.graph.initializer if "lowrank" in t.name)
    assert factors == 2 * 4 * (64 + 96)  # two layers, rank 4: (K + N) r each, against K N = 6144
    np.testing.assert_allclose(run_onnx(out, feed())["y"], run_onnx(model, feed())["y"], rtol=1e-4, atol=1e-3)


def test_full_rank_random_weights_are_left_alone_when_not_cheaper():
    out = driver.optimize(mlp(), opt_level=0, passes="low-rank{energy=0.99}")
    assert [n.op_type for n in out.graph.node].count("MatMul") == 1


def test_activation_aware_beats_plain_svd_on_skewed_inputs():
    model = mlp(seed=2)
    scale = np.ones(64, np.float32)
    scale[:8] = 20.0  # a few input features carry most of the signal
    cal = [{"x": feed(seed=s)["x"] * scale} for s in range(8)]
    ref = [run_onnx(model, f)["y"] for f in cal]
    errors = {}
    for aware in ("false", "true"):
        out = driver.optimize(model, opt_level=0, calibration=cal,
                              passes=f"low-rank{{ratio=0.25,activation-aware={aware}}}")
        errors[aware] = sum(float(np.square(run_onnx(out, f)["y"] - r).sum()) for f, r in zip(cal, ref))
    assert errors["true"] < errors["false"]


def test_bad_options_are_usage_errors():
    from infoptc.errors import UsageError

    with pytest.raises(UsageError):
        driver.optimize(mlp(), passes="low-rank{energy=1.5}")
    with pytest.raises(UsageError, match="calibration"):
        driver.optimize(mlp(), passes="low-rank{activation-aware=true}")


def test_cli_flag(tmp_path):
    from infoptc.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    rng = np.random.default_rng(1)
    onnx.save(mlp(weights=(rng.standard_normal((64, 4)) @ rng.standard_normal((4, 96)),) * 2), src)
    assert main([str(src), "--low-rank", "energy=0.999", "-o", str(out)]) == 0
    assert sum(n.op_type == "MatMul" for n in onnx.load(out).graph.node) == 3
    assert main([str(src), "--low-rank", "rank=3", "-o", str(out)]) == 2


def test_reconstruction_refits_the_second_factor_towards_the_original_outputs():
    model = mlp(seed=3)
    cal = [feed(seed=s) for s in range(12)]
    held_out = [feed(seed=s) for s in range(100, 104)]
    err = {}
    for rec in ("false", "true"):
        out = driver.optimize(model, opt_level=0, calibration=cal,
                              passes=f"low-rank{{ratio=0.25,reconstruct={rec}}}")
        onnx.checker.check_model(out, full_check=True)
        err[rec] = sum(float(np.square(run_onnx(out, f)["y"] - run_onnx(model, f)["y"]).sum()) for f in held_out)
    assert err["true"] < err["false"]
