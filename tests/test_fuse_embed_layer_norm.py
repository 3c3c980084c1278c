"""fuse-embed-layer-norm: BERT-class embeddings + LayerNorm -> com.microsoft EmbedLayerNormalization."""

from __future__ import annotations

import sys
from pathlib import Path

import infoptc
import numpy as np
import onnx
import pytest
from infoptc.analysis import op_histogram
from infoptc.pass_manager import Contract
from infoptc.pipelines import OPT_LEVELS
from infoptc.verify import check_equivalent

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golden_models import embeddings  # noqa: E402

EMBED = "com.microsoft::EmbedLayerNormalization"


def fused(model, ops="ort", device="gpu"):
    """-O3, with the pass's device option (the default cpu leaves the lookups: see below)."""
    passes = OPT_LEVELS["O3"].replace("fuse-embed-layer-norm,", f"fuse-embed-layer-norm{{device={device}}},")
    art = infoptc.compile(model, passes=passes, ops=ops)
    record = next(r for r in art.pass_records if r.name == "fuse-embed-layer-norm")
    return art, record.counters


def matches(model, out, batches=(1, 3), seqs=(5, 16)):
    """Equal to the original on ONNX Runtime within fp32 reassociation (1e-5 abs, 1e-4 rel), on
    valid ids of several batch and sequence sizes."""
    feeds = [embeddings.example_inputs(model, batch=b, seq=s, seed=b * s) for b in batches for s in seqs]
    check_equivalent(model, out, Contract.REASSOCIATING, feeds=feeds)


def node(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


def test_bert_spelling_becomes_one_op_with_implied_positions_and_the_zero_token_types_folded():
    model = embeddings.build("bert")
    art, counters = fused(model)
    assert op_histogram(art.model) == {"Cast": 1, EMBED: 1}
    assert counters["embed_layer_norm"] == 1
    embed = node(art.model, "EmbedLayerNormalization")
    # no segment ids or table (folded into the positions), no position_ids (implied 0..S-1)
    assert list(embed.input)[1] == "" and list(embed.input)[4] == "" and len(embed.input) == 7
    attrs = {a.name: a for a in embed.attribute}
    assert abs(attrs["epsilon"].f - 1e-12) < 1e-18 and attrs["mask_index_type"].i == 0
    matches(model, art.model)


def test_token_type_ids_input_becomes_segment_ids():
    model = embeddings.build("token_types")
    art, _ = fused(model)
    embed = node(art.model, "EmbedLayerNormalization")
    cast = {n.output[0]: n.input[0] for n in art.model.graph.node if n.op_type == "Cast"}
    assert cast[embed.input[1]] == "token_type_ids" and cast[embed.input[0]] == "input_ids"
    assert embed.input[4] == "model.embeddings.token_type_embeddings.weight"
    matches(model, art.model)


def test_distilbert_two_lookups_and_a_shape_of_the_word_lookup():
    model = embeddings.build("distilbert")
    art, _ = fused(model)
    assert op_histogram(art.model) == {"Cast": 1, EMBED: 1}
    matches(model, art.model)


@pytest.mark.parametrize("style", ["roberta", "offset_positions"])
def test_positions_not_counting_from_zero_go_to_position_ids(style):
    """RoBERTa's padding offset (pad + cumsum(ids != pad)) and a buffer counting 2, 3, ...: not
    the op's implied positions, so the computed ids are its position_ids input."""
    model = embeddings.build(style)
    art, _ = fused(model)
    hist = op_histogram(art.model)
    assert hist[EMBED] == 1 and "LayerNormalization" not in hist
    assert not [n for n in art.model.graph.node if n.op_type == "Gather" and "_embeddings" in n.input[0]]
    embed = node(art.model, "EmbedLayerNormalization")
    assert len(embed.input) == 9 and embed.input[8]
    matches(model, art.model)


def test_without_beta_a_zero_beta_is_given():
    model = embeddings.build("bert", beta=False)
    art, _ = fused(model)
    assert op_histogram(art.model)[EMBED] == 1
    matches(model, art.model)


def test_int32_ids_need_no_cast():
    model = embeddings.build("distilbert")
    ids = model.graph.input[0]
    ids.type.tensor_type.elem_type = 6  # the Gathers and Shape accept int32 alike
    art, _ = fused(model)
    assert op_histogram(art.model) == {EMBED: 1}
    feeds = [{"input_ids": f["input_ids"].astype(np.int32)} for f in
             (embeddings.example_inputs(model, batch=2, seq=7, seed=s) for s in range(2))]
    check_equivalent(model, art.model, Contract.REASSOCIATING, feeds=feeds)


def test_token_types_broadcast_along_the_sequence_are_refused_with_the_reason():
    model = embeddings.build("broadcast_token_types")
    art, counters = fused(model)
    assert EMBED not in op_histogram(art.model) and counters["rejected"] == 1
    reason = art.reports["fuse-embed-layer-norm"]["rejected"]["embed_layer_norm"]
    assert "'token_type_ids'" in reason and "does not broadcast" in reason
    matches(model, art.model)


def test_standard_policy_keeps_the_lookups_and_says_why():
    model = embeddings.build("bert")
    art, counters = fused(model, ops="standard")
    assert EMBED not in op_histogram(art.model) and counters["rejected"] == 1
    assert "contrib ops are not allowed" in art.reports["fuse-embed-layer-norm"]["rejected"]["embed_layer_norm"]


def test_in_o3_after_the_fusions_that_follow_dims_to_the_ids_and_hidden_from_quantizers():
    from infoptc.pipelines import pipeline_before_quantization

    o3 = OPT_LEVELS["O3"]
    assert o3.index("fuse-embed-layer-norm") > max(o3.index(p) for p in ("fuse-attention,", "fuse-skip-layer-norm"))
    assert "fuse-embed-layer-norm" not in OPT_LEVELS["O2"]
    assert all(getattr(p, "name", None) != "fuse-embed-layer-norm" for p in pipeline_before_quantization(3))


def test_non_counting_constant_positions_are_not_taken_as_implied():
    """A [1, S] constant that does not count 0..S-1 is passed as position_ids, never dropped."""
    from onnx import numpy_helper

    model = embeddings.build("offset_positions")
    buffer = next(i for i in model.graph.initializer if i.name == "model.embeddings.position_ids")
    values = numpy_helper.to_array(buffer).copy()
    values[0, 3] = 0  # 2, 3, 4, 0, 6...: neither 0..S-1 nor monotonic
    buffer.CopyFrom(numpy_helper.from_array(values, buffer.name))
    art, _ = fused(model)
    assert len(node(art.model, "EmbedLayerNormalization").input) == 9
    matches(model, art.model)


def test_for_the_cpu_provider_the_lookups_stay_with_the_reason():
    """With EmbedLayerNormalization ONNX Runtime proves the residual shapes and fuses every
    residual Add + LayerNormalization into its slower CPU SkipLayerNormalization at load."""
    model = embeddings.build("bert")
    for art, counters in (fused(model, device="cpu"), (infoptc.compile(model, opt_level=3), None)):
        assert EMBED not in op_histogram(art.model)
        reason = art.reports["fuse-embed-layer-norm"]["rejected"]["embed_layer_norm"]
        assert "CPU provider" in reason and "device=gpu" in reason


def test_a_shape_read_of_a_lookup_other_than_the_words_is_refused():
    """Shape(position lookup) is [1, S, H], not the output's [B, S, H]: it cannot be re-pointed."""
    from onnx import TensorProto, helper

    model = embeddings.build("bert")
    pos = next(n for n in model.graph.node if n.name.endswith("position_embeddings/Gather")).output[0]
    model.graph.node.append(helper.make_node("Shape", [pos], ["pos_shape"], name="/pos_shape"))
    model.graph.output.append(helper.make_tensor_value_info("pos_shape", TensorProto.INT64, [3]))
    art, counters = fused(model)
    assert EMBED not in op_histogram(art.model) and counters["rejected"] == 1
    assert "not provably the output's" in art.reports["fuse-embed-layer-norm"]["rejected"]["embed_layer_norm"]
    matches(model, art.model)


@pytest.mark.parametrize("name, exporter, opset", [("bert", "torchscript", 17), ("bert", "dynamo", 20),
                                                   ("bert_sdpa", "torchscript", 17)])
def test_real_exports_fixtures_fuse_with_device_gpu_and_match(name, exporter, opset):
    """What torch.onnx writes (the committed tiny exports, tests/fixtures/real_exports)."""
    fixtures = Path(__file__).resolve().parent / "fixtures" / "real_exports"
    sys.path.insert(0, str(fixtures))
    from make_fixtures import TINY, fixture_path

    from golden_models import real_exports

    path = fixture_path(name, exporter, opset)
    original = onnx.load(str(path))
    art, counters = fused(original)
    hist = op_histogram(art.model)
    assert hist[EMBED] == 1 and counters["embed_layer_norm"] == 1
    assert not [n for n in art.model.graph.node if n.op_type == "Gather" and "embeddings" in n.input[0]]
    inputs = [real_exports.example_inputs(name, batch=2, seq=12, seed=s, overrides=TINY[name]) for s in (0, 1)]
    check_equivalent(original, art.model, Contract.REASSOCIATING, feeds=inputs)
