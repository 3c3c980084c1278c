"""BERT-class embedding layers alone, spelled as ``torch.onnx.export`` writes them from
Hugging Face ``transformers`` (TorchScript exporter): word + token type + position lookups,
their sum, LayerNorm. For the fuse-embed-layer-norm tests and benchmarks/embed_layer_norm.py.

    model = build("bert")                # input_ids only: token types from an all-zero buffer
    feeds = example_inputs(model, batch=2, seq=16)

Styles:

- ``bert``: positions ``Slice(position_ids buffer, 0, S)`` (a row counting 0..P-1), token types
  ``Expand(GatherElements(Expand(zeros buffer), positions), Where(Shape == -1, 1, Shape))`` (the
  exports' ``token_type_ids`` buffer), sum ``(word + token type) + position``;
- ``token_types``: the same with ``token_type_ids`` a model input;
- ``distilbert``: word + position, the sequence length read from ``Shape(word lookup)``;
- ``roberta``: positions ``pad + cumsum(ids != pad) * (ids != pad)`` (RoBERTa's padding offset);
- ``offset_positions``: positions sliced from a buffer counting 2..P+1 (not 0..S-1);
- ``broadcast_token_types``: ``token_type_ids`` input of shape ``[batch, 1]``, broadcast along
  the sequence by the Add (which EmbedLayerNormalization does not do).
"""

from __future__ import annotations

import numpy as np
import onnx

from ._graph import FLOAT, INT64, TorchStyleGraph, dim, normal, tensor_info

STYLES = ("bert", "token_types", "distilbert", "roberta", "offset_positions", "broadcast_token_types")
S = "/model/embeddings"
PAD = 1  # RoBERTa's padding_idx


def _unsqueeze(g: TorchStyleGraph, x: str) -> str:
    return g.op("Unsqueeze", [x, g.const([0], S, np.int64)], S)


def _positions(g: TorchStyleGraph, style: str, ids: str, word: str, positions: int) -> str:
    if style == "roberta":
        keep = g.op("Cast", [g.op("Not", [g.op("Equal", [ids, g.const(PAD, S, np.int64)], S)], S)], S, to=6)
        count = g.op("Mul", [g.op("CumSum", [keep, g.const(1, S, np.int64)], S), keep], S)
        return g.op("Add", [g.op("Cast", [count], S, to=INT64), g.const(PAD, S, np.int64)], S)
    start = 2 if style == "offset_positions" else 0
    buffer = g.init("model.embeddings.position_ids", np.arange(start, start + positions, dtype=np.int64)[None])
    seq = dim(g, word if style == "distilbert" else ids, S, 1)
    one = g.const([1], S, np.int64)
    return g.op("Slice", [buffer, g.const([0], S, np.int64), _unsqueeze(g, seq), one, one], S)


def _zero_token_types(g: TorchStyleGraph, ids: str, pos: str, positions: int) -> str:
    """The exports' ``token_type_ids`` buffer of zeros, gathered at the positions and expanded to
    ``ids``'s shape through torch's ``expand(-1)`` guard."""
    zeros = g.init("model.embeddings.token_type_ids", np.zeros((1, positions), np.int64))
    shape = g.op("Concat", [_unsqueeze(g, dim(g, ids, S, 0)), _unsqueeze(g, dim(g, ids, S, 1))], S, axis=0)
    guard = g.op("Where", [g.op("Equal", [shape, g.const([-1, -1], S, np.int64)], S),
                           g.const([1, 1], S, np.int64), shape], S)
    batch = g.op("Concat", [_unsqueeze(g, dim(g, pos, S, 0)), g.const([positions], S, np.int64)], S, axis=0)
    rows = g.op("Expand", [zeros, batch], S)  # [rows of the positions, P]
    return g.op("Expand", [g.op("GatherElements", [rows, pos], S, axis=1), guard], S)


def build(style: str = "bert", vocab: int = 100, hidden: int = 32, positions: int = 64, types: int = 2,
          beta: bool = True, epsilon: float = 1e-12, seed: int = 0) -> onnx.ModelProto:
    if style not in STYLES:
        raise KeyError(f"unknown embedding style {style!r}; known: {', '.join(STYLES)}")
    rng = np.random.default_rng(seed)
    g = TorchStyleGraph()
    inputs = [tensor_info("input_ids", INT64, ["batch", "seq"])]
    word = g.op("Gather", [g.init("model.embeddings.word_embeddings.weight", normal(rng, (vocab, hidden), 1.0)),
                           "input_ids"], f"{S}/word_embeddings")
    pos = _positions(g, style, "input_ids", word, positions)
    lookups = [word]
    if style != "distilbert":
        if style in ("token_types", "broadcast_token_types"):
            inputs.append(tensor_info("token_type_ids", INT64, ["batch", "seq" if style == "token_types" else 1]))
            types_ids = "token_type_ids"
        else:
            types_ids = _zero_token_types(g, "input_ids", pos, positions)
        table = g.init("model.embeddings.token_type_embeddings.weight", normal(rng, (types, hidden), 1.0))
        lookups.append(g.op("Gather", [table, types_ids], f"{S}/token_type_embeddings"))
    table = g.init("model.embeddings.position_embeddings.weight",
                   normal(rng, (positions + (PAD + 1 if style == "roberta" else 2), hidden), 1.0))
    lookups.append(g.op("Gather", [table, pos], f"{S}/position_embeddings"))
    total = lookups[0]
    for x in lookups[1:]:
        total = g.op("Add", [total, x], S)
    affine = [g.init("model.embeddings.LayerNorm.weight", normal(rng, (hidden,), 1.0))]
    if beta:
        affine.append(g.init("model.embeddings.LayerNorm.bias", normal(rng, (hidden,), 1.0)))
    out = g.op("LayerNormalization", [total, *affine], f"{S}/LayerNorm", axis=-1, epsilon=epsilon)
    return g.make_model("embeddings", inputs, [tensor_info(out, FLOAT, ["batch", "seq", hidden])])


def example_inputs(model: onnx.ModelProto, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid ids: inside the vocabulary (RoBERTa-style: the last quarter of row 0 is padding),
    token types inside their table."""
    rng = np.random.default_rng(seed)
    tables = {i.name: i.dims[0] for i in model.graph.initializer}
    vocab = tables["model.embeddings.word_embeddings.weight"]
    ids = rng.integers(PAD + 1, vocab, (batch, seq)).astype(np.int64)
    ids[0, seq - seq // 4:] = PAD
    feeds = {"input_ids": ids}
    for i in model.graph.input:
        if i.name == "token_type_ids":
            width = 1 if i.type.tensor_type.shape.dim[1].dim_value == 1 else seq
            feeds[i.name] = rng.integers(0, tables["model.embeddings.token_type_embeddings.weight"],
                                         (batch, width)).astype(np.int64)
    return feeds
