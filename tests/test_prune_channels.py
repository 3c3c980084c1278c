"""prune-channels and the channel dependency analysis behind it.

The exactness tests cannot be satisfied by a pass that does nothing or by a wrong slicing: the
channels removed are first made exactly zero (producer weights, biases, BatchNormalization beta
and statistics, per-channel constants), so the pruned model must compute what the zeroed model
computes, with fewer channels; any misplaced offset (Concat, Split, Flatten into Gemm, grouped
convolutions) reads a live channel and changes the output.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from infoptc import driver, ir
from infoptc.errors import UsageError
from infoptc.passes.compress.channel_groups import channel_groups, const_value, kept_indices
from infoptc.passes.compress.prune_channels import apply, choose, keep_count
from infoptc.rewrite import Namer
from infoptc.verify import run_onnx

from _compress_models import Net, every_kind, transposed_and_reshaped

RTOL, ATOL = 1e-5, 1e-5  # removing exact zeros only changes the order of fp32 sums


def _graph(model):
    return ir.to_graph(ir.infer_shapes(model))


def _drop_plan(analysis, seed: int) -> dict[int, np.ndarray]:
    """Kept channels per prunable group: a random subset, balanced per block, whole heads."""
    rng = np.random.default_rng(seed)
    kept = {}
    for g in analysis.groups:
        if g.prunable:
            keep = keep_count(g.size, float(rng.uniform(0.2, 0.6)), 1, g.blocks, g.unit)
            kept[g.root] = choose(rng.standard_normal(g.size), keep, g.blocks, g.unit)
    return kept


def _zero_dropped(analysis, kept) -> None:
    """Make every channel that ``kept`` drops exactly zero where it is produced and rescaled."""
    for a in analysis.actions:
        if a.kind != "slice" or a.role == "in":
            continue
        alive = kept_indices(a.layout, kept, analysis.find)
        dead = np.setdiff1d(np.arange(const_value(a.node.inputs[a.index]).shape[a.axis]), alive)
        if not len(dead):
            continue
        w = np.array(const_value(a.node.inputs[a.index]))
        index = [slice(None)] * w.ndim
        index[a.axis] = dead
        w[tuple(index)] = 0
        a.node.inputs[a.index].values = w


def _zeroed_and_pruned(model, seed: int):
    graph = _graph(model)
    analysis = channel_groups(graph)
    kept = _drop_plan(analysis, seed)
    _zero_dropped(analysis, kept)
    zeroed = ir.from_graph(graph)
    apply(analysis, kept, Namer([graph]), graph.opset)
    graph.cleanup().toposort()
    return zeroed, ir.from_graph(graph), kept


def _valid(model) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def _feed(model, seed=0):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def test_the_analysis_finds_every_kind_of_coupling():
    groups = {tuple(g.producers): g for g in channel_groups(_graph(every_kind())).groups}
    residual = next(g for p, g in groups.items() if len(p) == 2 and g.size == 16)
    assert residual.prunable and residual.blocks == 4  # read by a conv with 4 groups
    assert any("BatchNormalization" in m for m in residual.members)
    assert any(m.startswith("Split") for m in residual.members)  # the Concat/Split offsets
    concat_tail = next(g for p, g in groups.items() if len(p) == 2 and g.size == 8)
    assert any(c.startswith("Gemm") for c in concat_tail.consumers)  # through MaxPool and Flatten
    head = next(g for g in groups.values() if g.producers[0].startswith("Gemm"))
    assert not head.prunable and "graph output" in head.reasons[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_removing_zeroed_channels_is_exact(seed):
    zeroed, pruned, kept = _zeroed_and_pruned(every_kind(), seed)
    assert kept and sum(len(v) for v in kept.values()) < 16 + 16 + 8
    _valid(pruned)
    assert ir.initializer_bytes(pruned) < ir.initializer_bytes(zeroed)
    feed = _feed(zeroed, seed)
    np.testing.assert_allclose(run_onnx(pruned, feed)["y"], run_onnx(zeroed, feed)["y"], rtol=RTOL, atol=ATOL)


def test_conv_transpose_prelu_instance_norm_and_a_flattening_reshape_are_exact():
    model = transposed_and_reshaped()
    groups = [g for g in channel_groups(_graph(model)).groups if g.prunable]
    assert sorted(g.size for g in groups) == [8, 12]
    zeroed, pruned, _ = _zeroed_and_pruned(model, 5)
    _valid(pruned)
    reshape = next(t for t in pruned.graph.initializer if t.name.startswith("shape"))
    assert onnx.numpy_helper.to_array(reshape)[1] < 8 * 16 * 16
    feed = _feed(zeroed)
    np.testing.assert_allclose(run_onnx(pruned, feed)["y"], run_onnx(zeroed, feed)["y"], rtol=RTOL, atol=ATOL)


def test_global_scope_removes_the_ratio_over_all_groups():
    model = every_kind()
    base = channel_groups(_graph(model)).groups
    total = sum(g.size for g in base if g.prunable)
    out = driver.optimize(model, opt_level=0, passes="prune-channels{ratio=0.5,scope=global,round-to=1}")
    _valid(out)
    after = sum(g.size for g in channel_groups(_graph(out)).groups if g.prunable)
    assert abs((total - after) - total // 2) <= 4  # grouped convs keep equal blocks: a few channels of slack


def test_bn_scale_finds_and_removes_channels_switched_off_by_batch_norm():
    """Channels whose BN gamma and beta are 0 are exactly zero: bn-scale must pick those and the
    pruned model must equal the original."""
    n = Net(seed=3)
    b1 = n.bn(n.conv("x", 3, 16), 16)
    model_ = n.head(n.op("Relu", [b1]), 16)
    dead = [1, 4, 5, 9, 12, 14]
    bn = next(node for node in model_.graph.node if node.op_type == "BatchNormalization")
    inits = {t.name: t for t in model_.graph.initializer}
    for name in bn.input[1:3]:
        value = onnx.numpy_helper.to_array(inits[name]).copy()
        value[dead] = 0
        inits[name].CopyFrom(onnx.numpy_helper.from_array(value, name))
    pruned = driver.optimize(model_, passes="prune-channels{ratio=0.375,criterion=bn-scale,round-to=1}")
    _valid(pruned)
    conv = next(t for t in pruned.graph.initializer if t.dims[:1] == [10] and len(t.dims) == 4)
    assert conv.dims[0] == 10
    feed = _feed(model_)
    np.testing.assert_allclose(run_onnx(pruned, feed)["y"], run_onnx(model_, feed)["y"], rtol=RTOL, atol=ATOL)


@st.composite
def cnns(draw):
    """Random chains of conv / bn / relu / residual / concat / depthwise / pool blocks."""
    n = Net(seed=draw(st.integers(0, 2**16)))
    x, c = "x", 3
    size = 8
    for block in draw(st.lists(st.sampled_from(["conv", "bn", "res", "cat", "dw", "pool", "split"]),
                               min_size=1, max_size=6)):
        if block == "conv" or c == 3:
            width = draw(st.sampled_from([4, 8, 12]))
            x, c = n.op("Relu", [n.conv(x, c, width, k=draw(st.sampled_from([1, 3])))]), width
        elif block == "bn":
            x = n.bn(x, c)
        elif block == "res":
            x = n.op("Add", [x, n.conv(n.op("Relu", [n.conv(x, c, c)]), c, c)])
        elif block == "cat":
            extra = draw(st.sampled_from([4, 8]))
            x, c = n.op("Concat", [x, n.conv(x, c, extra, k=1)], axis=1), c + extra
        elif block == "dw":
            x = n.conv(x, c, c, group=c)
        elif block == "split" and c % 2 == 0:
            a, b = n.op("Split", [x, n.const(np.array([c // 2, c // 2], np.int64), "split")], outputs=2, axis=1)
            x, c = n.op("Add", [n.conv(a, c // 2, c // 2, k=1), b]), c // 2
        elif block == "pool" and size > 2:
            x, size = n.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), size // 2
    return n.head(x, c, spatial=size)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=cnns(), seed=st.integers(0, 1000))
def test_random_graphs_lose_only_zeroed_channels(model, seed):
    zeroed, pruned, _ = _zeroed_and_pruned(model, seed)
    _valid(pruned)
    feed = _feed(zeroed, seed)
    np.testing.assert_allclose(run_onnx(pruned, feed)["y"], run_onnx(zeroed, feed)["y"], rtol=RTOL, atol=ATOL)


def test_the_pass_prunes_and_reconstruction_brings_the_outputs_back():
    model = every_kind()
    feeds = [_feed(model, s) for s in range(24)]
    ref = np.concatenate([run_onnx(model, f)["y"] for f in feeds])
    err = {}
    for rec in ("false", "true"):
        pruned = driver.optimize(model, passes=f"prune-channels{{ratio=0.25,round-to=4,reconstruct={rec}}}",
                                 calibration=feeds[:16])
        _valid(pruned)
        got = np.concatenate([run_onnx(pruned, f)["y"] for f in feeds])
        err[rec] = float(np.abs(got - ref)[16:].mean())  # judged on the samples it was not fit on
    assert 0 < err["true"] < err["false"]


def test_taylor_needs_calibration_and_bad_ratios_are_usage_errors():
    with pytest.raises(UsageError, match="calibration"):
        driver.optimize(every_kind(), passes="prune-channels{criterion=taylor}")
    for bad in ("1.0", "-0.1", "1.5"):
        with pytest.raises(UsageError, match=r"\[0, 1\)"):
            driver.optimize(every_kind(), passes=f"prune-channels{{ratio={bad}}}")


def test_nothing_to_prune_leaves_the_model_unchanged(caplog):
    n = Net()
    model = n.model(n.op("Relu", ["x"]), [1, 3, 8, 8])
    out = driver.optimize(model, opt_level=0, passes="prune-channels")
    assert out.graph.node[0].op_type == "Relu" and "no prunable channel group" in caplog.text


def test_cli_prune_and_inspect(tmp_path, capsys):
    from infoptc.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(every_kind(), src)
    np.savez(tmp_path / "cal.npz", x=np.stack([_feed(every_kind(), s)["x"] for s in range(4)]))
    assert main(["inspect", str(src), "--prune-groups", "--json"]) == 0
    assert '"prunable": true' in capsys.readouterr().out
    out = tmp_path / "p.onnx"
    assert main([str(src), "--prune", "channels=0.5", "--round-to", "4", "--prune-criterion", "taylor",
                 "--calibration", str(tmp_path / "cal.npz"), "--reconstruct", "-o", str(out)]) == 0
    _valid(onnx.load(out))
    assert main([str(src), "--prune", "channels=0.5", "--prune-criterion", "taylor", "-o", str(out)]) == 2
    assert main([str(src), "--prune", "ratio=0.5", "-o", str(out)]) == 2


def test_whole_attention_heads_and_ffn_widths_of_a_bert_are_removed_exactly(golden):
    """Heads whose Q, K, V weights and biases are zero contribute nothing (their context is
    zero); FFN channels zeroed before GELU likewise. The residual width stays whole."""
    model = onnx.load(golden("bert"))
    analysis = channel_groups(_graph(model))
    heads = [g for g in analysis.groups if g.prunable and g.unit > 1]
    ffn = [g for g in analysis.groups if g.prunable and g.unit == 1]
    assert heads and ffn
    assert all(len(g.producers) == 3 for g in heads)  # query, key, value
    assert all(not g.prunable for g in analysis.groups if any("LayerNorm" in r for r in g.reasons))
    zeroed, pruned, kept = _zeroed_and_pruned(model, 7)
    _valid(pruned)
    for g in heads:
        assert len(kept[g.root]) % g.unit == 0 and len(kept[g.root]) < g.size
    feeds = {i.name: np.random.default_rng(0).integers(1, 100, (1, 16)).astype(np.int64)
             for i in zeroed.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.INT64}
    for name in feeds:
        if "mask" in name:
            feeds[name] = np.ones((1, 16), np.int64)
    ref, got = run_onnx(zeroed, feeds), run_onnx(pruned, feeds)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-4)


def test_the_whole_model_guard_prefers_whichever_is_nearer_the_original():
    from infoptc.calibration_data import CalibrationData, model_inputs
    from infoptc.passes.compress.refit import closer

    model = every_kind()
    worse = driver.optimize(model, opt_level=0, passes="prune-channels{ratio=0.5,round-to=4}")
    slightly = driver.optimize(model, opt_level=0, passes="prune-channels{ratio=0.25,round-to=4}")
    data = CalibrationData([_feed(model, s) for s in range(4)], model_inputs(model))
    assert closer(model, worse, slightly, data) and not closer(model, slightly, worse, data)
