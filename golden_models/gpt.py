"""GPT-2-style decoder shaped like a ``torch.onnx.export`` of HF ``GPT2LMHeadModel``.

2 blocks, hidden 256, 4 heads, MLP 1024, vocab 1000, 128 positions.
Input ``input_ids`` int64 [batch, seq], output ``logits`` [batch, seq, 1000].

Exporter patterns reproduced on purpose:
* position ids from Shape/Gather/Range/Unsqueeze;
* pre-LayerNorm blocks using the opset-17 ``LayerNormalization`` op;
* fused QKV projection (Conv1D: MatMul + Add, weight [in, out]) and Split;
* head split Reshape with a dynamic Shape/Gather/Unsqueeze/Concat shape;
* causal mask rebuilt in every block from Shape/Gather/Range/Unsqueeze/
  LessOrEqual and applied with Where(mask, scores, finfo(float32).min);
* tanh GELU (0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))) decomposed;
* tied embeddings: ``transformer.wte.weight`` feeds the Gather embedding and,
  through a Transpose node, the LM-head MatMul.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from ._graph import FLOAT, INT64, TorchStyleGraph, dim as _dim, f32, normal, tensor_info
from ._graph import linear as _conv1d  # GPT-2's Conv1D stores its weight [in, out], like Linear here

SEED = 4567
NUM_LAYERS = 2
HIDDEN = 256
NUM_HEADS = 4
HEAD_DIM = HIDDEN // NUM_HEADS
INNER = 4 * HIDDEN
VOCAB_SIZE = 1000
MAX_POSITIONS = 128
LN_EPS = 1e-5
INIT_STD = 0.02


def _ln(g: TorchStyleGraph, rng, x: str, scope: str, pname: str) -> str:
    gamma = g.init(f"{pname}.weight", f32(1.0 + rng.standard_normal(HIDDEN) * 0.05))
    beta = g.init(f"{pname}.bias", normal(rng, (HIDDEN,), 0.02))
    return g.op("LayerNormalization", [x, gamma, beta], scope, axis=-1, epsilon=LN_EPS)


def _unsqueeze(g: TorchStyleGraph, x: str, scope: str, axis: int) -> str:
    axes = g.const([axis], scope, np.int64)
    return g.op("Unsqueeze", [x, axes], scope)


def _split_heads(g: TorchStyleGraph, x: str, scope: str, perm) -> str:
    b = _unsqueeze(g, _dim(g, x, scope, 0), scope, 0)
    s = _unsqueeze(g, _dim(g, x, scope, 1), scope, 0)
    h = g.const([NUM_HEADS], scope, np.int64)
    d = g.const([HEAD_DIM], scope, np.int64)
    shape = g.op("Concat", [b, s, h, d], scope, axis=0)
    y = g.op("Reshape", [x, shape], scope, allowzero=0)
    return g.op("Transpose", [y], scope, perm=list(perm))


def _merge_heads(g: TorchStyleGraph, x: str, scope: str) -> str:
    y = g.op("Transpose", [x], scope, perm=[0, 2, 1, 3])
    b = _unsqueeze(g, _dim(g, y, scope, 0), scope, 0)
    s = _unsqueeze(g, _dim(g, y, scope, 1), scope, 0)
    hd = g.const([HIDDEN], scope, np.int64)
    shape = g.op("Concat", [b, s, hd], scope, axis=0)
    return g.op("Reshape", [y, shape], scope, allowzero=0)


def _gelu_tanh(g: TorchStyleGraph, x: str, scope: str) -> str:
    """HF NewGELUActivation exactly as traced by torch."""
    half = g.const(0.5, scope, np.float32)
    m0 = g.op("Mul", [half, x], scope)
    three = g.const(3.0, scope, np.float32)
    cube = g.op("Pow", [x, three], scope)
    c = g.const(0.044715, scope, np.float32)
    m1 = g.op("Mul", [c, cube], scope)
    a0 = g.op("Add", [x, m1], scope)
    k = g.const(math.sqrt(2.0 / math.pi), scope, np.float32)
    m2 = g.op("Mul", [k, a0], scope)
    t = g.op("Tanh", [m2], scope)
    one = g.const(1.0, scope, np.float32)
    a1 = g.op("Add", [one, t], scope)
    return g.op("Mul", [m0, a1], scope)


def _causal_mask(g: TorchStyleGraph, scores: str, scope: str) -> str:
    """bool [seq, seq]: key position <= query position."""
    n = _dim(g, scores, scope, -1)
    start = g.const(0, scope, np.int64)
    delta = g.const(1, scope, np.int64)
    r = g.op("Range", [start, n, delta], scope)
    cols = _unsqueeze(g, r, scope, 0)  # [1, seq]
    rows = _unsqueeze(g, r, scope, 1)  # [seq, 1]
    return g.op("LessOrEqual", [cols, rows], scope)


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    g = TorchStyleGraph()
    proj_std = INIT_STD / math.sqrt(2 * NUM_LAYERS)

    wte = g.init("transformer.wte.weight", normal(rng, (VOCAB_SIZE, HIDDEN), INIT_STD))
    wpe = g.init("transformer.wpe.weight", normal(rng, (MAX_POSITIONS, HIDDEN), 0.01))

    seq = _dim(g, "input_ids", "/transformer", -1)
    start = g.const(0, "/transformer", np.int64)
    delta = g.const(1, "/transformer", np.int64)
    pos_ids = g.op("Range", [start, seq, delta], "/transformer")
    pos_ids = _unsqueeze(g, pos_ids, "/transformer", 0)

    te = g.op("Gather", [wte, "input_ids"], "/transformer/wte", axis=0)
    pe = g.op("Gather", [wpe, pos_ids], "/transformer/wpe", axis=0)
    x = g.op("Add", [te, pe], "/transformer")

    for li in range(NUM_LAYERS):
        s = f"/transformer/h.{li}"
        p = f"transformer.h.{li}"
        a = f"{s}/attn"
        h = _ln(g, rng, x, f"{s}/ln_1", f"{p}.ln_1")
        qkv = _conv1d(g, rng, h, f"{a}/c_attn", f"{p}.attn.c_attn", HIDDEN, 3 * HIDDEN)
        split = g.const([HIDDEN, HIDDEN, HIDDEN], a, np.int64)
        q, k, v = g.op("Split", [qkv, split], a, outputs=3, axis=2)
        qh = _split_heads(g, q, a, (0, 2, 1, 3))
        kh = _split_heads(g, k, a, (0, 2, 1, 3))
        vh = _split_heads(g, v, a, (0, 2, 1, 3))
        kt = g.op("Transpose", [kh], a, perm=[0, 1, 3, 2])
        scores = g.op("MatMul", [qh, kt], a)
        scale = g.const(float(HEAD_DIM) ** 0.5, a, np.float32)
        scores = g.op("Div", [scores, scale], a)
        causal = _causal_mask(g, scores, a)
        min_val = g.const(np.finfo(np.float32).min, a, np.float32)
        scores = g.op("Where", [causal, scores, min_val], a)
        probs = g.op("Softmax", [scores], a, axis=-1)
        ctx = g.op("MatMul", [probs, vh], a)
        ctx = _merge_heads(g, ctx, a)
        ctx = _conv1d(g, rng, ctx, f"{a}/c_proj", f"{p}.attn.c_proj", HIDDEN, HIDDEN, proj_std)
        x = g.op("Add", [ctx, x], s)

        m = f"{s}/mlp"
        h = _ln(g, rng, x, f"{s}/ln_2", f"{p}.ln_2")
        h = _conv1d(g, rng, h, f"{m}/c_fc", f"{p}.mlp.c_fc", HIDDEN, INNER)
        h = _gelu_tanh(g, h, f"{m}/act")
        h = _conv1d(g, rng, h, f"{m}/c_proj", f"{p}.mlp.c_proj", INNER, HIDDEN, proj_std)
        x = g.op("Add", [x, h], s)

    x = _ln(g, rng, x, "/transformer/ln_f", "transformer.ln_f")
    wte_t = g.op("Transpose", [wte], "/lm_head", perm=[1, 0])
    g.op("MatMul", [x, wte_t], "/lm_head", outputs=["logits"])

    return g.make_model(
        "main_graph",
        [tensor_info("input_ids", INT64, ["batch", "seq"])],
        [tensor_info("logits", FLOAT, ["batch", "seq", VOCAB_SIZE])],
        doc_string="GPT-2-style golden model (deterministic random weights)",
    )


def example_inputs(batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    assert 1 <= seq <= MAX_POSITIONS
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, VOCAB_SIZE, size=(batch, seq), dtype=np.int64)}
