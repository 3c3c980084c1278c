"""Parametrised transformer builders shared by the real-size golden models.

``bert_encoder`` (HF ``BertModel``), ``gpt2_decoder`` (HF ``GPT2LMHeadModel``)
and ``vit`` (timm ``VisionTransformer``) emit graphs the way ``torch.onnx.export``
(opset 17, dynamo=False) writes them, with torch parameter names.  The small
golden models bert.py / gpt.py keep their own fixed-size code; these take a
config and a parameter source:

``param(name, shape, kind)`` returns the float32 array of parameter ``name``
(torch layout: Linear weights [out, in]).  ``kind`` says how a random source
should initialise it: ``"linear"`` / ``"linear_conv"`` (fan-in scaled normal), ``"proj"`` (an
output projection into the residual stream: half that), ``"embed"``
(normal 0.02), ``"ln_w"`` (near 1), ``"bias"`` / ``"ln_b"`` (small normal).
``random_params(seed)`` is that random source; trained.py passes one that reads
a checkpoint instead.  The exporter feeds Linear weights to MatMul
pre-transposed ([in, out]), so the builders store ``param(...).T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ._graph import FLOAT, TorchStyleGraph, dim
from .bert import gelu_erf  # nn.GELU() (erf) as exported at opset 17
from .gpt import _causal_mask, _gelu_tanh as gelu_tanh  # size-independent exporter patterns

Param = Callable[[str, tuple, str], np.ndarray]


def random_params(seed: int) -> Param:
    """Seeded random parameters, drawn in the order the builder asks for them."""
    rng = np.random.default_rng(seed)

    def param(name: str, shape: tuple, kind: str) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        # float32 draws and float32 element-wise scaling: fast and bit-exact everywhere
        z = rng.standard_normal(shape, dtype=np.float32)
        if kind in ("linear", "linear_conv"):  # torch layout [out, in, ...]
            return z * np.float32(1.0 / math.sqrt(fan_in))
        if kind == "proj":
            return z * np.float32(0.5 / math.sqrt(fan_in))
        if kind == "embed":
            return z * np.float32(0.02)
        if kind == "ln_w":
            return np.float32(1.0) + z * np.float32(0.05)
        if kind in ("bias", "ln_b"):
            return z * np.float32(0.02)
        raise ValueError(kind)

    return param


# ---------------------------------------------------------------- pieces
def _unsqueeze(g: TorchStyleGraph, x: str, scope: str, axis: int) -> str:
    axes = g.const([axis], scope, np.int64)
    return g.op("Unsqueeze", [x, axes], scope)


def linear(g: TorchStyleGraph, param: Param, x: str, scope: str, pname: str, fin: int,
           fout: int, kind: str = "linear", bias_first: bool = True) -> str:
    """torch Linear as exported: MatMul by the [in, out] weight, then Add(bias, y).

    ``bias_first=False``: GPT-2's Conv1D (addmm traced as MatMul, then Add(y, bias)).
    """
    w = g.init(f"{pname}.weight", np.ascontiguousarray(param(f"{pname}.weight", (fout, fin), kind).T))
    b = g.init(f"{pname}.bias", param(f"{pname}.bias", (fout,), "bias"))
    y = g.op("MatMul", [x, w], scope)
    return g.op("Add", [b, y] if bias_first else [y, b], scope)


def conv1d(g: TorchStyleGraph, param: Param, x: str, scope: str, pname: str, fin: int,
           fout: int, kind: str = "linear") -> str:
    """GPT-2 Conv1D: MatMul + Add(y, bias)."""
    return linear(g, param, x, scope, pname, fin, fout, kind, bias_first=False)


def layer_norm(g: TorchStyleGraph, param: Param, x: str, scope: str, pname: str, width: int,
               eps: float) -> str:
    """nn.LayerNorm as torch's opset-17 export writes it: one LayerNormalization op."""
    w = g.init(f"{pname}.weight", param(f"{pname}.weight", (width,), "ln_w"))
    b = g.init(f"{pname}.bias", param(f"{pname}.bias", (width,), "ln_b"))
    return g.op("LayerNormalization", [x, w, b], scope, axis=-1, epsilon=eps)


def split_heads(g: TorchStyleGraph, x: str, scope: str, heads: int, head_dim: int, perm) -> str:
    """view(b, s, heads, head_dim) with a dynamically built shape, then permute."""
    b = _unsqueeze(g, dim(g, x, scope, 0), scope, 0)
    s = _unsqueeze(g, dim(g, x, scope, 1), scope, 0)
    h = g.const([heads], scope, np.int64)
    d = g.const([head_dim], scope, np.int64)
    shape = g.op("Concat", [b, s, h, d], scope, axis=0)
    y = g.op("Reshape", [x, shape], scope, allowzero=0)
    return g.op("Transpose", [y], scope, perm=list(perm))


def merge_heads(g: TorchStyleGraph, x: str, scope: str, hidden: int) -> str:
    """permute(0, 2, 1, 3).reshape(b, s, hidden) with a dynamic shape."""
    y = g.op("Transpose", [x], scope, perm=[0, 2, 1, 3])
    b = _unsqueeze(g, dim(g, y, scope, 0), scope, 0)
    s = _unsqueeze(g, dim(g, y, scope, 1), scope, 0)
    hd = g.const([hidden], scope, np.int64)
    shape = g.op("Concat", [b, s, hd], scope, axis=0)
    return g.op("Reshape", [y, shape], scope, allowzero=0)


# ------------------------------------------------------------------ BERT
@dataclass(frozen=True)
class BertConfig:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int = 30522
    max_positions: int = 512
    type_vocab: int = 2
    ln_eps: float = 1e-12


def bert_encoder(g: TorchStyleGraph, param: Param, cfg: BertConfig,
                 mean_pool: bool = False) -> list[tuple[str, list]]:
    """HF BertModel (no pooler) on ``input_ids`` / ``attention_mask`` (int64 [batch, seq]).

    Output ``last_hidden_state`` [batch, seq, hidden]; with ``mean_pool`` also
    ``sentence_embedding`` [batch, hidden]: the attention-mask-weighted mean of
    the token states, L2-normalised (sentence-transformers Pooling + Normalize).
    Returns the outputs as (name, shape).
    """
    hidden, heads = cfg.hidden, cfg.heads
    head_dim = hidden // heads

    word = g.init("embeddings.word_embeddings.weight",
                  param("embeddings.word_embeddings.weight", (cfg.vocab, hidden), "embed"))
    pos = g.init("embeddings.position_embeddings.weight",
                 param("embeddings.position_embeddings.weight", (cfg.max_positions, hidden),
                       "embed"))
    tok = g.init("embeddings.token_type_embeddings.weight",
                 param("embeddings.token_type_embeddings.weight", (cfg.type_vocab, hidden),
                       "embed"))
    pos_ids_buf = g.init("embeddings.position_ids",
                         np.arange(cfg.max_positions, dtype=np.int64).reshape(1, -1))
    tok_ids_buf = g.init("embeddings.token_type_ids", np.zeros((1, cfg.max_positions), np.int64))

    # extended attention mask: (1 - mask[:, None, None, :]) * -10000
    m = _unsqueeze(g, "attention_mask", "", 1)
    m = _unsqueeze(g, m, "", 2)
    m = g.op("Cast", [m], "", to=FLOAT)
    one = g.const(1.0, "", np.float32)
    m = g.op("Sub", [one, m], "")
    neg = g.const(-10000.0, "", np.float32)
    ext_mask = g.op("Mul", [m, neg], "")

    # embeddings
    seq_1d = _unsqueeze(g, dim(g, "input_ids", "/embeddings", 1), "/embeddings", 0)
    zero = g.const([0], "/embeddings", np.int64)
    axis1 = g.const([1], "/embeddings", np.int64)
    step = g.const([1], "/embeddings", np.int64)
    pos_ids = g.op("Slice", [pos_ids_buf, zero, seq_1d, axis1, step], "/embeddings")
    tt = g.op("Slice", [tok_ids_buf, zero, seq_1d, axis1, step], "/embeddings")
    batch = _unsqueeze(g, dim(g, "input_ids", "", 0), "", 0)
    seq2 = _unsqueeze(g, dim(g, "input_ids", "", 1), "", 0)
    tt_shape = g.op("Concat", [batch, seq2], "", axis=0)
    tt = g.op("Expand", [tt, tt_shape], "")
    we = g.op("Gather", [word, "input_ids"], "/embeddings/word_embeddings", axis=0)
    te = g.op("Gather", [tok, tt], "/embeddings/token_type_embeddings", axis=0)
    x = g.op("Add", [we, te], "/embeddings")
    pe = g.op("Gather", [pos, pos_ids], "/embeddings/position_embeddings", axis=0)
    x = g.op("Add", [x, pe], "/embeddings")
    x = layer_norm(g, param, x, "/embeddings/LayerNorm", "embeddings.LayerNorm", hidden,
                   cfg.ln_eps)

    for li in range(cfg.layers):
        s = f"/encoder/layer.{li}"
        p = f"encoder.layer.{li}"
        sa = f"{s}/attention/self"
        q = linear(g, param, x, f"{sa}/query", f"{p}.attention.self.query", hidden, hidden)
        k = linear(g, param, x, f"{sa}/key", f"{p}.attention.self.key", hidden, hidden)
        v = linear(g, param, x, f"{sa}/value", f"{p}.attention.self.value", hidden, hidden)
        kt = split_heads(g, k, sa, heads, head_dim, (0, 2, 3, 1))
        vh = split_heads(g, v, sa, heads, head_dim, (0, 2, 1, 3))
        qh = split_heads(g, q, sa, heads, head_dim, (0, 2, 1, 3))
        scores = g.op("MatMul", [qh, kt], sa)
        scale = g.const(float(np.sqrt(head_dim)), sa, np.float32)
        scores = g.op("Div", [scores, scale], sa)
        scores = g.op("Add", [scores, ext_mask], sa)
        probs = g.op("Softmax", [scores], sa, axis=-1)
        ctx = g.op("MatMul", [probs, vh], sa)
        ctx = merge_heads(g, ctx, sa, hidden)

        so = f"{s}/attention/output"
        h = linear(g, param, ctx, f"{so}/dense", f"{p}.attention.output.dense", hidden, hidden,
                   "proj")
        h = g.op("Add", [h, x], so)
        x = layer_norm(g, param, h, f"{so}/LayerNorm", f"{p}.attention.output.LayerNorm",
                       hidden, cfg.ln_eps)

        it = f"{s}/intermediate"
        h = linear(g, param, x, f"{it}/dense", f"{p}.intermediate.dense", hidden,
                   cfg.intermediate)
        h = gelu_erf(g, h, f"{it}/intermediate_act_fn")
        ou = f"{s}/output"
        h = linear(g, param, h, f"{ou}/dense", f"{p}.output.dense", cfg.intermediate, hidden,
                   "proj")
        h = g.op("Add", [h, x], ou)
        x = layer_norm(g, param, h, f"{ou}/LayerNorm", f"{p}.output.LayerNorm", hidden,
                       cfg.ln_eps)

    g.nodes[-1].output[0] = "last_hidden_state"
    outputs = [("last_hidden_state", ["batch", "seq", hidden])]
    if mean_pool:
        x = "last_hidden_state"
        sc = "/pooling"
        mk = _unsqueeze(g, "attention_mask", sc, -1)
        mk = g.op("Cast", [mk], sc, to=FLOAT)
        summed = g.op("ReduceSum", [g.op("Mul", [x, mk], sc), g.const([1], sc, np.int64)], sc,
                      keepdims=0)
        count = g.op("ReduceSum", [mk, g.const([1], sc, np.int64)], sc, keepdims=0)
        count = g.op("Clip", [count, g.const(1e-9, sc, np.float32)], sc)
        mean = g.op("Div", [summed, count], sc)
        sn = "/normalize"
        norm = g.op("ReduceL2", [mean], sn, axes=[1], keepdims=1)
        norm = g.op("Clip", [norm, g.const(1e-12, sn, np.float32)], sn)
        g.op("Div", [mean, norm], sn, outputs=["sentence_embedding"])
        outputs.append(("sentence_embedding", ["batch", hidden]))
    return outputs


# ----------------------------------------------------------------- GPT-2
@dataclass(frozen=True)
class GPT2Config:
    layers: int
    hidden: int
    heads: int
    vocab: int
    max_positions: int = 1024
    ln_eps: float = 1e-5


def gpt2_decoder(g: TorchStyleGraph, param: Param, cfg: GPT2Config) -> list[tuple[str, list]]:
    """HF GPT2LMHeadModel (no KV cache) on ``input_ids`` int64 [batch, seq] -> ``logits``.

    Pre-LN blocks, fused QKV Conv1D + Split, causal mask rebuilt per block
    (Range/LessOrEqual/Where with finfo(float32).min), tanh GELU, tied LM head
    (``transformer.wte.weight`` feeds the Gather and, via Transpose, the MatMul).
    """
    hidden, heads = cfg.hidden, cfg.heads
    head_dim = hidden // heads
    wte = g.init("transformer.wte.weight",
                 param("transformer.wte.weight", (cfg.vocab, hidden), "embed"))
    wpe = g.init("transformer.wpe.weight",
                 param("transformer.wpe.weight", (cfg.max_positions, hidden), "embed"))

    seq = dim(g, "input_ids", "/transformer", -1)
    start = g.const(0, "/transformer", np.int64)
    delta = g.const(1, "/transformer", np.int64)
    pos_ids = g.op("Range", [start, seq, delta], "/transformer")
    pos_ids = _unsqueeze(g, pos_ids, "/transformer", 0)
    te = g.op("Gather", [wte, "input_ids"], "/transformer/wte", axis=0)
    pe = g.op("Gather", [wpe, pos_ids], "/transformer/wpe", axis=0)
    x = g.op("Add", [te, pe], "/transformer")

    for li in range(cfg.layers):
        s = f"/transformer/h.{li}"
        p = f"transformer.h.{li}"
        a = f"{s}/attn"
        h = layer_norm(g, param, x, f"{s}/ln_1", f"{p}.ln_1", hidden, cfg.ln_eps)
        qkv = conv1d(g, param, h, f"{a}/c_attn", f"{p}.attn.c_attn", hidden, 3 * hidden)
        split = g.const([hidden, hidden, hidden], a, np.int64)
        q, k, v = g.op("Split", [qkv, split], a, outputs=3, axis=2)
        qh = split_heads(g, q, a, heads, head_dim, (0, 2, 1, 3))
        kh = split_heads(g, k, a, heads, head_dim, (0, 2, 1, 3))
        vh = split_heads(g, v, a, heads, head_dim, (0, 2, 1, 3))
        kt = g.op("Transpose", [kh], a, perm=[0, 1, 3, 2])
        scores = g.op("MatMul", [qh, kt], a)
        scale = g.const(float(head_dim) ** 0.5, a, np.float32)
        scores = g.op("Div", [scores, scale], a)
        causal = _causal_mask(g, scores, a)
        min_val = g.const(np.finfo(np.float32).min, a, np.float32)
        scores = g.op("Where", [causal, scores, min_val], a)
        probs = g.op("Softmax", [scores], a, axis=-1)
        ctx = g.op("MatMul", [probs, vh], a)
        ctx = merge_heads(g, ctx, a, hidden)
        ctx = conv1d(g, param, ctx, f"{a}/c_proj", f"{p}.attn.c_proj", hidden, hidden, "proj")
        x = g.op("Add", [ctx, x], s)

        m = f"{s}/mlp"
        h = layer_norm(g, param, x, f"{s}/ln_2", f"{p}.ln_2", hidden, cfg.ln_eps)
        h = conv1d(g, param, h, f"{m}/c_fc", f"{p}.mlp.c_fc", hidden, 4 * hidden)
        h = gelu_tanh(g, h, f"{m}/act")
        h = conv1d(g, param, h, f"{m}/c_proj", f"{p}.mlp.c_proj", 4 * hidden, hidden, "proj")
        x = g.op("Add", [x, h], s)

    x = layer_norm(g, param, x, "/transformer/ln_f", "transformer.ln_f", hidden, cfg.ln_eps)
    wte_t = g.op("Transpose", [wte], "/lm_head", perm=[1, 0])
    g.op("MatMul", [x, wte_t], "/lm_head", outputs=["logits"])
    return [("logits", ["batch", "seq", cfg.vocab])]


# ------------------------------------------------------------------- ViT
@dataclass(frozen=True)
class ViTConfig:
    layers: int
    hidden: int
    heads: int
    mlp: int
    patch: int = 16
    image: int = 224
    classes: int = 1000
    ln_eps: float = 1e-6


def vit(g: TorchStyleGraph, param: Param, cfg: ViTConfig, batch: int = 1) -> list[tuple[str, list]]:
    """timm VisionTransformer (class token, learned position embedding, pre-LN blocks).

    Input ``input`` float32 [batch, 3, image, image] (static), output ``logits``.
    Attention as timm's non-fused path exports it: qkv Linear, Reshape to
    [B, N, 3, heads, head_dim], Transpose (2, 0, 3, 1, 4), Gather q/k/v, q * scale,
    MatMul with k transposed, Softmax, MatMul, Transpose, Reshape, proj.
    """
    hidden, heads = cfg.hidden, cfg.heads
    head_dim = hidden // heads
    grid = cfg.image // cfg.patch
    tokens = grid * grid + 1
    sc = "/patch_embed/proj"
    pw = g.init("patch_embed.proj.weight", param("patch_embed.proj.weight",
                                                  (hidden, 3, cfg.patch, cfg.patch), "linear_conv"))
    pb = g.init("patch_embed.proj.bias", param("patch_embed.proj.bias", (hidden,), "bias"))
    x = g.op("Conv", ["input", pw, pb], sc, dilations=[1, 1], group=1,
             kernel_shape=[cfg.patch, cfg.patch], pads=[0, 0, 0, 0],
             strides=[cfg.patch, cfg.patch])
    x = g.op("Reshape", [x, g.const([batch, hidden, grid * grid], "/patch_embed", np.int64)],
             "/patch_embed", allowzero=0)
    x = g.op("Transpose", [x], "/patch_embed", perm=[0, 2, 1])
    cls = g.init("cls_token", param("cls_token", (1, 1, hidden), "embed"))
    if batch != 1:
        cls = g.op("Expand", [cls, g.const([batch, 1, hidden], "", np.int64)], "")
    x = g.op("Concat", [cls, x], "", axis=1)
    pos = g.init("pos_embed", param("pos_embed", (1, tokens, hidden), "embed"))
    x = g.op("Add", [x, pos], "")

    for li in range(cfg.layers):
        s = f"/blocks/blocks.{li}"
        p = f"blocks.{li}"
        a = f"{s}/attn"
        h = layer_norm(g, param, x, f"{s}/norm1", f"{p}.norm1", hidden, cfg.ln_eps)
        qkv = linear(g, param, h, f"{a}/qkv", f"{p}.attn.qkv", hidden, 3 * hidden)
        qkv = g.op("Reshape", [qkv, g.const([batch, tokens, 3, heads, head_dim], a, np.int64)],
                   a, allowzero=0)
        qkv = g.op("Transpose", [qkv], a, perm=[2, 0, 3, 1, 4])
        q = g.op("Gather", [qkv, g.const(0, a, np.int64)], a, axis=0)
        k = g.op("Gather", [qkv, g.const(1, a, np.int64)], a, axis=0)
        v = g.op("Gather", [qkv, g.const(2, a, np.int64)], a, axis=0)
        q = g.op("Mul", [q, g.const(head_dim ** -0.5, a, np.float32)], a)
        kt = g.op("Transpose", [k], a, perm=[0, 1, 3, 2])
        scores = g.op("MatMul", [q, kt], a)
        probs = g.op("Softmax", [scores], a, axis=-1)
        ctx = g.op("MatMul", [probs, v], a)
        ctx = g.op("Transpose", [ctx], a, perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([batch, tokens, hidden], a, np.int64)], a,
                   allowzero=0)
        ctx = linear(g, param, ctx, f"{a}/proj", f"{p}.attn.proj", hidden, hidden, "proj")
        x = g.op("Add", [x, ctx], s)
        m = f"{s}/mlp"
        h = layer_norm(g, param, x, f"{s}/norm2", f"{p}.norm2", hidden, cfg.ln_eps)
        h = linear(g, param, h, f"{m}/fc1", f"{p}.mlp.fc1", hidden, cfg.mlp)
        h = gelu_erf(g, h, f"{m}/act")
        h = linear(g, param, h, f"{m}/fc2", f"{p}.mlp.fc2", cfg.mlp, hidden, "proj")
        x = g.op("Add", [x, h], s)

    x = layer_norm(g, param, x, "/norm", "norm", hidden, cfg.ln_eps)
    x = g.op("Gather", [x, g.const(0, "", np.int64)], "", axis=1)  # x[:, 0]: the class token
    hw = g.init("head.weight", param("head.weight", (cfg.classes, hidden), "linear"))
    hb = g.init("head.bias", param("head.bias", (cfg.classes,), "bias"))
    g.op("Gemm", [x, hw, hb], "/head", outputs=["logits"], alpha=1.0, beta=1.0, transB=1)
    return [("logits", [batch, cfg.classes])]
