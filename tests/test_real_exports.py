"""The transformer fusions on what torch.onnx really writes, and the --ops policy.

The fixtures are Hugging Face architectures shrunk to one or two layers and exported by the
TorchScript exporter (opset 17) and the dynamo exporter (opset 20); see
tests/fixtures/real_exports/make_fixtures.py, which made them (torch is not a test dependency).
Each must fuse one attention per layer, every residual Add + LayerNorm and every GELU, and
match the original on ONNX Runtime with valid inputs (token ids in the vocabulary, a padded mask).
"""

from __future__ import annotations

import sys
from pathlib import Path

import infoptc
import onnx
import pytest
from infoptc.op_policy import METADATA_KEY
from infoptc.pass_manager import Contract
from infoptc.verify import check_equivalent

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "real_exports"
sys.path.insert(0, str(FIXTURES))
sys.path.insert(0, str(ROOT))

from golden_models import real_exports  # noqa: E402
from make_fixtures import FIXTURES as CASES  # noqa: E402
from make_fixtures import TINY, fixture_path  # noqa: E402

KINDS = {
    "attention": {"MultiHeadAttention", "Attention", "GroupQueryAttention"},
    "ln": {"LayerNormalization"},
    "skip_ln": {"SkipLayerNormalization"},
    "gelu": {"Gelu", "FastGelu", "BiasGelu"},
}


def layers(name: str) -> int:
    kw = TINY[name]
    return next(kw[k] for k in ("num_hidden_layers", "n_layer", "encoder_layers") if k in kw)


def expected(name: str, device: str = "cpu") -> dict[str, int]:
    """Per layer: one attention, two residual Add + LayerNorm pairs (the post-norm BERT's two, or
    the pre-norm block's second plus the next block's first / the final norm), one GELU; the
    embedding's LayerNorm has no residual; Whisper's two stem convolutions have a GELU each.
    For ONNX Runtime's CPU provider (the default) the pairs stay Add + LayerNormalization."""
    n = layers(name)
    skip = 2 * n if device == "gpu" else 0
    return {"attention": n, "skip_ln": skip, "ln": 2 * n + 1 - skip, "gelu": n + (2 if name == "whisper_encoder" else 0)}


def counts(model: onnx.ModelProto) -> dict[str, int]:
    ops = [n.op_type for n in model.graph.node]
    return {k: sum(op in names for op in ops) for k, names in KINDS.items()}


def feeds(name: str) -> list[dict]:
    return [real_exports.example_inputs(name, batch=2, seq=12, seed=s, overrides=TINY[name]) for s in (0, 1)]


@pytest.mark.parametrize("name, exporter, opset", CASES, ids=[f"{n}-{e}-{o}" for n, e, o in CASES])
def test_fusions_fire_on_real_exports_and_match(name, exporter, opset):
    path = fixture_path(name, exporter, opset)
    original = onnx.load(str(path))
    art = infoptc.compile(str(path), opt_level=3)
    assert counts(art.model) == expected(name)
    assert len(art.model.graph.node) < len(original.graph.node)
    check_equivalent(original, art.model, Contract.REASSOCIATING, feeds=feeds(name))


GPU_PASSES = "default<O3>,fuse-skip-layer-norm{device=gpu},fuse-rms-norm{device=gpu}"


@pytest.mark.parametrize("name, exporter, opset", [c for c in CASES if c[0] in ("bert", "gpt2", "vit")],
                         ids=lambda c: str(c))
def test_device_gpu_fuses_every_residual_layer_norm(name, exporter, opset):
    path = fixture_path(name, exporter, opset)
    original = onnx.load(str(path))
    out = infoptc.optimize(str(path), passes=GPU_PASSES)
    assert counts(out) == expected(name, "gpu")
    check_equivalent(original, out, Contract.REASSOCIATING, feeds=feeds(name))


@pytest.mark.parametrize("name, exporter, opset", [("bert", "torchscript", 17), ("gpt2", "dynamo", 20)])
def test_standard_policy_emits_only_onnx_ops_at_the_models_opset(name, exporter, opset):
    path = fixture_path(name, exporter, opset)
    original = onnx.load(str(path))
    out = infoptc.optimize(str(path), opt_level=3, ops="standard")
    assert {n.domain for n in out.graph.node} <= {"", "ai.onnx"}
    assert {o.domain: o.version for o in out.opset_import}.get("") == opset
    assert counts(out)["ln"] == 2 * layers(name) + 1  # LayerNormalization (opset 17) kept standard, not Skip
    assert {m.key: m.value for m in out.metadata_props}[METADATA_KEY] == "standard"
    onnx.checker.check_model(out)
    check_equivalent(original, out, Contract.REASSOCIATING, feeds=feeds(name))


def test_default_policy_is_ort_and_recorded(tmp_path, cli):
    path = fixture_path("bert", "torchscript", 17)
    code, out, _ = cli("compile", path, "-O3", "-o", tmp_path / "o.onnx", "--stats")
    assert code == 0
    model = onnx.load(str(tmp_path / "o.onnx"))
    assert {m.key: m.value for m in model.metadata_props}[METADATA_KEY] == "ort"
    assert any(n.domain == "com.microsoft" for n in model.graph.node)


def test_stats_give_the_first_reason_of_a_rejection(tmp_path, cli):
    path = fixture_path("bert", "torchscript", 17)
    code, out, _ = cli("compile", path, "-O3", "--ops", "standard", "-o", tmp_path / "o.onnx", "--stats")
    assert code == 0
    row = next(line for line in out.splitlines() if "fuse-skip-layer-norm" in line and "rejected" in line)
    assert "check: contrib ops are not allowed (ops 'standard'" in row


def test_unknown_policy_exits_2(tmp_path, cli):
    path = fixture_path("vit", "torchscript", 17)
    code, _, err = cli("compile", path, "--ops", "tensorrt", "-o", tmp_path / "o.onnx")
    assert code == 2 and "invalid choice: 'tensorrt'" in err and not (tmp_path / "o.onnx").exists()
    with pytest.raises(infoptc.errors.UsageError, match="unknown op policy 'tensorrt'"):
        infoptc.optimize(str(path), ops="tensorrt")


def test_a_pass_option_cannot_override_the_standard_policy():
    path = fixture_path("bert", "torchscript", 17)
    out = infoptc.optimize(str(path), passes="default<O2>,fuse-gelu{form=contrib},fuse-attention{form=contrib}",
                           ops="standard")
    assert {n.domain for n in out.graph.node} <= {"", "ai.onnx"}
