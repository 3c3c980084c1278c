"""BERT-small at real size (4 layers, hidden 512, 8 heads, intermediate 2048), random weights.

The layout of Google's ``bert_uncased_L-4_H-512_A-8`` as HF ``BertModel``
(without the pooler), exported the torch.onnx way at opset 17: full BERT
vocabulary (30522), 512 positions, 2 token types; position / token-type ids
sliced from the exporter's buffers; extended attention mask
``(1 - mask) * -10000``; Q/K/V MatMul + Add, dynamic head-split Reshapes,
Div by sqrt(64), Softmax; erf GELU decomposed; LayerNorm as the opset-17
LayerNormalization op (eps 1e-12).  28,500,992 parameters (the real model's
28.8M less its 0.26M pooler).  Random weights from a fixed seed (Linear weights
std 1/sqrt(fan_in), output projections half that, embeddings std 0.02).  See
golden_models._transformer.bert_encoder.

Inputs ``input_ids`` / ``attention_mask`` int64 [batch, seq] (symbolic dims
``batch``, ``seq``; seq <= 512, benchmarks use 128), output
``last_hidden_state`` float32 [batch, seq, 512].  Real-size: built on demand,
not part of ``build_all()``.
"""

from __future__ import annotations

import numpy as np
import onnx

from ._graph import FLOAT, INT64, TorchStyleGraph, tensor_info
from ._transformer import BertConfig, bert_encoder, random_params

SEED = 50005
CONFIG = BertConfig(layers=4, hidden=512, heads=8, intermediate=2048)
SEQ = 128
REFERENCE_PARAMS = 28_500_992


def build() -> onnx.ModelProto:
    g = TorchStyleGraph()
    outputs = bert_encoder(g, random_params(SEED), CONFIG)
    return g.make_model(
        "main_graph",
        [tensor_info("input_ids", INT64, ["batch", "seq"]),
         tensor_info("attention_mask", INT64, ["batch", "seq"])],
        [tensor_info(n, FLOAT, shape) for n, shape in outputs],
        doc_string="BERT-small real-size golden model (deterministic random weights)",
    )


def example_inputs(batch: int = 1, seq: int = SEQ, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids (first [CLS]=101, last [SEP]=102); row 0's mask pads the last quarter."""
    assert 2 <= seq <= CONFIG.max_positions
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, CONFIG.vocab, size=(batch, seq), dtype=np.int64)
    ids[:, 0] = 101
    ids[:, -1] = 102
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, seq - seq // 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}
