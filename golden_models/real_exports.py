"""Real-export models: Hugging Face ``transformers`` architectures exported by ``torch.onnx``.

Our golden BERT and GPT are written with onnx.helper in the spelling we expected; these are
what users really feed us. Each model is built with ``AutoModel.from_config`` (no hub download,
random weights from ``torch.manual_seed(SEED)``) at a small but real-architecture size, and
exported by

* the TorchScript exporter (``dynamo=False``) at opset 17 and at ``NEWEST_OPSET`` (the newest
  opset both exporters write), and
* the dynamo exporter (``dynamo=True``) at ``NEWEST_OPSET`` (where it works).

The ``*_past`` decoders are exported with a KV cache (``use_cache=True``): inputs ``input_ids``,
``attention_mask`` (past + new), ``past_{i}_k`` / ``past_{i}_v`` per layer; outputs
``last_hidden_state`` and ``present_{i}_k`` / ``present_{i}_v``.

    from golden_models import real_exports
    path = real_exports.path("bert", "torchscript", 17)     # builds and caches on first use
    feeds = real_exports.example_inputs("bert", batch=2, seq=16)

    python golden_models/real_exports.py [names...] [--exporters torchscript,dynamo] [--opsets 17,20]

Outputs are cached in ``~/.cache/infoptc/models/real_exports/`` (``INFOPTC_CACHE`` moves the
cache root), never committed. The torch and transformers versions used are written into each
model's ``metadata_props`` (``torch_version``, ``transformers_version``, ``exporter``) and
listed by ``versions()``. Needs torch and transformers (not test dependencies).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

SEED = 1234
NEWEST_OPSET = 20  # the TorchScript exporter stops at 20; the dynamo exporter writes 18 and up
EXPORTERS = ("torchscript", "dynamo")


@dataclass(frozen=True)
class Spec:
    """One architecture: its transformers config class and arguments, its inputs and ORT's
    optimizer model_type for it."""

    config: str
    kwargs: dict = field(default_factory=dict)
    kind: str = "text"  # text (input_ids + attention_mask), decoder (ids + mask, causal), image, audio
    ort_type: str = "bert"
    model_class: str = "AutoModel"
    note: str = ""
    attn: str = "eager"  # transformers' attention implementation; "sdpa" is its default


SPECS: dict[str, Spec] = {
    "bert": Spec("BertConfig", dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                    intermediate_size=1024, vocab_size=30522, max_position_embeddings=512),
                 note="BERT-small class: 4 layers, hidden 256, 4 heads"),
    "bert_sdpa": Spec("BertConfig", dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                         intermediate_size=1024, vocab_size=30522, max_position_embeddings=512),
                      attn="sdpa", note="bert with transformers' default attention, torch's scaled_dot_product_attention"),
    "minilm": Spec("BertConfig", dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12,
                                      intermediate_size=1536, vocab_size=30522, max_position_embeddings=512),
                   note="all-MiniLM-L6 geometry (BertModel): 6 layers, hidden 384, 12 heads"),
    "distilbert": Spec("DistilBertConfig", dict(n_layers=3, dim=256, n_heads=4, hidden_dim=1024, vocab_size=30522),
                       note="3 layers, dim 256"),
    "roberta": Spec("RobertaConfig", dict(num_hidden_layers=3, hidden_size=256, num_attention_heads=4,
                                          intermediate_size=1024, vocab_size=50265, max_position_embeddings=514),
                    note="3 layers, hidden 256"),
    "gpt2": Spec("GPT2Config", dict(n_layer=4, n_embd=256, n_head=4, vocab_size=50257, n_positions=1024),
                 kind="decoder", ort_type="gpt2", note="4 layers, 256 wide, tanh GELU, fused QKV Conv1D"),
    "llama": Spec("LlamaConfig", dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=688, vocab_size=32000,
                                      max_position_embeddings=512),
                  kind="decoder", ort_type="gpt2",
                  note="2 layers, hidden 256, 8 query / 2 KV heads (GQA), RMSNorm, rotary, SiLU-gated MLP"),
    "llama_sdpa": Spec("LlamaConfig", dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=8,
                                           num_key_value_heads=2, intermediate_size=688, vocab_size=32000,
                                           max_position_embeddings=512),
                       kind="decoder", ort_type="gpt2", attn="sdpa",
                       note="llama with transformers' default attention, torch's scaled_dot_product_attention"),
    "llama_past": Spec("LlamaConfig", dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=8,
                                           num_key_value_heads=2, intermediate_size=688, vocab_size=32000,
                                           max_position_embeddings=512),
                       kind="decoder_past", ort_type="gpt2",
                       note="llama with a KV cache (use_cache=True): past_{i}_k/v in, present_{i}_k/v out"),
    "gpt2_past": Spec("GPT2Config", dict(n_layer=4, n_embd=256, n_head=4, vocab_size=50257, n_positions=1024),
                      kind="decoder_past", ort_type="gpt2", note="gpt2 with a KV cache (use_cache=True)"),
    "t5_encoder": Spec("T5Config", dict(num_layers=3, d_model=256, num_heads=4, d_kv=64, d_ff=1024, vocab_size=32128),
                       model_class="T5EncoderModel", note="T5 encoder, 3 layers, relative position bias, RMSNorm"),
    "vit": Spec("ViTConfig", dict(num_hidden_layers=4, hidden_size=192, num_attention_heads=3, intermediate_size=768,
                                  image_size=224, patch_size=16), kind="image", ort_type="vit",
                note="ViT-tiny geometry, 4 layers"),
    "whisper_encoder": Spec("WhisperConfig", dict(encoder_layers=2, decoder_layers=1, d_model=256,
                                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                                  encoder_ffn_dim=1024, decoder_ffn_dim=1024, num_mel_bins=80,
                                                  max_source_positions=1500),
                            kind="audio", ort_type="bert", note="Whisper encoder, 2 layers, d_model 256"),
}
NAMES = tuple(SPECS)


HEADS_KEYS = ("num_attention_heads", "n_heads", "n_head", "num_heads", "encoder_attention_heads")
HIDDEN_KEYS = ("hidden_size", "dim", "n_embd", "d_model")


def geometry(name: str) -> tuple[int, int]:
    """(attention heads, hidden size) of ``name``, as ONNX Runtime's optimizer asks for them."""
    kw = SPECS[name].kwargs
    heads = next(kw[k] for k in HEADS_KEYS if k in kw)
    hidden = next(kw[k] for k in HIDDEN_KEYS if k in kw)
    return heads, hidden


def cache_dir() -> Path:
    root = Path(os.environ.get("INFOPTC_CACHE", Path.home() / ".cache" / "infoptc"))
    return root / "models" / "real_exports"


def path(name: str, exporter: str = "torchscript", opset: int = 17, build: bool = True) -> Path:
    """The cached model file; built (needs torch + transformers) when missing and ``build``."""
    if name not in SPECS:
        raise KeyError(f"unknown real-export model {name!r}; known: {', '.join(NAMES)}")
    if exporter not in EXPORTERS:
        raise KeyError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    p = cache_dir() / f"{name}.{exporter}.opset{opset}.onnx"
    if build and not p.exists():
        export(name, exporter, opset, p)
    return p


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch_version": torch.__version__, "transformers_version": transformers.__version__}


def build_torch_model(name: str, overrides: dict | None = None):
    """The transformers module for ``name``, seeded, in eval mode, its attention implementation; ``overrides``
    change config fields (the test fixtures shrink the models this way)."""
    import torch
    import transformers

    spec = SPECS[name]
    config = getattr(transformers, spec.config)(**{**spec.kwargs, **(overrides or {})})
    config._attn_implementation = spec.attn  # eager: the decomposed attention; sdpa: as the exporters write SDPA
    torch.manual_seed(SEED)
    cls = getattr(transformers, spec.model_class)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)  # T5EncoderModel has no Auto*
    # transformers initializes biases to 0 and norm weights to 1; trained models have neither,
    # and a zero bias would let constant folding delete the very Adds the fusions must absorb.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if name == "whisper_encoder":
        model = model.get_encoder()
    model.eval()
    return model


def example_inputs(name: str, batch: int = 2, seq: int = 16, seed: int = 0,
                   overrides: dict | None = None) -> dict[str, np.ndarray]:
    """Valid inputs: token ids inside the vocabulary, an attention mask whose first row pads its
    last quarter; pixels / log-mel features in [-1, 1]. ``seq`` is ignored for images and audio."""
    spec = SPECS[name]
    kw = {**spec.kwargs, **(overrides or {})}
    rng = np.random.default_rng(seed)
    if spec.kind == "image":
        size = kw["image_size"]
        return {"pixel_values": rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)}
    if spec.kind == "audio":
        frames = 2 * kw["max_source_positions"]  # the encoder insists on its full 30 s window
        return {"input_features": rng.uniform(-1, 1, (batch, kw["num_mel_bins"], frames)).astype(np.float32)}
    vocab = kw.get("vocab_size", 30522)
    ids = rng.integers(5, vocab, size=(batch, seq), dtype=np.int64)
    total = 2 * seq if spec.kind == "decoder_past" else seq  # with a KV cache: seq cached tokens, then seq new
    mask = np.ones((batch, total), dtype=np.int64)
    mask[0, total - max(1, total // 4):] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if spec.kind == "decoder_past":
        heads, hidden = (next(kw[k] for k in keys if k in kw) for keys in (HEADS_KEYS, HIDDEN_KEYS))
        shape = (batch, kw.get("num_key_value_heads", heads), seq, hidden // heads)
        for i in range(num_layers(kw)):
            for t in "kv":
                feeds[f"past_{i}_{t}"] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def output_names(name: str, overrides: dict | None = None) -> list[str]:
    """The exported model's outputs: the last hidden state (and a KV cache's present keys/values)."""
    if SPECS[name].kind != "decoder_past":
        return ["last_hidden_state"]
    layers = num_layers({**SPECS[name].kwargs, **(overrides or {})})
    return ["last_hidden_state"] + [f"present_{i}_{t}" for i in range(layers) for t in "kv"]


def num_layers(kw: dict) -> int:
    """The layer count in a config's keyword arguments (``num_hidden_layers`` or GPT-2's ``n_layer``)."""
    return next(kw[k] for k in ("num_hidden_layers", "n_layer") if k in kw)


class _Wrapper:
    """A module returning only the last hidden state (tuples and caches stay out of the graph)."""

    @staticmethod
    def make(model, kind):
        import torch

        class Last(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                if kind == "image":
                    out = self.model(pixel_values=args[0])
                elif kind == "audio":
                    out = self.model(input_features=args[0])
                elif kind == "decoder":
                    out = self.model(input_ids=args[0], attention_mask=args[1], use_cache=False)
                elif kind == "decoder_past":  # past_{i}_k, past_{i}_v per layer -> a transformers cache
                    from transformers import DynamicCache

                    cache = DynamicCache()
                    for i in range(0, len(args) - 2, 2):
                        cache.update(args[2 + i], args[3 + i], i // 2)
                    out = self.model(input_ids=args[0], attention_mask=args[1], past_key_values=cache, use_cache=True)
                    presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
                    return (out.last_hidden_state, *presents)
                else:
                    out = self.model(input_ids=args[0], attention_mask=args[1])
                return out.last_hidden_state

        return Last().eval()


def export(name: str, exporter: str, opset: int, out: Path, overrides: dict | None = None) -> Path:
    """Export ``name`` with ``exporter`` at ``opset`` to ``out`` (atomically)."""
    import torch

    spec = SPECS[name]
    module = _Wrapper.make(build_torch_model(name, overrides), spec.kind)
    feeds = example_inputs(name, batch=2, seq=16, overrides=overrides)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    names = list(feeds)
    outputs = output_names(name, overrides)
    if spec.kind in ("image", "audio"):
        axes = {names[0]: {0: "batch"}}
    else:
        axes = {n: {0: "batch", 1: "seq"} for n in names}
    axes["last_hidden_state"] = {0: "batch"} if spec.kind in ("image", "audio") else {0: "batch", 1: "seq"}
    if spec.kind == "decoder_past":
        axes["attention_mask"] = {0: "batch", 1: "total"}
        axes.update({n: {0: "batch", 2: "past"} for n in names[2:]})
        axes.update({n: {0: "batch", 2: "total"} for n in outputs[1:]})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(tmp), input_names=names, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
            model = onnx.load(str(tmp))
        else:
            from torch.export import Dim

            batch = Dim("batch", min=1, max=64)
            shapes = ([{0: batch}] if spec.kind in ("image", "audio")
                      else [{0: batch, 1: Dim("seq", min=2, max=512)}] * 2)
            if spec.kind == "decoder_past":  # the mask spans past + new: its own dim (torch.export cannot add two)
                past = Dim("past", min=2, max=512)
                shapes[1] = {0: batch, 1: Dim("total", min=4, max=1024)}
                shapes += [{0: batch, 2: past}] * (len(names) - 2)
            program = torch.onnx.export(module, args, input_names=names, output_names=outputs,
                                        dynamic_shapes=(tuple(shapes),), opset_version=opset, dynamo=True,
                                        optimize=True, verbose=False)
            model = program.model_proto
    facts = {**versions(), "exporter": exporter, "infoptc.real_export": name, "seed": str(SEED)}
    if overrides:
        facts["config_overrides"] = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    for key, value in facts.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(tmp), save_as_external_data=False)
    tmp.replace(out)
    return out


def variants(names=NAMES, exporters=EXPORTERS, opsets=(17, NEWEST_OPSET)):
    """(name, exporter, opset) triples: TorchScript at every opset, dynamo at opsets >= 18."""
    for n in names:
        for e in exporters:
            for o in opsets:
                if e == "dynamo" and o < 18:
                    continue
                yield n, e, o


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="build (and cache) the real-export models")
    ap.add_argument("names", nargs="*", default=list(NAMES), help=f"models (default: all): {', '.join(NAMES)}")
    ap.add_argument("--exporters", default=",".join(EXPORTERS))
    ap.add_argument("--opsets", default=f"17,{NEWEST_OPSET}")
    ap.add_argument("--force", action="store_true", help="rebuild cached models")
    args = ap.parse_args(argv)
    failed = 0
    for n, e, o in variants(args.names, args.exporters.split(","), [int(x) for x in args.opsets.split(",")]):
        p = path(n, e, o, build=False)
        if args.force and p.exists():
            p.unlink()
        try:
            path(n, e, o)
            print(f"{p}  {sum(1 for _ in onnx.load(str(p), load_external_data=False).graph.node)} nodes")
        except Exception as exc:  # an exporter failing on one architecture is a finding, not a stop
            failed += 1
            print(f"{n} {e} opset {o}: export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
