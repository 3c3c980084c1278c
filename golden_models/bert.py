"""BERT-style encoder shaped like a ``torch.onnx.export`` of HF ``BertModel``.

2 layers, hidden 256, 4 heads, intermediate 1024, vocab 1000, 128 positions.
Inputs ``input_ids`` / ``attention_mask`` int64 [batch, seq] (symbolic dims
``batch`` and ``seq``), output ``last_hidden_state`` float32 [batch, seq, 256].

Exporter patterns reproduced on purpose:
* position ids = Slice of the ``embeddings.position_ids`` buffer with an end
  computed by Shape/Gather/Unsqueeze; token type ids = Slice + Expand of the
  ``embeddings.token_type_ids`` buffer;
* decomposed LayerNorm (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add,
  ReduceMean with the opset-17 ``axes`` attribute);
* extended attention mask: Unsqueeze, Cast, Sub from 1, Mul by -10000;
* Q/K/V as MatMul + Add(bias), head split Reshape whose shape is built with
  Shape/Gather/Unsqueeze/Concat, Transpose, MatMul, Div by sqrt(head_dim),
  Add mask, Softmax, MatMul, Transpose, Reshape back;
* erf GELU: Div(1.4142135), Erf, Add(1), Mul(x), Mul(0.5).
Linear weights are stored pre-transposed ([in, out]) under the torch
parameter names, since the exporter feeds them straight into MatMul.
"""

from __future__ import annotations

import numpy as np
import onnx

from ._graph import FLOAT, INT64, TorchStyleGraph, dim as _dim, f32, linear, normal, tensor_info

SEED = 3456
NUM_LAYERS = 2
HIDDEN = 256
NUM_HEADS = 4
HEAD_DIM = HIDDEN // NUM_HEADS
INTERMEDIATE = 1024
VOCAB_SIZE = 1000
MAX_POSITIONS = 128
TYPE_VOCAB_SIZE = 2
LN_EPS = 1e-12
INIT_STD = 0.02


def layer_norm(g: TorchStyleGraph, rng, x: str, scope: str, pname: str, eps: float) -> str:
    """Decomposed LayerNorm as exported by torch for opsets < 17 (kept at 17 here)."""
    gamma = g.init(f"{pname}.weight", f32(1.0 + rng.standard_normal(HIDDEN) * 0.05))
    beta = g.init(f"{pname}.bias", normal(rng, (HIDDEN,), 0.02))
    mean = g.op("ReduceMean", [x], scope, axes=[-1], keepdims=1)
    centered = g.op("Sub", [x, mean], scope)
    two = g.const(2.0, scope, np.float32)
    sq = g.op("Pow", [centered, two], scope)
    var = g.op("ReduceMean", [sq], scope, axes=[-1], keepdims=1)
    eps_c = g.const(eps, scope, np.float32)
    var_eps = g.op("Add", [var, eps_c], scope)
    std = g.op("Sqrt", [var_eps], scope)
    normed = g.op("Div", [centered, std], scope)
    scaled = g.op("Mul", [normed, gamma], scope)
    return g.op("Add", [scaled, beta], scope, outputs=1)


def _unsqueeze0(g: TorchStyleGraph, x: str, scope: str) -> str:
    axes = g.const([0], scope, np.int64)
    return g.op("Unsqueeze", [x, axes], scope)


def split_heads(g: TorchStyleGraph, x: str, scope: str, perm) -> str:
    """view(b, s, heads, head_dim) with a dynamically built shape, then permute."""
    b = _unsqueeze0(g, _dim(g, x, scope, 0), scope)
    s = _unsqueeze0(g, _dim(g, x, scope, 1), scope)
    h = g.const([NUM_HEADS], scope, np.int64)
    d = g.const([HEAD_DIM], scope, np.int64)
    shape = g.op("Concat", [b, s, h, d], scope, axis=0)
    y = g.op("Reshape", [x, shape], scope, allowzero=0)
    return g.op("Transpose", [y], scope, perm=list(perm))


def merge_heads(g: TorchStyleGraph, x: str, scope: str) -> str:
    """permute(0, 2, 1, 3).view(b, s, hidden) with a dynamic shape."""
    y = g.op("Transpose", [x], scope, perm=[0, 2, 1, 3])
    b = _unsqueeze0(g, _dim(g, y, scope, 0), scope)
    s = _unsqueeze0(g, _dim(g, y, scope, 1), scope)
    hd = g.const([HIDDEN], scope, np.int64)
    shape = g.op("Concat", [b, s, hd], scope, axis=0)
    return g.op("Reshape", [y, shape], scope, allowzero=0)


def gelu_erf(g: TorchStyleGraph, x: str, scope: str) -> str:
    c_sqrt2 = g.const(1.4142135381698608, scope, np.float32)
    d = g.op("Div", [x, c_sqrt2], scope)
    e = g.op("Erf", [d], scope)
    one = g.const(1.0, scope, np.float32)
    a = g.op("Add", [e, one], scope)
    m = g.op("Mul", [x, a], scope)
    half = g.const(0.5, scope, np.float32)
    return g.op("Mul", [m, half], scope)


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    g = TorchStyleGraph()

    # ---- parameters / buffers of the embeddings
    word = g.init("embeddings.word_embeddings.weight", normal(rng, (VOCAB_SIZE, HIDDEN), INIT_STD))
    pos = g.init("embeddings.position_embeddings.weight",
                 normal(rng, (MAX_POSITIONS, HIDDEN), INIT_STD))
    tok = g.init("embeddings.token_type_embeddings.weight",
                 normal(rng, (TYPE_VOCAB_SIZE, HIDDEN), INIT_STD))
    pos_ids_buf = g.init("embeddings.position_ids",
                         np.arange(MAX_POSITIONS, dtype=np.int64).reshape(1, MAX_POSITIONS))
    tok_ids_buf = g.init("embeddings.token_type_ids", np.zeros((1, MAX_POSITIONS), np.int64))

    # ---- extended attention mask (computed in BertModel.forward, top scope)
    ax1 = g.const([1], "", np.int64)
    m = g.op("Unsqueeze", ["attention_mask", ax1], "")
    ax2 = g.const([2], "", np.int64)
    m = g.op("Unsqueeze", [m, ax2], "")
    m = g.op("Cast", [m], "", to=FLOAT)
    one = g.const(1.0, "", np.float32)
    m = g.op("Sub", [one, m], "")
    neg = g.const(-10000.0, "", np.float32)
    ext_mask = g.op("Mul", [m, neg], "")

    # ---- embeddings
    seq_len = _dim(g, "input_ids", "/embeddings", 1)
    seq_len_1d = _unsqueeze0(g, seq_len, "/embeddings")
    zero = g.const([0], "/embeddings", np.int64)
    axis1 = g.const([1], "/embeddings", np.int64)
    step = g.const([1], "/embeddings", np.int64)
    pos_ids = g.op("Slice", [pos_ids_buf, zero, seq_len_1d, axis1, step], "/embeddings")
    tt = g.op("Slice", [tok_ids_buf, zero, seq_len_1d, axis1, step], "/embeddings")
    batch = _unsqueeze0(g, _dim(g, "input_ids", "", 0), "")
    seq2 = _unsqueeze0(g, _dim(g, "input_ids", "", 1), "")
    tt_shape = g.op("Concat", [batch, seq2], "", axis=0)
    tt = g.op("Expand", [tt, tt_shape], "")

    we = g.op("Gather", [word, "input_ids"], "/embeddings/word_embeddings", axis=0)
    te = g.op("Gather", [tok, tt], "/embeddings/token_type_embeddings", axis=0)
    x = g.op("Add", [we, te], "/embeddings")
    pe = g.op("Gather", [pos, pos_ids], "/embeddings/position_embeddings", axis=0)
    x = g.op("Add", [x, pe], "/embeddings")
    x = layer_norm(g, rng, x, "/embeddings/LayerNorm", "embeddings.LayerNorm", LN_EPS)

    # ---- encoder layers
    for li in range(NUM_LAYERS):
        s = f"/encoder/layer.{li}"
        p = f"encoder.layer.{li}"
        sa = f"{s}/attention/self"
        q = linear(g, rng, x, f"{sa}/query", f"{p}.attention.self.query", HIDDEN, HIDDEN)
        k = linear(g, rng, x, f"{sa}/key", f"{p}.attention.self.key", HIDDEN, HIDDEN)
        v = linear(g, rng, x, f"{sa}/value", f"{p}.attention.self.value", HIDDEN, HIDDEN)
        kt = split_heads(g, k, sa, (0, 2, 3, 1))  # key.transpose(-1, -2) folded in
        vh = split_heads(g, v, sa, (0, 2, 1, 3))
        qh = split_heads(g, q, sa, (0, 2, 1, 3))
        scores = g.op("MatMul", [qh, kt], sa)
        scale = g.const(float(np.sqrt(HEAD_DIM)), sa, np.float32)
        scores = g.op("Div", [scores, scale], sa)
        scores = g.op("Add", [scores, ext_mask], sa)
        probs = g.op("Softmax", [scores], sa, axis=-1)
        ctx = g.op("MatMul", [probs, vh], sa)
        ctx = merge_heads(g, ctx, sa)

        so = f"{s}/attention/output"
        h = linear(g, rng, ctx, f"{so}/dense", f"{p}.attention.output.dense", HIDDEN, HIDDEN)
        h = g.op("Add", [h, x], so)
        x = layer_norm(g, rng, h, f"{so}/LayerNorm", f"{p}.attention.output.LayerNorm", LN_EPS)

        it = f"{s}/intermediate"
        h = linear(g, rng, x, f"{it}/dense", f"{p}.intermediate.dense", HIDDEN, INTERMEDIATE)
        h = gelu_erf(g, h, f"{it}/intermediate_act_fn")

        ou = f"{s}/output"
        h = linear(g, rng, h, f"{ou}/dense", f"{p}.output.dense", INTERMEDIATE, HIDDEN)
        h = g.op("Add", [h, x], ou)
        x = layer_norm(g, rng, h, f"{ou}/LayerNorm", f"{p}.output.LayerNorm", LN_EPS)

    # expose the final LayerNorm output under the exporter's graph output name
    g.nodes[-1].output[0] = "last_hidden_state"

    return g.make_model(
        "main_graph",
        [tensor_info("input_ids", INT64, ["batch", "seq"]),
         tensor_info("attention_mask", INT64, ["batch", "seq"])],
        [tensor_info("last_hidden_state", FLOAT, ["batch", "seq", HIDDEN])],
        doc_string="BERT-style golden model (deterministic random weights)",
    )


def example_inputs(batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids inside the vocabulary; the mask pads the tail of row 0."""
    assert 1 <= seq <= MAX_POSITIONS
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB_SIZE, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if seq > 1:
        mask[0, seq - seq // 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}
