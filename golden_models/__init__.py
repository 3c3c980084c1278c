"""Deterministic golden ONNX models for infoptc, built from scripts and fixed seeds.

Every model module exposes ``build() -> onnx.ModelProto`` (onnx.helper + numpy
only, opset 17, IR version 8, torch.onnx-style node / tensor / initializer
names) and ``example_inputs(...) -> dict[str, np.ndarray]``.

    from golden_models import BUILDERS, build_all
    model = BUILDERS["bert"]()
    build_all("out/")                       # writes out/<name>.onnx (+ digits_cnn_test.npz)

``digits_cnn`` needs scikit-learn (for the bundled ``load_digits`` data).

Real-size models (``REAL_SIZE_NAMES``: resnet18, mobilenetv2, efficientnet_b0,
vit_tiny, bert_small, gpt2_small; 14-370 MB each) are built on demand only:
``REAL_SIZE_BUILDERS[name]()``, ``build_all(out, ["resnet18"])`` or
``python golden_models/build.py resnet18``; ``build_all()`` with no names and
``BUILDERS`` stay the small, fast set.  Trained models shipped in PyPI wheels,
with real calibration / evaluation data and task metrics: ``golden_models.trained``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Iterable

import onnx

MODEL_NAMES: tuple[str, ...] = (
    "resnet", "mobilenet", "bert", "gpt", "mlp", "control_flow", "digits_cnn",
)
# large, built on demand only (never by build_all() without names)
REAL_SIZE_NAMES: tuple[str, ...] = (
    "resnet18", "mobilenetv2", "efficientnet_b0", "vit_tiny", "bert_small", "gpt2_small",
)


def _lazy_builder(name: str) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        return module(name).build()

    build.__name__ = f"build_{name}"
    build.__qualname__ = build.__name__
    build.__doc__ = f"Build the ``{name}`` golden model (golden_models.{name}.build)."
    return build


def module(name: str):
    """The model module ``golden_models.<name>`` (imported on first use)."""
    if name not in MODEL_NAMES and name not in REAL_SIZE_NAMES:
        raise KeyError(f"unknown golden model {name!r}; known: "
                       f"{', '.join(MODEL_NAMES + REAL_SIZE_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {n: _lazy_builder(n) for n in MODEL_NAMES}
REAL_SIZE_BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    n: _lazy_builder(n) for n in REAL_SIZE_NAMES
}

DEFAULT_OUT_DIR = Path(__file__).resolve().parent


def example_inputs(name: str, **kwargs):
    """Random valid inputs for model ``name`` (see each module's ``example_inputs``)."""
    return module(name).example_inputs(**kwargs)


def build_all(out_dir=None, names: Iterable[str] | None = None) -> list[Path]:
    """Build the named models and ``onnx.save`` them as ``<out_dir>/<name>.onnx``.

    Default: all of ``MODEL_NAMES`` (the small ones); real-size models only when named.

    ``digits_cnn`` also writes its held-out split as ``digits_cnn_test.npz``.
    Returns the written paths, in order.  Output bytes are identical on every run.
    """
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    selected = list(MODEL_NAMES) if names is None else list(names)
    builders = {**BUILDERS, **REAL_SIZE_BUILDERS}
    for n in selected:
        if n not in builders:
            raise KeyError(f"unknown golden model {n!r}; known: {', '.join(builders)}")
    written: list[Path] = []
    for n in selected:
        model = builders[n]()
        path = out / f"{n}.onnx"
        onnx.save(model, str(path))
        written.append(path)
        if n == "digits_cnn":
            written.append(module(n).save_dataset(out / "digits_cnn_test.npz"))
    return written


__all__ = ["BUILDERS", "MODEL_NAMES", "REAL_SIZE_BUILDERS", "REAL_SIZE_NAMES", "DEFAULT_OUT_DIR",
           "build_all", "example_inputs", "module"]
