"""Which integer formats the target's kernels run fast and exactly, chosen from the host CPU.

ONNX Runtime's x86 int8 kernels (MLAS) fuse QDQ groups into QLinearConv / QLinearMatMul /
QGemm with uint8 activations and int8 weights. With VNNI (AVX512_VNNI or AVX_VNNI) the u8 x s8
dot products accumulate in int32 and are exact. Without it (AVX2 only) they go through
``vpmaddubsw``, which adds pairs of u8 x s8 products in *saturating* int16: two products of
255 x 127 overflow it. Weights limited to 7 bits ([-63, 63]) keep every pair below 2^15
(ONNX Runtime's ``reduce_range``), at a small cost in weight resolution.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

ISAS = ("auto", "vnni", "avx2", "generic")


@dataclass(frozen=True)
class Recipe:
    isa: str  # what the choice was made for
    activation: str  # "uint8": asymmetric, zero point where the range puts it
    weight: str  # "int8": symmetric, zero point 0
    weight_qmax: int  # 127, or 63 where u8 x s8 pairs must not saturate int16

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` (empty where there is none)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def host_isa(flags: set[str] | None = None) -> str:
    flags = cpu_flags() if flags is None else flags
    if {"avx512_vnni", "avx_vnni", "amx_int8"} & flags:
        return "vnni"
    if "avx2" in flags:
        return "avx2"
    return "generic" if platform.machine().lower() not in ("x86_64", "amd64") else "avx2"


def recipe_for(isa: str = "auto") -> Recipe:
    """The formats for ``isa`` (``auto``: this host's)."""
    if isa not in ISAS:
        raise ValueError(f"unknown ISA {isa!r}; choose one of {', '.join(ISAS)}")
    if isa == "auto":
        isa = host_isa()
    # Only the x86 u8 x s8 path without VNNI saturates; ARM's and VNNI's dot products are exact.
    return Recipe(isa=isa, activation="uint8", weight="int8", weight_qmax=63 if isa == "avx2" else 127)
