"""Relax module -> TVM executable: the pass list, default schedules, MetaSchedule tuning, and
the CUDA kernels compiled by nvcc.

    relax (from the ONNX frontend)
      -> DecomposeOpsForInference, CanonicalizeBindings     batch norm as arithmetic
      -> ConvertLayout(conv2d: NHWC/HWIO)                    llvm only: channels innermost
      -> zero pipeline: LegalizeOps, FoldConstant, FuseOps, FuseTIR
      -> [MetaSchedule: tune the tasks the database lacks, apply the database]
      -> default schedules for what is still unscheduled    dlight rules (ours for CPU)
      -> tvm.compile(target)                                 VM bytecode + kernels

Imported only after TVM is known to be importable.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from infoptc.errors import CompileError, MissingDependencyError
from tvm import relax
from tvm.s_tir import dlight as dl

from . import _tvm_schedule as rules

log = logging.getLogger("infoptc.backends.tvm")

# Conv layout for CPU code: output channels contiguous, so the vector axis of every conv
# (strided, depthwise or not) is a plain load/store and inputs are broadcast scalars.
CPU_CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


@dataclass
class BuildResult:
    executable: object
    tuning: dict | None = None
    kernels: dict = field(default_factory=dict)  # e.g. {"cuda_fatbin": bytes}
    facts: dict = field(default_factory=dict)


def cpu_schedule_pass():
    return dl.ApplyDefaultSchedule(rules.Contraction(), dl.cpu.GEMV(), dl.cpu.Reduction(), rules.Injective())


def gpu_schedule_pass():
    return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                   dl.gpu.GeneralReduction(), dl.gpu.Fallback())


def optimize(mod, target, *, cpu_layout: bool, schedules: str, tune: int = 0, tuning_db: str | None = None,
             tune_timeout_s: float = 30.0, fast_math: bool = False) -> tuple[object, dict | None]:
    """Relax graph passes, then tuning (optional), then default schedules."""
    is_cpu = target.kind.name == "llvm"
    first = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()]
    if is_cpu and cpu_layout:
        first.append(relax.transform.ConvertLayout(CPU_CONV_LAYOUT))
    if fast_math:
        first.append(relax.transform.FastMathTransform())
    with target:
        mod = tvm.transform.Sequential([*first, relax.get_pipeline("zero")])(mod)
    tuning = None
    if tune > 0:
        mod, tuning = tune_and_apply(mod, target, tune, tuning_db, tune_timeout_s)
    if schedules == "rules":
        with target:
            mod = (cpu_schedule_pass() if is_cpu else gpu_schedule_pass())(mod)
    return mod, tuning


@contextlib.contextmanager
def native_output_to_log():
    """TVM's C++ side logs warnings straight to file descriptor 2 (and MetaSchedule's worker
    processes inherit it): send them to a temp file and from there to our debug log."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip():
                    log.debug("tvm: %s", line.strip())


# ----------------------------------------------------------------------------- tuning


def check_tuning_dependencies() -> None:
    """MetaSchedule needs a known-good tvm-ffi and three Python packages."""
    import tvm_ffi

    from . import tvm as tvm_target

    version = getattr(tvm_ffi, "__version__", "?")
    if not version.startswith(tvm_target.TUNING_FFI_SERIES):
        raise MissingDependencyError(
            f"MetaSchedule tuning needs apache-tvm-ffi=={tvm_target.PINNED_FFI} (installed: {version}; "
            f"0.1.15.x crashes in tvm::ffi::ToJSONGraph while saving records): "
            f"pip install 'apache-tvm-ffi=={tvm_target.PINNED_FFI}'")
    missing = []
    for module in ("psutil", "cloudpickle", "xgboost"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingDependencyError(f"MetaSchedule tuning needs {', '.join(missing)}: pip install {' '.join(missing)}")


def tune_and_apply(mod, target, trials: int, db_dir: str | None, timeout_s: float):
    """Tune the tasks the database has no record for, then apply the database.

    A task counts as tuned once the database holds a record for it, so compiling the same
    model again with the same database runs no trial at all.
    """
    from tvm.s_tir import meta_schedule as ms

    check_tuning_dependencies()
    if not db_dir:
        raise CompileError("tune=N needs tuning_db=PATH (a folder that keeps the tuning records)")
    work_dir = Path(db_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    tasks = ms.relax_integration.extract_tasks(mod, target)
    todo = [t for t in tasks if database.query_tuning_record(t.dispatched[0], target, "main") is None]
    before = len(database)
    if todo:
        per_task = max(1, math.ceil(trials / len(todo)))
        quiet = io.StringIO()
        with _quiet_ms_logs(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                todo, work_dir=str(work_dir), num_threads=max(1, os.cpu_count() or 1))
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                max_trials_global=per_task * len(todo), max_trials_per_task=per_task,
                num_trials_per_iter=min(64, per_task),
                builder=ms.builder.LocalBuilder(timeout_sec=timeout_s, f_build=build_candidate),
                runner=ms.runner.LocalRunner(timeout_sec=timeout_s),
                database=database)
    with target, database:
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    still = [t.task_name for t in tasks if database.query_tuning_record(t.dispatched[0], target, "main") is None]
    facts = {
        "database": str(work_dir.resolve()),
        "trials_budget": trials,
        "tasks": len(tasks),
        "tasks_tuned_now": len(todo),
        "tasks_from_database": len(tasks) - len(todo),
        "records_added": len(database) - before,
        "tasks_without_record": still,
    }
    return mod, facts


def build_candidate(mod, target, _params):
    """MetaSchedule's default candidate build minus its ``import tvm.s_tir.tensor_intrin``, which
    parses every GPU intrinsic (20 s on a busy 2-core machine) in each fresh builder process,
    once per batch: longer than the build timeout, so no candidate ever got measured. The
    candidates arrive already scheduled (tensorized bodies inlined), so the build needs none."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


@contextlib.contextmanager
def _quiet_ms_logs():
    """MetaSchedule logs every round at INFO on its own handlers; keep ours quiet."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


# ----------------------------------------------------------------------------- compile


def build(mod, target) -> object:
    try:
        return tvm.compile(mod, target=target)
    except Exception as e:  # noqa: BLE001 - TVM raises many types; one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise CompileError(f"TVM failed to compile the model for {target.kind.name}: {first[:400]}") from None


def device_modules(executable, kind: str) -> list:
    """The imported modules of ``kind`` (e.g. "cuda") under the executable's host module."""
    found = []

    def walk(module):
        for sub in module.imports:
            if sub.kind == kind:
                found.append(sub)
            walk(sub)

    walk(executable.mod)
    return found


def nvcc_path() -> str | None:
    for candidate in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    line = [ln for ln in out.splitlines() if "release" in ln]
    return line[-1].strip() if line else out.strip().splitlines()[-1] if out.strip() else "?"


def nvcc_fatbin(source: str, arch: str) -> bytes:
    """Compile TVM's generated CUDA source with nvcc: SASS for ``arch`` plus its PTX, so newer
    GPUs can still JIT it."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise MissingDependencyError("the cuda target needs nvcc (the CUDA toolkit) on PATH or in $CUDA_HOME/bin")
    number = arch.removeprefix("sm_")
    with tempfile.TemporaryDirectory(prefix="infoptc-nvcc-") as tmp:
        src, out = Path(tmp, "kernels.cu"), Path(tmp, "kernels.fatbin")
        src.write_text(source)
        cmd = [nvcc, "--fatbin", "-O3", "-diag-suppress", "177,550",
               "-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()] or proc.stderr.splitlines()[-1:]
            raise CompileError(f"nvcc failed on TVM's CUDA kernels for {arch}: {' | '.join(errors[:3])[:500]}")
        return out.read_bytes()
