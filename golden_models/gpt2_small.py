"""GPT-2-small-class decoder at real size (12 layers, hidden 768, 12 heads), random weights.

HF ``GPT2LMHeadModel`` layout (no KV cache) exported the torch.onnx way at
opset 17: position ids from Range, pre-LN blocks with the LayerNormalization
op, fused QKV Conv1D (MatMul + Add) and Split, dynamic head-split Reshapes,
causal mask rebuilt in each block (Range / LessOrEqual / Where with
finfo(float32).min), tanh GELU decomposed, tied LM head (``transformer.wte.weight``
feeds the Gather and, through a Transpose, the final MatMul).

**The vocabulary is reduced to 8192** (GPT-2 has 50257) to keep the file at
~370 MB instead of ~500 MB and the LM-head MatMul from dominating the run
time; everything else is GPT-2 small (1024 positions, MLP 3072).
92,133,888 parameters (GPT-2 small: 124,439,808 with its full vocabulary).
Random weights from a fixed seed (Linear weights std 1/sqrt(fan_in), output
projections half that, embeddings std 0.02).  See
golden_models._transformer.gpt2_decoder.

Input ``input_ids`` int64 [batch, seq] (symbolic dims; seq <= 1024, benchmarks
use 128), output ``logits`` float32 [batch, seq, 8192].  Real-size: built on
demand, not part of ``build_all()``.
"""

from __future__ import annotations

import numpy as np
import onnx

from ._graph import FLOAT, INT64, TorchStyleGraph, tensor_info
from ._transformer import GPT2Config, gpt2_decoder, random_params

SEED = 60006
CONFIG = GPT2Config(layers=12, hidden=768, heads=12, vocab=8192)
SEQ = 128
REFERENCE_PARAMS = 92_133_888


def build() -> onnx.ModelProto:
    g = TorchStyleGraph()
    outputs = gpt2_decoder(g, random_params(SEED), CONFIG)
    return g.make_model(
        "main_graph",
        [tensor_info("input_ids", INT64, ["batch", "seq"])],
        [tensor_info(n, FLOAT, shape) for n, shape in outputs],
        doc_string="GPT-2-small-class real-size golden model, vocab 8192 "
                   "(deterministic random weights)",
    )


def example_inputs(batch: int = 1, seq: int = SEQ, seed: int = 0) -> dict[str, np.ndarray]:
    assert 1 <= seq <= CONFIG.max_positions
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, CONFIG.vocab, size=(batch, seq), dtype=np.int64)}
