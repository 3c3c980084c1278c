"""The cuda target on every golden model TVM lowers (backends/tvm/__init__.py CudaTarget).

Without a GPU (CI) these tests prove the build path: TVM's CUDA codegen, nvcc compiling every
kernel into the fatbin the artifact carries, the artifact's round trip, and the clean "no GPU"
error (exit code 5) when asked to run it. With a GPU they run the saved artifact in a fresh
process and compare with ONNX Runtime, at test_tvm_backend's tolerance.

The schedule checks read the module our default GPU schedules produced (the result of
_tvm_build.optimize), not the compiled library: TVM's own CUDA pipeline schedules whatever it is
handed unscheduled, so the library would look the same if our rules had done nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

tvm = pytest.importorskip("tvm")

import infoptc
from infoptc.backends.tvm import build as _tvm_build
from infoptc.backends.tvm import read_blobs, read_manifest
from infoptc.errors import MissingDependencyError, UnsupportedOpError
from infoptc.verify import OrtRunner, compare_outputs, random_inputs
from test_tvm_backend import SUPPORTED, TOL, UNSUPPORTED
from tvm import s_tir, tirx

ROOT = Path(__file__).resolve().parents[1]
NVCC = _tvm_build.nvcc_path()
HAS_GPU = tvm.cuda(0).exist

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not installed")

# Every lowerable golden model for the H100's sm_90, and one CNN for the A100's sm_80 too.
BUILDS = [(name, "sm_90") for name in sorted(SUPPORTED)] + [("resnet", "sm_80")]
MAX_THREADS_PER_BLOCK = 1024  # CUDA's limit on every architecture since sm_20
ON_CHIP_SCOPES = {"shared", "shared.dyn", "local", "warp"}


@pytest.fixture(scope="module")
def built(golden):
    """``built(name, arch) -> (artifact, scheduled IRModule, source model path)``, each built once."""
    cache = {}

    def get(name: str, arch: str):
        if (name, arch) not in cache:
            path = golden(name)
            with _capture_schedules() as scheduled:
                artifact = infoptc.compile(path, target="cuda", arch=arch, input_shapes=SUPPORTED[name])
            cache[name, arch] = (artifact, scheduled["mod"], path)
        return cache[name, arch]

    return get


class _capture_schedules:
    """Keeps the module _tvm_build.optimize returns (the kernels as our rules scheduled them)."""

    def __enter__(self) -> dict:
        self.original = _tvm_build.optimize
        self.seen: dict = {}

        def spy(*args, **kwargs):
            result = self.original(*args, **kwargs)  # (module, tuning facts)
            self.seen["mod"] = result[0]
            return result

        _tvm_build.optimize = spy
        return self.seen

    def __exit__(self, *exc) -> None:
        _tvm_build.optimize = self.original


# ----------------------------------------------------------------------------- kernel checks


def _kernels(mod) -> dict:
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _blocks(sch, block):
    for child in sch.get_child_blocks(block):
        yield child
        yield from _blocks(sch, child)


def _thread_bindings(func) -> dict[str, dict[str, int]]:
    """Per block of ``func``: thread tag (blockIdx.x, threadIdx.y, ...) -> extent bound to it.

    A cooperative fetch binds the same tag again inside the outer thread loops (the same thread
    index, reused): the tag counts once, at its largest extent."""
    sch = s_tir.Schedule(func)
    found = {}
    for block in _blocks(sch, sch.get_sblock("root")):
        tags: dict[str, int] = {}
        for loop in sch.get_loops(block):
            node = sch.get(loop)
            if node.kind == tirx.ForKind.THREAD_BINDING:
                tag = node.thread_binding.thread_tag
                tags[tag] = max(tags.get(tag, 1), int(node.extent))
        found[sch.get(block).name_hint] = tags
    return found


def _grid_problems(func) -> list[str]:
    """Why ``func`` is no valid GPU kernel: blocks outside the grid (a naive kernel runs its
    loops on the host side), no thread binding at all, or more threads than a block may have.

    A block inside blockIdx but outside every threadIdx loop is fine: it is the epilogue of a
    cross-thread reduction (dlight's Reduction rule), run by each thread on the reduced value."""
    bindings = _thread_bindings(func)
    problems = [f"{block}: outside the GPU grid ({sorted(tags) or 'no binding'})"
                for block, tags in bindings.items() if not any(t.startswith("blockIdx") for t in tags)]
    extents: dict[str, int] = {}
    for tags in bindings.values():
        for tag, n in tags.items():
            if tag.startswith("threadIdx"):
                extents[tag] = max(extents.get(tag, 1), n)
    threads = int(np.prod(list(extents.values()))) if extents else 0
    if not threads:
        problems.append("no block is bound to threadIdx")
    elif threads > MAX_THREADS_PER_BLOCK:
        problems.append(f"{threads} threads per block")
    return problems


def _on_chip_scopes(func) -> set[str]:
    """Memory scopes of the buffers ``func`` allocates (shared memory, registers, ...)."""
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    return {buf.scope() for block in [root, *_blocks(sch, root)] for buf in sch.get(block).alloc_buffers}


def _fatbin_entries(fatbin: bytes) -> list[tuple[str, int]]:
    """(kind, sm) of each entry of an nvcc fatbin: a 16-byte header (magic 0xBA55ED50, version,
    header size, payload size), then entries whose header holds kind (1 PTX, 2 ELF) at byte 0,
    header size at 4, padded payload size at 8 and the SM version at 28."""
    magic, _, header, size = struct.unpack_from("<IHHQ", fatbin, 0)
    assert magic == 0xBA55ED50, hex(magic)
    entries, offset = [], header
    while offset < header + size:
        kind, _, entry_header, payload = struct.unpack_from("<HHII", fatbin, offset)
        (sm,) = struct.unpack_from("<I", fatbin, offset + 28)
        entries.append(({1: "ptx", 2: "elf"}.get(kind, str(kind)), sm))
        offset += entry_header + payload
    return entries


def test_thread_check_flags_naive_kernels(golden):
    """The check itself: unscheduled kernels (schedules=none leaves them to TVM) fail it."""
    with _capture_schedules() as scheduled:
        infoptc.compile(golden("mlp"), target="cuda", arch="sm_90", schedules="none", input_shapes=SUPPORTED["mlp"])
    kernels = _kernels(scheduled["mod"])
    assert kernels and all(_grid_problems(f) for f in kernels.values())
    assert not any(_on_chip_scopes(f) & ON_CHIP_SCOPES for f in kernels.values())


# ----------------------------------------------------------------------------- the build path


@pytest.mark.parametrize("name,arch", BUILDS)
def test_cuda_build_is_scheduled_compiled_and_round_trips(name, arch, built, tmp_path):
    artifact, scheduled, _ = built(name, arch)
    facts = artifact.describe()
    assert facts["tvm_target"]["arch"] == arch and facts["schedules"] == "rules"
    assert "release" in facts["cuda"]["nvcc"] and facts["cuda"]["fatbin_bytes"] > 0

    kernels = _kernels(scheduled)
    assert kernels
    invalid = {k: bad for k, f in kernels.items() if (bad := _grid_problems(f))}
    assert not invalid, invalid
    # Contractions get a tiling rule (Matmul, GEMV, Reduction): operands staged in shared memory
    # or partial sums in registers. dlight's Fallback, which allocates neither, only binds the
    # output to threads and leaves each thread a serial loop over the whole reduction.
    contractions = [k for k in kernels if "matmul" in k or "conv2d" in k]
    naive = [k for k in contractions if not _on_chip_scopes(kernels[k]) & ON_CHIP_SCOPES]
    assert not naive, naive

    # nvcc compiled the source that holds every kernel: the blob names that source's sha256.
    (cuda,) = _tvm_build.device_modules(artifact.executable, "cuda")
    source = cuda.inspect_source("")
    # TVM's pipeline runs FuseOps again: it folds a tuple item into its consumer (gpt's split
    # heads), which renames that kernel fused_<name>.
    missing = [k for k in kernels if not re.search(rf"__global__ void .*\b(fused_)?{k}_kernel\w*\(", source)]
    assert not missing, missing

    path = artifact.save(tmp_path / f"{name}_cuda.so")[0]
    manifest = read_manifest(path)
    blobs = read_blobs(path, manifest)
    assert manifest["target"] == "cuda" and manifest["cuda"]["arch"] == arch
    compiled_shapes = {s["name"]: tuple(s["shape"]) for s in manifest["inputs"]}
    assert SUPPORTED[name].items() <= compiled_shapes.items()  # the shapes we bound
    assert blobs["cuda_source_sha256"].decode() == hashlib.sha256(source.encode()).hexdigest()
    # SASS for the arch, plus its PTX so that newer GPUs can JIT it.
    number = int(arch.removeprefix("sm_"))
    assert sorted(_fatbin_entries(blobs["cuda_fatbin"])) == [("elf", number), ("ptx", number)]
    reloaded = infoptc.load(path)
    assert reloaded.target == "cuda" and reloaded.blobs == blobs


@pytest.mark.parametrize("name,arch", BUILDS)
def test_cuda_artifact_runs_or_says_no_gpu(name, arch, built, cli, tmp_path):
    """On a GPU: a fresh process runs the saved file and matches ONNX Runtime. Without one:
    MissingDependencyError from the API, exit code 5 from ``infoptc run``."""
    artifact, _, source = built(name, arch)
    path = artifact.save(tmp_path / f"{name}_cuda.so")[0]
    feeds = random_inputs(artifact.model, seed=1)
    np.savez(tmp_path / "in.npz", **feeds)
    if not HAS_GPU:
        with pytest.raises(MissingDependencyError, match="NVIDIA GPU"):
            infoptc.load(path).run(feeds)
        code, _, err = cli("run", path, "--inputs", tmp_path / "in.npz")
        assert code == 5 and "NVIDIA GPU" in err and "Traceback" not in err
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "infoptc.cli", "run", str(path), "--inputs",
                           str(tmp_path / "in.npz"), "--save-outputs", str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    expected = OrtRunner(onnx.load(source)).run(feeds)
    with np.load(tmp_path / "out.npz") as out:
        diffs = compare_outputs(expected, {k: out[k] for k in out.files}, tolerances={k: TOL for k in expected})
    bad = [d.describe() for d in diffs if not d.ok]
    assert not bad, bad


@pytest.mark.parametrize("name,op", sorted(UNSUPPORTED.items()))
def test_cuda_unsupported_golden_models_name_the_op(name, op, golden, cli, tmp_path):
    with pytest.raises(UnsupportedOpError, match=rf"\b{op}\b.*--target onnx"):
        infoptc.compile(golden(name), target="cuda", arch="sm_90")
    code, _, err = cli("compile", golden(name), "--target", "cuda", "--arch", "sm_90", "-o", tmp_path / "x.so")
    assert code == 6 and op in err and "Traceback" not in err
    assert not (tmp_path / "x.so").exists()

