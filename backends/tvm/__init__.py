"""TVM targets: ``llvm`` (this CPU, or a cross triple) and ``cuda`` (NVIDIA GPUs, built by nvcc).

    optimized ModelProto -> static shapes + frontend fixes (prepare.py)
                         -> Relax passes, default schedules or MetaSchedule (build.py)
                         -> tvm.compile -> TvmArtifact (one .so with its manifest inside)

Target options (``infoptc.compile(model, target="llvm", **options)``; the CLI passes
``--threads``): ``threads``, ``mcpu``, ``mattr`` (e.g. ``"+avx2,-avx512f"``), ``mtriple``
(cross-compiling, e.g. ``aarch64-linux-gnu``), ``arch`` (cuda, e.g. ``sm_90``), ``tune`` (trials)
and/or ``tune_time`` (seconds) with ``tuning_db`` (a folder), ``schedules`` (``rules``, the
default, or ``none`` for TVM's naive kernels), ``cpu_layout`` (NHWC convs, default on),
``dynamic_dims`` (keep unbound symbolic input dims symbolic, llvm default on). See
docs/targets/tvm.md.

The artifact file is a shared library that ``dlopen`` loads as it is, followed by a trailer:
    [library][blobs][manifest JSON][manifest length: 8 bytes little-endian][MAGIC: 16 bytes]
The manifest names the inputs and outputs, the TVM target, the versions and the sha256 of the
source model; blobs hold what the library cannot (the nvcc-built CUDA kernels).

TVM is imported lazily: this module is imported whenever targets are listed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from infoptc.errors import CompileError, InfoptcError, InvalidModelError, MissingDependencyError, UsageError
from infoptc.pass_manager import parse_bool
from infoptc.progress import stage
from infoptc.targets import Artifact, Target, TensorSpec, register_target

# The pinned versions and import_tvm stay importable from here (benchmarks/cuda.py uses import_tvm).
from .runtime import (  # noqa: F401
    INSTALL,
    PINNED_FFI,
    PINNED_TVM,
    TUNING_FFI_SERIES,
    compile_error,
    error_line,
    import_tvm,
    native_output_to_log,
    size_thread_pool,
    tvm_versions,
)

log = logging.getLogger("infoptc.backends.tvm")

MAGIC = b"\x00INFOPTC-TVM-01\x00"
FORMAT = "infoptc-tvm/1"
_TRAILER = struct.Struct("<Q")

OPTIONS = {
    "threads": "runtime threads (default: all cores)",
    "mcpu": "LLVM CPU name (default: this machine's)",
    "mattr": "LLVM features, e.g. '+avx2,-avx512f' (default: what /proc/cpuinfo shows)",
    "mtriple": "LLVM target triple, for cross-compiling (e.g. aarch64-linux-gnu)",
    "arch": "cuda: GPU architecture, e.g. sm_90 (default: the local GPU's)",
    "tune": "MetaSchedule trials (0: no tuning, or no trial limit with tune_time)",
    "tune_time": "seconds of MetaSchedule tuning (with tune: whichever runs out first)",
    "tuning_db": "folder of the MetaSchedule database, reused across compiles",
    "tune_timeout": "seconds per build/run of one tuning candidate",
    "schedules": "'rules' (default schedules) or 'none' (llvm: TVM's naive kernels; cuda: TVM's own default rules)",
    "cpu_layout": "llvm: run convolutions in NHWC (default true)",
    "pack_weights": "llvm: constant matmul weights packed in the register tiles' column strips (default true)",
    "fast_math": "polynomial exp/tanh/erf/softmax, TVM's fast_* ops, and float sums LLVM may reassociate "
                 "(llvm default: true)",
    "dynamic_dims": "keep unbound symbolic input dims symbolic: one library runs any value of them "
                    "(llvm default: true; false: set them to 1)",
}

# /proc/cpuinfo flag -> LLVM feature: features an -mcpu implies but this CPU (or the VM that
# hides some of it) lacks are switched off, so the code never faults on an illegal instruction.
CPUINFO_FEATURES = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512_vnni": "avx512vnni", "avx512_bf16": "avx512bf16",
    "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi", "avx512_vbmi2": "avx512vbmi2",
    "avx_vnni": "avxvnni", "amx_tile": "amx-tile", "amx_int8": "amx-int8", "amx_bf16": "amx-bf16",
}


# ----------------------------------------------------------------------------- availability


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _bool_option(options: dict, key: str, default: bool) -> bool:
    try:
        return parse_bool(options.get(key, default))
    except ValueError:
        raise UsageError(f"target option {key}={options[key]!r}: expected true or false") from None


def _seconds_option(options: dict, key: str) -> float | None:
    value = options.get(key)
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"target option {key}={value!r}: expected seconds") from None
    if not seconds > 0 or math.isinf(seconds):
        raise UsageError(f"target option {key}={value!r}: must be a positive number of seconds")
    return seconds


def _int_option(options: dict, key: str, default: int | None = None, minimum: int = 0) -> int | None:
    value = options.get(key)
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"target option {key}={value!r}: expected an integer") from None
    if number < minimum:
        raise UsageError(f"target option {key}={value!r}: must be at least {minimum}")
    return number


# ----------------------------------------------------------------------------- artifact


# The blob that holds the lowered model without its large weights (analysis.skeleton).
SKELETON_BLOB = "model_skeleton"


class TvmArtifact(Artifact):
    """A compiled model: TVM's exported library plus a manifest, in one file."""

    def __init__(self, manifest: dict, *, executable=None, path: Path | None = None, model=None,
                 blobs: dict[str, bytes] | None = None, export_compiler: str | None = None):
        self.manifest = manifest
        self.target = manifest["target"]
        self.executable = executable  # set after compiling; None after load()
        self.path = path  # the file it was loaded from
        self.blobs = dict(blobs or {})
        self.export_compiler = export_compiler
        if model is not None:
            self.model = model  # the optimized ONNX model that was lowered (compile summary)
        self._vm = None
        self._module = None
        self._device = None
        self._specs = None
        self._staging = threading.local()  # per calling thread: input name -> aligned buffer

    # -- facts
    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in self.manifest["inputs"]]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in self.manifest["outputs"]]

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        facts = {"target": m["target"], "tvm_target": m["tvm_target"], "target_text": target_text(m["tvm_target"]),
                 "runtime": f"tvm {m['versions']['tvm']} (tvm-ffi {m['versions']['tvm_ffi']})",
                 "schedules": m["schedules"], "threads": m.get("threads") or "all cores",
                 "input_shapes": {s["name"]: s["shape"] for s in m["inputs"]}}
        for key in ("relax_options", "defaulted_dims", "symbolic_dims", "symbolic_fallback", "tuning", "cuda",
                    "cpu_features", "compile_seconds"):
            if m.get(key):
                facts[key] = m[key]
        return facts

    def analysis_model(self) -> onnx.ModelProto | None:
        """The model as lowered (after compile), or its skeleton kept in the file (after load)."""
        model = getattr(self, "model", None)
        if model is None and SKELETON_BLOB in self.blobs:
            model = onnx.ModelProto()
            model.ParseFromString(self.blobs[SKELETON_BLOB])
        return model

    def size_bytes(self) -> int | None:
        if self.path is not None:
            return Path(self.path).stat().st_size
        return self.manifest.get("library_bytes")

    # -- file
    def save(self, path: str | os.PathLike) -> list[Path]:
        path = Path(path)
        if path.parent != Path("") and not path.parent.is_dir():
            raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")
        manifest = dict(self.manifest)
        source = getattr(self, "source", None)
        if source is not None and not manifest.get("source_sha256"):
            manifest["source_sha256"] = hashlib.sha256(source.SerializeToString(deterministic=True)).hexdigest()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".so", dir=path.parent or ".")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            if self.executable is not None:
                manifest["library_bytes"] = self._export(tmp)
            elif self.path is not None:
                with open(self.path, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                    dst.truncate(self.manifest["library_bytes"])
            else:
                raise CompileError("nothing to save: the artifact has neither a library nor a file")
            write_trailer(tmp, manifest, self.blobs)
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.manifest = manifest
        return [path]

    def _export(self, tmp: Path) -> int:
        kwargs = {}
        if self.export_compiler:
            from tvm.support import cc

            kwargs["fcompile"] = cc.cross_compiler(self.export_compiler)
        try:
            with native_output_to_log(), stage(f"linking the TVM library ({self.target})"):
                self.executable.export_library(str(tmp), **kwargs)
        except Exception as e:  # noqa: BLE001 - linker missing or failing
            first = error_line(e)
            raise CompileError(f"exporting the TVM library failed: {first[:300]}") from None
        return tmp.stat().st_size

    # -- running
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from infoptc.verify import check_feeds

        if self._specs is None:
            specs = {s.name: s for s in self.inputs}
            symbols = [(n, axis, d) for n, s in specs.items() for axis, d in enumerate(s.shape) if isinstance(d, str)]
            self._specs = (specs, [s.name for s in self.outputs],
                           {n: (np.dtype(s.dtype), tuple(s.shape)) for n, s in specs.items()}, symbols)
        specs, names, expected, symbols = self._specs
        if len(inputs) != len(expected) or not all(
                isinstance(v := inputs.get(n), np.ndarray) and v.dtype == dt and _fits(v.shape, shape)
                for n, (dt, shape) in expected.items()) or (symbols and not _agree(inputs, symbols)):
            check_feeds(specs, inputs)  # names the problem; static dims must match exactly
            raise UsageError("inputs do not match the compiled shapes: "
                             + ", ".join(f"{n}: {list(np.shape(inputs[n]))} (compiled for {list(shape)})"
                                         for n, (_, shape) in expected.items() if not _fits(np.shape(inputs[n]), shape)))
        vm, _ = self._machine()
        self._configure_threads()
        args = self._arguments(inputs, specs)
        try:
            result = vm["main"](*args)
        except Exception as e:  # noqa: BLE001 - a runtime check failed inside TVM
            first = error_line(e)
            raise CompileError(f"the TVM runtime failed: {first[:300]}") from None
        values = [result] if hasattr(result, "numpy") else list(_flatten(result))
        if len(values) != len(names):
            raise CompileError(f"the compiled model returned {len(values)} outputs, the manifest names {len(names)}")
        if self.target == "cuda":
            return {name: value.numpy() for name, value in zip(names, values)}
        # Copy out: the VM reuses its output buffers on the next call.
        return {name: np.from_dlpack(value).copy() for name, value in zip(names, values)}

    def _arguments(self, inputs: dict[str, np.ndarray], specs) -> list:
        import tvm

        if self.target == "cuda":
            return [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), self._device) for name in specs]
        import tvm_ffi  # zero-copy: copying into a fresh TVM tensor costs more than a small model runs

        if self.manifest.get("unaligned_inputs"):
            return [tvm_ffi.from_dlpack(np.ascontiguousarray(inputs[name])) for name in specs]
        staging = self._staging.__dict__  # built before kernels accepted unaligned inputs: 64-byte copies
        return [tvm_ffi.from_dlpack(_aligned(inputs[name], staging, name)) for name in specs]

    def profile(self, inputs: dict[str, np.ndarray], iterations: int, warmup: int) -> list[dict]:
        """Chrome-trace events of ``warmup + iterations`` runs (infoptc.profile's protocol): each
        VM call timed through the VM's instrument hook, a kernel's op being its name without
        numbers (``_kernel_kind``: all kernels of one fusion pattern together), the VM's own
        builtins (allocations, shape checks) as ``vm.builtin``, and each run as ``model_run``.
        The instrumented VM is a separate one: ``run`` keeps its uninstrumented speed."""
        import time

        from tvm import relax

        self.run(inputs)  # checks the inputs, loads the library, sizes the thread pool
        vm = relax.VirtualMachine(self._module, self._device)
        args = self._arguments(inputs, [s.name for s in self.inputs])
        origin = time.perf_counter()
        started: dict[str, float] = {}
        events: list[dict] = []

        def instrument(_func, name, before, _ret, *_args):
            now = (time.perf_counter() - origin) * 1e6
            if before:
                started[name] = now
            elif name in started:
                begin = started.pop(name)
                op = "vm.builtin" if name.startswith("vm.builtin") else _kernel_kind(name)
                events.append({"cat": "Node", "name": name, "ts": begin, "dur": now - begin, "args": {"op_name": op}})
            return 0

        vm.set_instrument(instrument)
        for _ in range(warmup + iterations):
            begin = (time.perf_counter() - origin) * 1e6
            vm["main"](*args)
            events.append({"cat": "Session", "name": "model_run", "ts": begin,
                           "dur": (time.perf_counter() - origin) * 1e6 - begin})
        return events

    def _machine(self):
        if self._vm is None:
            tvm = import_tvm()
            from tvm import relax

            _check_runnable(self.manifest)
            self._device = tvm.cuda(0) if self.target == "cuda" else tvm.cpu(0)
            if self.executable is not None:
                module = self.executable
            else:
                if self.target == "cuda":
                    _register_prebuilt_kernels(self.blobs)
                # TVM logs "Scope Loaded" once per kernel of a tuned library as it loads: debug log
                with native_output_to_log():
                    module = _load_library(self.path)
            self._module = module
            try:
                self._vm = relax.VirtualMachine(module, self._device)
            except Exception as e:  # noqa: BLE001
                first = error_line(e)
                raise CompileError(f"cannot start the TVM virtual machine: {first[:300]}") from None
        return self._vm, self._device

    def _configure_threads(self) -> None:
        """Size TVM's thread pool (one per calling thread) before this artifact runs in it.

        TVM's default is half the logical CPUs on x86 (it assumes hyper-threading): one thread
        on a 2-core VM. We hand it the CPUs this process may use and the wanted count (default:
        all of them); the pool shares those cores rather than pinning one thread per core.
        """
        wanted = self.manifest.get("threads") or 0
        ident = threading.get_ident()
        if _POOL_CONFIG.get(ident) == wanted:
            return
        size_thread_pool(int(wanted))
        _POOL_CONFIG[ident] = wanted


_POOL_CONFIG: dict[int, int] = {}


def _kernel_kind(name: str) -> str:
    """A kernel's fusion pattern: its name without the ``fused_`` prefix and the numbers TVM
    appends to tell kernels of one pattern apart (``fused_conv2d13_add26_relu2`` ->
    ``conv2d_add_relu``)."""
    return re.sub(r"(?<=[A-Za-z])\d+(?=_|$)", "", name).removeprefix("fused_")


def _fits(shape: tuple, compiled: tuple) -> bool:
    """Whether an input shape matches the compiled one (a symbolic dim, a name, takes any value)."""
    return shape == compiled or (len(shape) == len(compiled) and all(
        isinstance(want, str) or got == want for got, want in zip(shape, compiled)))


def _agree(inputs: dict, symbols: list) -> bool:
    """Whether each symbolic dim has one value across the inputs."""
    seen: dict[str, int] = {}
    return all(seen.setdefault(symbol, inputs[name].shape[axis]) == inputs[name].shape[axis]
               for name, axis, symbol in symbols)


def _aligned(array, staging: dict | None = None, key: str = "", alignment: int = 64) -> np.ndarray:
    """A C-contiguous array whose data starts on ``alignment`` bytes, as TVM's kernels assume.

    A misaligned input is copied into ``staging[key]``, a buffer kept for the next call of the
    same shape: a fresh one of a large input (ResNet's 600 KB) costs an mmap and a page fault
    per 4 KB page on every call (ResNet: 1.166 -> 1.134 ms a run)."""
    array = np.ascontiguousarray(array)
    if array.ctypes.data % alignment == 0:
        return array
    out = staging.get(key) if staging is not None else None
    if out is None or out.shape != array.shape or out.dtype != array.dtype:
        raw = np.empty(array.nbytes + alignment, dtype=np.uint8)
        start = (-raw.ctypes.data) % alignment
        out = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
        if staging is not None:
            staging[key] = out
    np.copyto(out, array)
    return out


def _flatten(value):
    if hasattr(value, "numpy"):
        yield value
        return
    for item in value:
        yield from _flatten(item)


def write_trailer(path: Path, manifest: dict, blobs: dict[str, bytes]) -> None:
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        table = {}
        for name, data in blobs.items():
            table[name] = {"offset": f.tell(), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            f.write(data)
        manifest["blobs"] = table
        text = json.dumps(manifest, indent=1, sort_keys=True).encode()
        f.write(text)
        f.write(_TRAILER.pack(len(text)))
        f.write(MAGIC)


def read_manifest(path: Path) -> dict | None:
    """The manifest at the end of ``path``, or None if the file has no infoptc trailer."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            tail = len(MAGIC) + _TRAILER.size
            if size < tail:
                return None
            f.seek(size - tail)
            (length,) = _TRAILER.unpack(f.read(_TRAILER.size))
            if f.read(len(MAGIC)) != MAGIC or length > size - tail:
                return None
            f.seek(size - tail - length)
            manifest = json.loads(f.read(length))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def read_blobs(path: Path, manifest: dict) -> dict[str, bytes]:
    blobs = {}
    with open(path, "rb") as f:
        for name, entry in manifest.get("blobs", {}).items():
            f.seek(entry["offset"])
            data = f.read(entry["bytes"])
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise InvalidModelError(f"{path}: embedded {name} is corrupt (sha256 mismatch)")
            blobs[name] = data
    return blobs


def _load_library(path: Path):
    import tvm

    # TVM picks the loader by file suffix (through symlinks too): a renamed artifact is copied
    # to a .so first. dlopen keeps its mapping after the temp file is gone.
    with tempfile.TemporaryDirectory(prefix="infoptc-tvm-") as tmp:
        target = path if path.suffix == ".so" else Path(tmp, "model.so")
        if target != path:
            shutil.copyfile(path, target)
        try:
            return tvm.runtime.load_module(str(target))
        except Exception as e:  # noqa: BLE001
            first = error_line(e)
            raise InvalidModelError(f"{path}: TVM cannot load this library here: {first[:300]}") from None


def _check_runnable(manifest: dict) -> None:
    tvm = import_tvm()
    if manifest["target"] == "cuda":
        from tvm.base import _LOADED_LIBS

        if "tvm_runtime_cuda" not in _LOADED_LIBS or not tvm.cuda(0).exist:
            raise MissingDependencyError("running a cuda artifact needs an NVIDIA GPU with its driver "
                                         "(libcuda.so.1); none is usable on this machine")
        return
    built_for = manifest.get("machine")
    if built_for and built_for != platform.machine():
        raise MissingDependencyError(f"this artifact was built for {built_for} "
                                     f"({manifest['tvm_target'].get('mtriple', '?')}); this machine is {platform.machine()}")
    missing = [f for f in manifest.get("cpu_features", {}).get("required", []) if not _host_has(f)]
    if missing:
        raise MissingDependencyError(f"this artifact uses CPU features this machine lacks: {', '.join(missing)} "
                                     "(recompile here, or with mcpu/mattr for this CPU)")


def _host_has(feature: str) -> bool:
    flags = _cpu_flags()
    if flags is None:
        return True
    reverse = {v: k for k, v in CPUINFO_FEATURES.items()}
    return reverse.get(feature, feature) in flags


# CUDA kernels built by nvcc at compile time, by sha256 of the CUDA source TVM generated.
_PREBUILT_KERNELS: dict[str, bytes] = {}
_CALLBACK_LOCK = threading.Lock()
_CALLBACK_INSTALLED = False


def _register_prebuilt_kernels(blobs: dict[str, bytes]) -> None:
    """A library built where no CUDA driver was present carries CUDA source, which TVM's CUDA
    loader compiles through ``tvm_callback_cuda_compile``; answer it with our nvcc build."""
    global _CALLBACK_INSTALLED
    if "cuda_fatbin" not in blobs or "cuda_source_sha256" not in blobs:
        return
    _PREBUILT_KERNELS[blobs["cuda_source_sha256"].decode()] = blobs["cuda_fatbin"]
    with _CALLBACK_LOCK:
        if _CALLBACK_INSTALLED:
            return
        import tvm_ffi

        try:
            import tvm.support.nvcc  # noqa: F401 - registers TVM's own callback, our fallback
        except ImportError:
            pass
        previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

        def compile_cuda(code, *rest):
            key = hashlib.sha256(str(code).encode()).hexdigest()
            if key in _PREBUILT_KERNELS:
                return bytearray(_PREBUILT_KERNELS[key])
            if previous is None:
                raise RuntimeError("no CUDA compiler callback")
            return previous(code, *rest)

        tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
        _CALLBACK_INSTALLED = True


# ----------------------------------------------------------------------------- targets


class TvmTarget(Target):
    """Shared by ``llvm`` and ``cuda``: ONNX -> Relax -> TVM executable."""

    suffix = ".so"

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise UsageError(f"unknown option(s) for target {self.name}: {', '.join(unknown)} "
                             f"(known: {', '.join(OPTIONS)})")
        options = {k: v for k, v in options.items() if v is not None}
        super().__init__(**options)
        self.threads = _int_option(options, "threads", None, minimum=1)
        self.tune = _int_option(options, "tune", 0)
        self.tune_time = _seconds_option(options, "tune_time")
        self.tune_timeout = _int_option(options, "tune_timeout", 30, minimum=1)
        self.schedules = str(options.get("schedules", "rules"))
        if self.schedules not in ("rules", "none"):
            raise UsageError(f"target option schedules={self.schedules!r}: expected 'rules' or 'none'")
        self.cpu_layout = _bool_option(options, "cpu_layout", True)
        self.pack_weights = _bool_option(options, "pack_weights", True)
        self.fast_math = _bool_option(options, "fast_math", self.name == "llvm")
        # Tuning measures kernels on concrete shapes: it binds the dims unless told otherwise.
        self.dynamic_dims = _bool_option(options, "dynamic_dims", self.name == "llvm"
                                         and not (self.tune or self.tune_time))
        if self.dynamic_dims and (self.tune or self.tune_time):
            raise UsageError("tuning needs static shapes: bind the symbolic dims with --input-shape, "
                             "or leave out dynamic_dims=true")
        if (self.tune or self.tune_time) and not options.get("tuning_db"):
            raise UsageError("tune=N or tune_time=SECONDS needs tuning_db=PATH: a folder that keeps the records "
                             "for the next compile")

    def check_available(self) -> None:
        import_tvm()
        if self.tune or self.tune_time:
            from . import build

            build.check_tuning_dependencies()

    # subclasses: the TVM target dict, and facts for the manifest
    def tvm_target(self) -> tuple[dict, dict]:
        raise NotImplementedError

    def lower(self, model: onnx.ModelProto) -> TvmArtifact:
        import time

        import_tvm()
        import tvm

        from . import build, prepare

        start = time.perf_counter()
        target_dict, facts = self.tvm_target()
        target = tvm.target.Target(target_dict)
        dynamic = self.dynamic_dims and prepare.symbolic_inputs(model)
        failed = None
        while True:
            with stage("importing the model into TVM Relax"):
                prepared, mod, fallback = self._import(model, dynamic)
            fallback = fallback or failed
            if prepared.defaulted_dims:
                log.warning("target %s: symbolic input dims set to %d: %s (bind them with --input-shape NAME:DIMS)%s",
                            self.name, prepare.DEFAULT_DIM, ", ".join(prepared.defaulted_dims),
                            f"; TVM cannot keep them symbolic here: {fallback}" if fallback else "")
            try:
                with native_output_to_log() as terminal:
                    budget = build.TuningBudget(
                        db_dir=self.options["tuning_db"], trials=self.tune, seconds=self.tune_time,
                        timeout_s=self.tune_timeout, progress_to=terminal) if self.tune or self.tune_time else None
                    imported = mod
                    step = _tuning_text(budget) if budget else "optimizing the Relax module"
                    with stage(step, own_display=budget is not None):  # tuning draws its own bar
                        mod, tuning = build.optimize(mod, target, cpu_layout=self.cpu_layout,
                                                     pack_weights=self.pack_weights,
                                                     schedules=self.schedules, tuning=budget, fast_math=self.fast_math)
                    with stage(f"building the TVM library ({target_text(_jsonable(target.export()))})"):
                        executable, blobs, more = self.build(mod, target)
                    if tuning and tuning.get("tasks_using_tuned") and self.name == "llvm":
                        with stage("timing the tuned build against the rules-only one"):
                            mod, executable = self._tuned_or_rules(imported, mod, executable, target, tuning,
                                                                   prepared.model)
                break
            except Exception as e:  # symbolic shapes failed in a pass: compile static shapes
                if not prepared.symbolic_dims:
                    if isinstance(e, InfoptcError):
                        raise
                    raise compile_error(self.name, e) from None
                first = error_line(e)
                failed = f"TVM failed to compile them ({first[:200]})"
                dynamic = False
        facts.update(more)
        export_compiler = facts.pop("_export_compiler", None)
        manifest = {
            "format": FORMAT,
            "target": self.name,
            "tvm_target": _jsonable(target.export()),
            "inputs": _specs(mod, prepared.model, "input"),
            "outputs": _specs(mod, prepared.model, "output"),
            "versions": {"infoptc": _infoptc_version(), **tvm_versions()},
            "lowered_sha256": hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest(),
            "threads": self.threads,
            "unaligned_inputs": self.name == "llvm",  # build.accept_unaligned_inputs
            "schedules": "metaschedule+rules" if tuning and tuning.get("model_check", {}).get("use") != "rules"
                         else self.schedules,
            "relax_options": {"cpu_layout": self.cpu_layout and self.name == "llvm", "fast_math": self.fast_math,
                              "pack_weights": self.pack_weights and self.name == "llvm",
                              "dynamic_dims": self.dynamic_dims},
            "defaulted_dims": prepared.defaulted_dims,
            "symbolic_dims": sorted(set(prepared.symbolic_dims.values())),
            "symbolic_fallback": fallback,
            "frontend_fixes": prepared.counters,
            "tuning": tuning,
            "compile_seconds": round(time.perf_counter() - start, 3),
            **facts,
        }
        # The model as lowered, with the input shapes the library was built for (symbolic dims
        # named as in the manifest).
        bound = onnx.ModelProto()
        bound.CopyFrom(model)
        if prepared.symbolic_dims:
            prepare.name_symbolic_inputs(bound)
        else:
            prepare.bind_symbolic_inputs(bound, prepare.DEFAULT_DIM)
        from infoptc.analysis import skeleton

        blobs = {**blobs, SKELETON_BLOB: skeleton(bound).SerializeToString()}  # FLOPs of a loaded artifact
        return TvmArtifact(manifest, executable=executable, model=bound, blobs=blobs, export_compiler=export_compiler)

    def _tuned_or_rules(self, imported, tuned_mod, tuned, target, tuning: dict, model: onnx.ModelProto):
        """The tuned build, or the rules-only one where that runs the whole model faster.

        Each tuned kernel was kept because it beat the rules alone; in the model, with other
        kernels' data in the caches, the sum can still lose (ResNet, session 2: 7 of 16 kernels
        faster alone, the model 4% slower). So both builds run the model in turns on this CPU,
        and the tuned one is kept only where it is faster by the kernels' margin."""
        from . import build

        rules_mod, _ = build.optimize(imported, target, cpu_layout=self.cpu_layout, pack_weights=self.pack_weights,
                                      schedules=self.schedules,
                                           fast_math=self.fast_math)
        rules = build.build(rules_mod, target)
        specs = _specs(tuned_mod, model, "input")
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="infoptc-timer") as timer:
            tuned_ms, rules_ms = timer.submit(build.time_models, [tuned, rules], specs,
                                              build.thread_count(target)).result()
        use = "tuned" if tuned_ms * build.TUNED_MARGIN <= rules_ms else "rules"
        tuning["model_check"] = {"tuned_ms": round(tuned_ms, 4), "rules_ms": round(rules_ms, 4), "use": use}
        log.info("tuned model %.3f ms, rules only %.3f ms: using %s", tuned_ms, rules_ms, use)
        return (tuned_mod, tuned) if use == "tuned" else (rules_mod, rules)

    def _import(self, model: onnx.ModelProto, dynamic: bool):
        """``(prepared, relax module, why not symbolic)``: with ``dynamic``, the model imported
        with its symbolic input dims kept, if TVM's frontend keeps every shape known; otherwise
        (or if it fails) imported again with the dims bound, and the reason."""
        from . import prepare

        reason = None
        if dynamic:
            prepared = prepare.prepare(model, keep_symbolic=True)
            try:
                with native_output_to_log():
                    mod = prepare.import_onnx(prepared.model)
                lost = prepare.symbolic_shapes_known(mod)
                if lost is None:
                    return prepared, mod, None
                reason = f"its ONNX frontend computes the shape of {lost} at run time"
            except CompileError as e:
                reason = str(e).split("; compile this model")[0]
        prepared = prepare.prepare(model)
        with native_output_to_log():
            mod = prepare.import_onnx(prepared.model)
        return prepared, mod, reason

    def build(self, mod, target):
        from . import build

        return build.build(mod, target), {}, {}

    @classmethod
    def can_load(cls, path: Path) -> bool:
        manifest = read_manifest(path)
        return manifest is not None and manifest.get("target") == cls.name

    @classmethod
    def load(cls, path: Path) -> TvmArtifact:
        manifest = read_manifest(path)
        if manifest is None:
            raise InvalidModelError(f"{path}: not an infoptc TVM artifact")
        return TvmArtifact(manifest, path=Path(path), blobs=read_blobs(Path(path), manifest))


def _tuning_text(budget) -> str:
    limits = [f"{budget.trials} trials" if budget.trials else "", f"{budget.seconds:g} s" if budget.seconds else ""]
    return f"tuning with MetaSchedule ({', '.join(x for x in limits if x)}; records in {budget.db_dir})"


def target_text(spec: dict) -> str:
    """A TVM target on one line, as TVM's own target strings read: ``llvm -mcpu=znver3
    -mattr=-avx512f -num-cores=2``; ``cuda -arch=sm_90 ... (host: llvm x86_64-linux-gnu)``.
    Bookkeeping keys (tag, keys) are left out, and a triple's vendor, which says only where the
    LLVM was built (``x86_64-conda-linux-gnu``: TVM's wheel), is dropped."""
    parts = [str(spec.get("kind", "?"))]
    host = None
    first = ("mtriple", "arch", "mcpu", "mattr")  # what tells targets apart, then the rest
    for key, value in sorted(spec.items(), key=lambda kv: first.index(kv[0]) if kv[0] in first else len(first)):
        if key in ("kind", "tag", "keys") or value in (None, "", [], ()):
            continue
        if key == "host":
            host = target_text(value) if isinstance(value, dict) else str(value)
            continue
        if key == "mtriple":
            parts.append(_plain_triple(str(value)))
            continue
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        parts.append(f"-{key}={text}")
    return " ".join(parts) + (f" (host: {host})" if host else "")


def _plain_triple(triple: str) -> str:
    """``x86_64-conda-linux-gnu`` -> ``x86_64-linux-gnu``; other triples as they are."""
    pieces = triple.split("-")
    if len(pieces) == 4 and pieces[1] in ("conda", "unknown", "pc"):
        return "-".join([pieces[0], *pieces[2:]])
    return triple


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return [_jsonable(v) for v in value]
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)


def _infoptc_version() -> str:
    from infoptc import __version__

    return __version__


def _specs(mod, model: onnx.ModelProto, kind: str) -> list[dict]:
    """Names from the ONNX graph, static shapes and dtypes from the Relax signature."""
    from infoptc.verify import tensor_specs

    names = [s.name for s in tensor_specs(model, kind)]
    main = mod["main"]
    if kind == "input":
        types = [p.ty for p in main.params]
    else:
        ret = main.ret_ty
        types = list(ret.fields) if hasattr(ret, "fields") else [ret]
    if len(types) != len(names):
        raise CompileError(f"TVM's module has {len(types)} {kind}s, the model {len(names)}")
    out = []
    for name, sinfo in zip(names, types):
        shape = [_dim(d) for d in sinfo.shape.values] if getattr(sinfo, "shape", None) is not None else None
        if shape is None:
            raise CompileError(f"{kind} {name!r} has no static shape after import")
        out.append({"name": name, "dtype": str(sinfo.dtype), "shape": shape})
    return out


def _dim(value) -> int | str:
    """A dimension for the manifest: its value, or the name (expression) of a symbolic one."""
    import tvm

    return int(value) if isinstance(value, (int, tvm.tirx.IntImm)) else str(value)


@register_target
class LlvmTarget(TvmTarget):
    name = "llvm"
    summary = "TVM-compiled CPU library (.so) for this machine (or mtriple=...); TVM installed"
    # bf16: fp32 inputs and outputs (numpy has no bf16 that DLPack passes; the Casts fuse into
    # the first and last kernels), bf16 inside (backends/tvm/bf16.py)
    quantize_defaults = {"bf16": {"keep-io-types": True}}

    def tvm_target(self) -> tuple[dict, dict]:
        from tvm.target import codegen

        triple = self.options.get("mtriple")
        host_triple = codegen.llvm_get_system_triple()
        cross = bool(triple) and triple.split("-")[0] != host_triple.split("-")[0]
        mcpu = self.options.get("mcpu") or (None if cross else codegen.llvm_get_system_cpu())
        if mcpu and not codegen.llvm_is_valid_cpu(mcpu, triple or host_triple):
            raise UsageError(f"mcpu={mcpu!r} is not a CPU LLVM knows for {triple or host_triple}")
        mattr = _as_list(self.options.get("mattr"))
        facts: dict = {"machine": triple.split("-")[0] if cross else platform.machine()}
        target: dict = {"kind": "llvm", "num-cores": self.threads or os.cpu_count() or 1}
        if self.fast_math:  # LLVM may reorder float sums: row reductions (softmax, layer norm) vectorize
            target["fast-math-reassoc"] = True
        if triple:
            target["mtriple"] = triple
        if mcpu:
            target["mcpu"] = mcpu
        if not cross and "mattr" not in self.options:
            mattr = self._mask_missing_features(target)
        if mattr:
            target["mattr"] = mattr
        if cross:
            compiler = _cross_compiler(triple)
            facts["_export_compiler"] = compiler
            facts["cross_compiler"] = compiler
        else:
            import tvm

            enabled = codegen.llvm_get_cpu_features(tvm.target.Target(target))
            facts["cpu_features"] = {"required": sorted(f for f in CPUINFO_FEATURES.values() if f in enabled)}
        return target, facts

    @staticmethod
    def _mask_missing_features(target: dict) -> list[str]:
        import tvm
        from tvm.target import codegen

        flags = _cpu_flags()
        if flags is None:
            return []
        implied = codegen.llvm_get_cpu_features(tvm.target.Target(target))
        return [f"-{feature}" for flag, feature in CPUINFO_FEATURES.items() if feature in implied and flag not in flags]

    def check_available(self) -> None:
        super().check_available()
        triple = self.options.get("mtriple")
        if triple:
            from tvm.target import codegen

            if triple.split("-")[0] != codegen.llvm_get_system_triple().split("-")[0]:
                _cross_compiler(triple)
        elif shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("gcc") is None:
            raise MissingDependencyError("exporting a TVM library needs a C/C++ compiler (g++ or gcc) to link it")


def _cross_compiler(triple: str) -> str:
    for name in (f"{triple}-g++", f"{triple}-gcc"):
        if shutil.which(name):
            return name
    raise MissingDependencyError(
        f"cross-compiling for {triple} needs the {triple}-g++ (or -gcc) linker on PATH "
        f"(Debian/Ubuntu: apt-get install g++-{triple.replace('_', '-')})")


@register_target
class CudaTarget(TvmTarget):
    name = "cuda"
    summary = "TVM-compiled NVIDIA GPU library (.so, kernels built by nvcc); TVM and nvcc installed"

    def check_available(self) -> None:
        super().check_available()
        from . import build

        if build.nvcc_path() is None:
            raise MissingDependencyError("the cuda target needs nvcc (the CUDA toolkit) on PATH or in $CUDA_HOME/bin")

    def arch(self) -> str:
        arch = self.options.get("arch")
        if not arch:
            import tvm

            device = tvm.cuda(0)
            if not device.exist:
                raise UsageError("no GPU here to take the architecture from: give it with --arch sm_XX "
                                 "(arch='sm_XX' from Python), e.g. --arch sm_80 for A100, --arch sm_90 for H100")
            arch = "sm_" + device.compute_version.replace(".", "")
        arch = str(arch)
        if not arch.startswith("sm_") or not arch[3:].rstrip("af").isdigit():
            raise UsageError(f"--arch {arch}: expected sm_XX, e.g. --arch sm_90")
        return arch

    def tvm_target(self) -> tuple[dict, dict]:
        # The host side only runs the VM's shape code: keep it generic so the library loads on
        # any x86-64 (or given) CPU, unless mcpu/mattr say otherwise.
        host: dict = {"kind": "llvm"}
        if self.options.get("mcpu"):
            host["mcpu"] = self.options["mcpu"]
        if self.options.get("mattr"):
            host["mattr"] = _as_list(self.options["mattr"])
        return {"kind": "cuda", "arch": self.arch(), "host": host}, {"machine": platform.machine()}

    def build(self, mod, target):
        import tvm_ffi

        from . import build

        arch = str(target.attrs["arch"])
        built: dict[str, bytes] = {}

        # With a CUDA driver present TVM compiles the kernels itself through this callback;
        # without one it keeps the CUDA source, which we compile below. nvcc either way.
        def compile_cuda(code, *rest):
            built["source"] = str(code).encode()
            built["fatbin"] = build.nvcc_fatbin(str(code), arch)
            return bytearray(built["fatbin"])

        previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
        try:
            executable = build.build(mod, target)
        finally:
            if previous is not None:
                tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)
        if "fatbin" not in built:
            sources = [m.inspect_source("") for m in build.device_modules(executable, "cuda")]
            if not sources or not any(sources):
                raise CompileError("TVM produced no CUDA kernels for this model")
            built["source"] = sources[0].encode()
            built["fatbin"] = build.nvcc_fatbin(sources[0], arch)
        nvcc = build.nvcc_path()
        facts = {"cuda": {"arch": arch, "nvcc": build.nvcc_version(nvcc) if nvcc else "?",
                          "fatbin_bytes": len(built["fatbin"]), "kernels_source_bytes": len(built["source"])}}
        blobs = {"cuda_fatbin": built["fatbin"],
                 "cuda_source_sha256": hashlib.sha256(built["source"]).hexdigest().encode()}
        return executable, blobs, facts
