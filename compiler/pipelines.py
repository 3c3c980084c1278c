"""The textual pipeline language and the -O levels.

    pipeline := item ("," item)*
    item     := NAME ["{" key=value ("," key=value)* "}"]      a pass with options
              | "fixpoint" ["{max-iterations=N}"] "(" pipeline ")"
              | "default<O2>"                                  an -O level, inline

Example: ``dce,fold-constants{size-limit=1MB},fixpoint(cse,dce)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError
from .pass_registry import get_pass

# Every -O level, top to bottom, in one place. `infoptc passes --pipeline -O2` prints these.
# The manager cleans up and re-sorts after every pass that changes the graph; `fixpoint(...)`
# repeats its passes until a round changes nothing (each pass exposes work for the others:
# folding a shape makes a Reshape a no-op, removing it makes two nodes common subexpressions).
OPT_LEVELS: dict[str, str] = {
    # Nothing: the model is only validated and re-serialized.
    "O0": "",
    # Cleanup that cannot change arithmetic: every pass here has the exact contract (outputs bit
    # for bit). Shape arithmetic and integer/data-movement constants fold; fp math does not.
    "O1": "dce,"
          "fixpoint(eliminate-noops,fold-shapes,fold-constants{exact-only=true},cse,dedup-initializers),"
          "toposort",
    # O1 plus full constant folding (fp evaluated by the reference evaluator: reassociating),
    # x+0.0 removal, and the standard fusions. conv-bn folds batch norms into the weights inside
    # the fixpoint, before cse: cse merges convs that read equal weights, and a merged conv
    # feeding several batch norms could no longer absorb any of them.
    "O2": "dce,"
          "fixpoint(eliminate-noops{no-signed-zeros=true},fold-shapes,fold-constants,fuse-conv-bn,cse,"
          "dedup-initializers),"
          "fuse-pad,fuse-matmul-add,fuse-transposes,fuse-layer-norm,fuse-gelu,"
          "toposort",
    # O2 plus target-specific fusions and layout-sensitive rewrites.
    "O3": "dce,"
          "fixpoint(eliminate-noops{no-signed-zeros=true},fold-shapes,fold-constants,fuse-conv-bn,cse,"
          "dedup-initializers),"
          "fuse-pad,fuse-matmul-add,fuse-transposes,fuse-layer-norm,fuse-gelu,"
          "fuse-rms-norm,fuse-attention,fuse-qkv-projection,fuse-attention-mask,fuse-gemm-reshape,fuse-activation,fuse-skip-layer-norm,fuse-bias-gelu,"
          # last: the fusions above follow the embeddings' dims back to the input ids
          "fuse-embed-layer-norm,"
          "toposort",
    # Size: O2's simplifications, but folding may grow the model by at most 16 KB per node, weights
    # included (ConstantOfShape/Expand/Tile stay as ops), and identical initializers always merge.
    # Last, the node order with the lowest activation-memory peak found (the manager keeps it).
    "Os": "dce,"
          "fixpoint(eliminate-noops,fold-shapes,fold-constants{size-limit=16KB,weight-size-limit=16KB},cse,"
          "dedup-initializers),"
          "toposort,reorder-for-memory",
}


# The quantizers and the fusions they must run before or instead of. A quantized pipeline is the
# level's own minus the fusions into ONNX-Runtime-only fp32 kernels (FusedConv, Attention would
# hide the Conv/MatMuls from the quantizer), then the quantizer, then a final sort.
QUANTIZERS = {"int8": "quantize-int8", "int8-dynamic": "quantize-int8-dynamic", "auto": "quantize-auto"}
# Low-precision float and int4 weight-only modes, and the options the mode name implies.
QUANTIZERS.update({"fp16": "convert-float", "bf16": "convert-float", "int4": "quantize-int4"})
MODE_OPTIONS = {"fp16": {"to": "fp16"}, "bf16": {"to": "bf16"}}
_HIDES_FROM_QUANTIZER = ("fuse-attention", "fuse-activation", "fuse-skip-layer-norm", "fuse-bias-gelu",
                         "fuse-qkv-projection", "fuse-attention-mask", "fuse-embed-layer-norm")


def quantize_pipeline(level_or_pipeline: int | str, mode: str, options: dict | None = None, *,
                      equalize: bool = False, correct_bias: bool = False,
                      smooth_quant: float | None = None) -> list:
    """The pipeline (pass instances) of an -O level, or of pipeline text, with the ``mode``
    quantizer (``int8`` or ``int8-dynamic``) appended with ``options``, preceded by the
    accuracy-recovery passes asked for: ``equalize-cross-layer``, ``smooth-quant{alpha}``,
    ``correct-bias`` (which computes the weights' rounding as the quantizer will: same isa)."""
    if mode not in QUANTIZERS:
        raise UsageError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANTIZERS)}")
    options = dict(options or {})
    items = pipeline_before_quantization(level_or_pipeline)
    if equalize:
        items.append(get_pass("equalize-cross-layer")())
    if smooth_quant is not None:
        items.append(get_pass("smooth-quant")(alpha=smooth_quant, **_shared(options, "calibration", "samples")))
    if correct_bias:
        if mode != "int8":
            raise UsageError("bias correction needs the static int8 quantizer (--quantize int8)")
        items.append(get_pass("correct-bias")(**_shared(options, "calibration", "samples", "isa", "exclude", "per-channel")))
    return items + [get_pass(QUANTIZERS[mode])(**{**MODE_OPTIONS.get(mode, {}), **options}), get_pass("toposort")()]


def pipeline_before_quantization(level_or_pipeline: int | str) -> list:
    """The passes of an -O level (or of pipeline text) that run before a quantizer: the level's
    own minus the fusions that would hide Conv/MatMuls from it (and the final sort)."""
    text = str(level_or_pipeline)
    if re.fullmatch(r"-?O?[0-3s]", text):
        text = pipeline_for_level(text)
    return [p for p in parse_pipeline(text) if getattr(p, "name", None) not in _HIDES_FROM_QUANTIZER + ("toposort",)]


# Compression passes around a level's pipeline. The structural ones (prune-channels, low-rank)
# run first, while BatchNormalizations and plain Conv/Gemm/MatMul nodes are still there for the
# analysis to see; the ones that only change weight values (cluster-weights, sparsify) run last,
# so that no fusion or folding undoes them.
COMPRESS_LAST = ("cluster-weights", "sparsify")


def compress_pipeline(base: str | list, compress: list[str]) -> list:
    """``base`` (pipeline text or items) with the compression passes ``compress`` (pipeline
    texts, e.g. ``["prune-channels{ratio=0.3}"]``) placed around it, then a final sort."""
    base_items = parse_pipeline(base) if isinstance(base, str) else list(base)
    base_items = [p for p in base_items if getattr(p, "name", None) != "toposort"]
    items = [p for text in compress for p in parse_pipeline(text)]
    first = [p for p in items if getattr(p, "name", None) not in COMPRESS_LAST]
    last = [p for p in items if getattr(p, "name", None) in COMPRESS_LAST]
    return first + base_items + last + [get_pass("toposort")()]


def _shared(options: dict, *keys: str) -> dict:
    return {k: options[k] for k in keys if k in options}


def opt_level_name(level: int | str) -> str:
    key = str(level).lstrip("-")
    key = key if key.startswith("O") else f"O{key}"
    if key not in OPT_LEVELS:
        raise UsageError(f"unknown optimization level {level!r}; choose one of -O0 -O1 -O2 -O3 -Os")
    return key


def pipeline_for_level(level: int | str) -> str:
    return OPT_LEVELS[opt_level_name(level)]


@dataclass
class Fixpoint:
    """Run ``items`` again until an iteration changes nothing (at most ``max_iterations``)."""

    items: list
    max_iterations: int = 8

    def __str__(self) -> str:
        opt = "" if self.max_iterations == 8 else "{max-iterations=%d}" % self.max_iterations
        return f"fixpoint{opt}(" + ",".join(map(str, self.items)) + ")"


_TOKEN = re.compile(r"\s*(?:(default<[A-Za-z0-9]+>)|([A-Za-z0-9_.\-]+)|(.))")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = [m.group(0).strip() for m in _TOKEN.finditer(text) if m.group(0).strip()]
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            want = f"{expected!r}" if expected else "a pass name"
            got = "end of text" if tok is None else repr(tok)
            raise UsageError(f"bad pipeline {self.text!r}: expected {want}, got {got}")
        self.pos += 1
        return tok

    def pipeline(self, closing: str | None = None) -> list:
        items = []
        if self.peek() in (None, closing):
            return items
        while True:
            items.extend(self.item())
            if self.peek() != ",":
                return items
            self.take(",")

    def item(self) -> list:
        name = self.take()
        if name.startswith("default<"):
            return parse_pipeline(pipeline_for_level(name[len("default<") : -1]))
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise UsageError(f"bad pipeline {self.text!r}: expected a pass name, got {name!r}")
        options = self.options() if self.peek() == "{" else {}
        if name == "fixpoint":
            self.take("(")
            inner = self.pipeline(")")
            self.take(")")
            unknown = set(options) - {"max-iterations"}
            if unknown:
                raise UsageError(f"unknown option {sorted(unknown)[0]!r} for fixpoint; it takes max-iterations")
            try:
                limit = int(options.get("max-iterations", 8))
            except ValueError:
                raise UsageError("fixpoint max-iterations must be an integer") from None
            return [Fixpoint(inner, max_iterations=limit)]
        return [get_pass(name)(**options)]

    def options(self) -> dict[str, str]:
        self.take("{")
        opts: dict[str, str] = {}
        while self.peek() != "}":
            key = self.take()
            self.take("=")
            value = []
            while self.peek() not in (",", "}", None):
                value.append(self.take())
            if not value:
                raise UsageError(f"bad pipeline {self.text!r}: option {key!r} has no value")
            opts[key] = "".join(value)
            if self.peek() == ",":
                self.take(",")
        self.take("}")
        return opts


def parse_pipeline(text: str) -> list:
    """Parse pipeline text into a list of pass instances and ``Fixpoint`` groups."""
    parser = _Parser(text)
    items = parser.pipeline()
    if parser.peek() is not None:
        raise UsageError(f"bad pipeline {text!r}: unexpected {parser.peek()!r}")
    return items


def memory_limited_pipeline(pipeline: str | list, limit: int) -> list:
    """``pipeline`` (text or pass instances) ending in ``reorder-for-memory{memory-limit=limit}``,
    in place of any reorder-for-memory it had: the order it leaves must fit ``limit`` bytes."""
    items = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    items = [p for p in items if getattr(p, "name", None) != "reorder-for-memory"]
    return items + [get_pass("reorder-for-memory")(memory_limit=limit)]
