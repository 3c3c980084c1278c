"""Relax module -> TVM executable: the pass list, default schedules, MetaSchedule tuning, and
the CUDA kernels compiled by nvcc.

    relax (from the ONNX frontend)
      -> DecomposeOpsForInference, CanonicalizeBindings     batch norm as arithmetic
      -> int8 Q/DQ as arithmetic, ConvertLayout(conv2d: NHWC/HWIO), int8 kernels (int8.py)
                                                             llvm only: channels innermost
      -> ReadNarrowInputsInPlace, WinogradConv2d             llvm only
      -> bf16 kernels (bf16.py)                              llvm only
      -> FastMathTransform                                   when fast_math (llvm default)
      -> FoldConstant, PackWeights (packing.py)              llvm with the rules
      -> LegalizeOps: our conv2d (NCHW in, NHWC out), fast sigmoid
      -> zero pipeline: LegalizeOps, FoldConstant, FuseOps, FuseTIR
      -> [MetaSchedule: tune the tasks the database lacks, apply the database]
      -> default schedules for what is still unscheduled    dlight rules (ours for CPU)
      -> Relax build pipeline, accept_unaligned_inputs       llvm: kernels read inputs in place
      -> tvm.compile(target)                                 VM bytecode + kernels

Imported only after TVM is known to be importable.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from infoptc.errors import CompileError, MissingDependencyError
from tvm import relax
from tvm.s_tir import dlight as dl

from . import bf16, int8, packing, winograd
from . import schedule as rules
from .prepare import bound_value, op_name, relax_pass, tensor_dims
from .runtime import PINNED_FFI, TUNING_FFI_SERIES, compile_error, error_line, size_thread_pool

log = logging.getLogger("infoptc.backends.tvm")

# Conv layout for CPU code: output channels contiguous, so the vector axis of every conv
# (strided, depthwise or not) is a plain load/store and inputs are broadcast scalars.
# conv2d_transpose stays NCHW, with transposes around it: left to ConvertLayout it follows its
# input into NHWC, which TVM cannot lower ("CodeGenVM cannot emit ... conv2d_transpose":
# PP-OCRv4's text detector upsamples with two of them).
CPU_CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"], "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}

# A tuned kernel replaces the rules' only when it is this much faster: timing noise on a shared
# machine is a few percent, and a coin toss should keep the schedule that needs no database.
TUNED_MARGIN = 1.03
KERNEL_MIN_MS = 10  # each timing of a kernel repeats it for at least this long
CHOICES_FILE = "infoptc_choices.json"  # beside MetaSchedule's files in the tuning folder
CHOICES_FORMAT = "infoptc-schedule-choices/1"


@dataclass
class BuildResult:
    executable: object
    tuning: dict | None = None
    kernels: dict = field(default_factory=dict)  # e.g. {"cuda_fatbin": bytes}
    facts: dict = field(default_factory=dict)


def cpu_schedule_pass():
    return dl.ApplyDefaultSchedule(int8.Int8Contraction(), bf16.Dot(), winograd.Transform(), rules.Contraction(),
                                   rules.GEMV(), rules.Reduction(), rules.Injective())


def gpu_schedule_pass():
    return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                   dl.gpu.GeneralReduction(), dl.gpu.Fallback())


@dataclass
class TuningBudget:
    """What one compile may spend on MetaSchedule, and where the records live."""

    db_dir: str
    trials: int = 0  # 0: no limit on trials
    seconds: float | None = None  # None: no limit on time
    timeout_s: float = 30.0  # to build or to run one candidate
    progress_to: object = None  # the terminal's stderr, for the progress bar; None: no bar

    def __post_init__(self):
        if not self.trials and not self.seconds:
            raise ValueError("a tuning budget needs trials or seconds (or both)")


def optimize(mod, target, *, cpu_layout: bool, schedules: str, tuning: TuningBudget | None = None,
             fast_math: bool = False, pack_weights: bool = True) -> tuple[object, dict | None]:
    """Relax graph passes, then tuning (optional), then default schedules."""
    is_cpu = target.kind.name == "llvm"
    first = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()]
    if is_cpu and cpu_layout:
        lanes = rules.vector_lanes(target)
        first += [int8.decompose_qdq_pass(), relax.transform.ConvertLayout(CPU_CONV_LAYOUT),
                  int8.rewrite_pass(target), read_narrow_inputs_in_place(lanes),
                  winograd.rewrite_pass(lanes)]
    if is_cpu:  # bf16 matmuls and convs: AVX512_BF16 kernels, or at least fp32 accumulation
        first.append(bf16.rewrite_pass(target))
    packs = is_cpu and pack_weights and schedules == "rules"
    if is_cpu and (cpu_layout or packs):  # weights and biases behind layout transposes become constants;
        first.append(relax.transform.FoldConstant())  # after the bf16 rewrite, which matches unfolded ones
    if is_cpu and cpu_layout:
        first.append(int8.fold_requantization_pass())
    if fast_math:  # on Relax ops: before anything legalizes them
        first.append(relax.transform.FastMathTransform())
    if packs:  # constant weights packed in the rules' column strips
        first.append(packing.pack_weights_pass(target))
    legalize = {}  # before the zero pipeline's LegalizeOps, which then finds these ops done
    if is_cpu and cpu_layout:  # our NCHW-in, NHWC-out conv
        legalize["relax.nn.conv2d"] = legalize_conv2d
    if is_cpu and fast_math:
        legalize["relax.sigmoid"] = legalize_sigmoid
    if legalize:
        first.append(relax.transform.LegalizeOps(legalize))
    with target:
        mod = tvm.transform.Sequential([*first, relax.get_pipeline("zero")])(mod)
    facts = None
    if tuning is not None:
        mod, facts = tune_and_apply(mod, target, tuning, schedules)
    if schedules == "rules":
        with target:
            mod = (cpu_schedule_pass() if is_cpu else gpu_schedule_pass())(mod)
    return mod, facts


def read_narrow_inputs_in_place(lanes: int):
    """A pass: ``conv2d(permute_dims(x, NCHW->NHWC))`` whose ``x`` has fewer channels than a
    vector holds (an RGB image) reads ``x`` where it is and still writes NHWC. With 3 channels
    innermost, neither the transpose nor the pad before the conv can use vectors (ResNet's
    224x224 stem: 7 us to transpose, 15 us to pad); in NCHW the pad copies whole rows (7 us)."""

    @relax.expr_functor.mutator
    class InPlace(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if op_name(call) != "relax.nn.conv2d":
                return call
            attrs = call.attrs
            source = bound_value(self, call.args[0])
            if op_name(source) != "relax.permute_dims" or source.attrs.axes is None \
                    or [int(a) for a in source.attrs.axes] != [0, 2, 3, 1]:
                return call
            dims = tensor_dims(source.args[0])
            channels = dims[1] if dims is not None and len(dims) == 4 else None
            if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "HWIO", "NHWC") \
                    or int(attrs.groups) != 1 or channels is None or channels >= lanes:
                return call
            return relax.op.nn.conv2d(source.args[0], call.args[1], attrs.strides, attrs.padding, attrs.dilation,
                                      1, "NCHW", "HWIO", "NHWC", attrs.out_dtype)

    return relax_pass("ReadNarrowInputsInPlace", InPlace)


def legalize_conv2d(bb, call):
    """TOPI's conv2d needs one layout in and out; the NCHW-in, NHWC-out conv of
    ``read_narrow_inputs_in_place`` gets its own compute. Every other conv2d: TOPI's."""
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "HWIO", "NHWC"):
        return _nn_conv2d(bb, call)
    out_dtype = attrs.out_dtype if str(attrs.out_dtype) not in ("", "None", "void") else call.args[0].ty.dtype
    return bb.call_te(conv2d_nchw_to_nhwc, call.args[0], call.args[1], [int(v) for v in attrs.strides],
                      [int(v) for v in attrs.padding], [int(v) for v in attrs.dilation], str(out_dtype),
                      primfunc_name_hint="conv2d")


def legalize_sigmoid(bb, call):
    """fp32 ``sigmoid(x)`` as ``1 / (1 + fast_exp(-x))``: FastMathTransform has no fast sigmoid,
    and TOPI's calls the C library's ``expf`` once per element, which LLVM cannot vectorize.
    EfficientNet's swish and squeeze-excitation gates run one per activation: its 112x112x32
    depthwise conv spent most of its 2.7 ms there. ``fast_exp`` clamps its argument to
    [-88.4, 88.4], so the gate stays in [0, 1] (6e-39 at the low end, not 0)."""
    from tvm import topi
    from tvm.relax.transform.legalize_ops.common import _call_topi_without_attr

    x = call.args[0]
    if x.ty.dtype != "float32":
        return _call_topi_without_attr(topi.sigmoid)(bb, call)
    return bb.call_te(_fast_sigmoid, x, primfunc_name_hint="fast_sigmoid")


def _fast_sigmoid(t):
    from tvm import topi

    one = topi.full_like(t, 1.0)
    return topi.divide(one, topi.add(one, topi.fast_exp(topi.negative(t))))


def conv2d_nchw_to_nhwc(data, kernel, strides, padding, dilation, out_dtype):
    """``out[n, y, x, f] = sum(pad(data)[n, c, y*sh + ky*dh, x*sw + kx*dw] * kernel[ky, kx, c, f])``."""
    from tvm import te, topi

    top, left, bottom, right = padding
    (sh, sw), (dh, dw) = strides, dilation
    batch, _, height, width = data.shape
    kh, kw, channels, features = kernel.shape
    padded = topi.nn.pad(data, [0, 0, top, left], [0, 0, bottom, right], name="pad_temp")
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    ky, kx = te.reduce_axis((0, kh), "ky"), te.reduce_axis((0, kw), "kx")
    c = te.reduce_axis((0, channels), "c")
    return te.compute(
        (batch, out_h, out_w, features),
        lambda n, y, x, f: te.sum(padded[n, c, y * sh + ky * dh, x * sw + kx * dw].astype(out_dtype)
                                  * kernel[ky, kx, c, f].astype(out_dtype), axis=[c, ky, kx]),
        name="conv2d_nhwc")


# ----------------------------------------------------------------------------- tuning


def check_tuning_dependencies() -> None:
    """MetaSchedule needs a known-good tvm-ffi and three Python packages."""
    import tvm_ffi


    version = getattr(tvm_ffi, "__version__", "?")
    if not version.startswith(TUNING_FFI_SERIES):
        raise MissingDependencyError(
            f"MetaSchedule tuning needs apache-tvm-ffi=={PINNED_FFI} (installed: {version}; "
            f"0.1.15.x crashes in tvm::ffi::ToJSONGraph while saving records): "
            f"pip install 'apache-tvm-ffi=={PINNED_FFI}'")
    missing = []
    for module in ("psutil", "cloudpickle", "xgboost"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingDependencyError(f"MetaSchedule tuning needs {', '.join(missing)}: pip install {' '.join(missing)}")


def tune_and_apply(mod, target, budget: TuningBudget, schedules: str):
    """Tune the tasks the database has no record for, then apply the database: on llvm with the
    rules as default schedules, only the tuned kernels that beat the rules (``choose_schedules``).

    A task counts as tuned once the database holds a record for it, so compiling the same
    model again with the same database runs no trial at all. The time budget counts from here,
    so it covers MetaSchedule's fixed start-up cost too.
    """
    from tvm.s_tir import meta_schedule as ms

    start = time.monotonic()
    check_tuning_dependencies()
    work_dir = target_folder(Path(budget.db_dir), target)
    database = open_database(work_dir)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    todo = [t for t in tasks if database.query_tuning_record(t.dispatched[0], target, "main") is None]
    before = len(database)
    facts = {
        "database": str(work_dir.resolve()),
        "trials_budget": budget.trials or None,
        "time_budget_s": budget.seconds,
        "tasks": len(tasks),
        "tasks_tuned_now": len(todo),
        "tasks_from_database": len(tasks) - len(todo),
        "trials_run": 0,
    }
    with progress_bar(budget.progress_to) as bar:
        if todo:
            facts["trials_run"] = run_tuning(todo, target, database, budget, start, bar)
        facts["tuning_seconds"] = round(time.monotonic() - start, 1)
        facts["records_added"] = len(database) - before
        facts["tasks_without_record"] = [t.task_name for t in tasks
                                         if database.query_tuning_record(t.dispatched[0], target, "main") is None]
        if target.kind.name == "llvm" and schedules == "rules":
            database, choice = choose_schedules(tasks, target, database, work_dir, bar)
            facts.update(choice)
    with target, database:
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    return mod, facts


TARGET_FILE = "target.json"  # in each target's folder of a tuning database


def target_folder(db_dir: Path, target) -> Path:
    """The folder of ``db_dir`` that holds this target's records (and schedule choices).

    Records and timings are only meaningful for the CPU (or GPU) and target options they were
    made on, so each target gets its own folder, named by its CPU and a hash of the whole
    target. A database made on another machine is then never applied here: its folders are
    left as they are, with a warning naming them."""
    spec = json.dumps(_target_json(target), sort_keys=True)
    cpu = str(target.attrs.get("mcpu") or target.attrs.get("arch") or target.kind.name)
    folder = db_dir / f"{cpu}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    others = sorted(p.parent.name for p in db_dir.glob("*/" + TARGET_FILE) if p.parent != folder) if db_dir.is_dir() else []
    loose = sorted(p.name for p in db_dir.glob("database_*.json")) if db_dir.is_dir() else []
    if others or loose:
        log.warning("tuning database %s: records for other targets ignored (%s); this build's are in %s",
                    db_dir, ", ".join(others + loose), folder.name)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / TARGET_FILE).exists():
        from infoptc.ir import write_atomic

        write_atomic(folder / TARGET_FILE, (spec + "\n").encode())
    return folder


def _target_json(target) -> dict:
    exported = target.export()
    return json.loads(json.dumps(exported, default=str))


def open_database(work_dir: Path):
    """MetaSchedule's JSON database in ``work_dir``. Files it cannot read (truncated by a killed
    compile, or not MetaSchedule's) are renamed ``*.unreadable`` with a warning and tuning starts
    over, rather than the compile failing on a cache."""
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.database.JSONDatabase(work_dir=str(work_dir))
    except Exception as e:  # noqa: BLE001 - TVM raises its own errors for a bad record
        first = error_line(e)
        for path in work_dir.glob("database_*.json"):
            path.replace(path.with_name(path.name + ".unreadable"))
        log.warning("tuning database %s is unreadable (%s): set aside as *.unreadable, tuning again", work_dir,
                    first[:200])
        return ms.database.JSONDatabase(work_dir=str(work_dir))


def database_dir(database) -> Path:
    return Path(database.path_workload).parent


def run_tuning(tasks, target, database, budget: TuningBudget, start: float, bar) -> int:
    """MetaSchedule over ``tasks`` until the trials or the time run out; returns the trials run.

    With a time budget, batches are smaller (16 candidates, not 64): the deadline is checked
    between batches, so smaller ones stop closer to it.
    """
    from tvm.s_tir import meta_schedule as ms

    per_task = math.ceil(budget.trials / len(tasks)) if budget.trials else None
    batch = min(16 if budget.seconds else 64, per_task or 64)
    deadline = start + budget.seconds if budget.seconds else math.inf
    progress = tuning_counter(bar, budget, start)
    quiet = io.StringIO()
    with _quiet_ms_logs(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), \
            every_second(progress.tick):
        ms.tune.tune_tasks(
            tasks=tune_contexts(tasks), task_weights=[t.weight for t in tasks], work_dir=str(database_dir(database)),
            max_trials_global=per_task * len(tasks) if per_task else 2**31 - 1, max_trials_per_task=per_task,
            num_trials_per_iter=batch,
            builder=ms.builder.LocalBuilder(timeout_sec=budget.timeout_s, f_build=build_candidate),
            runner=ms.runner.LocalRunner(timeout_sec=budget.timeout_s,
                                         initializer=functools.partial(runner_threads, thread_count(target))),
            database=database, measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress],
            task_scheduler=deadline_scheduler(deadline))
    return progress.trials


def tune_contexts(tasks) -> list:
    """MetaSchedule's tune contexts for ``tasks``, logging to a logger under its own, which
    ``_quiet_ms_logs`` keeps at warnings. Its helper ``extracted_tasks_to_tune_contexts``
    configures logging process-wide instead: a log file per task in the tuning folder, a console
    handler on whatever stdout is at the time, and on a second call in one process an
    AttributeError when that logger has an unnamed handler (pytest's log capture adds two)."""
    from tvm.s_tir import meta_schedule as ms

    logger = logging.getLogger("tvm.s_tir.meta_schedule.infoptc")
    return [ms.TuneContext(mod=t.dispatched[0], target=t.target, space_generator="post-order-apply",
                           search_strategy="evolutionary", task_name=t.task_name, logger=logger,
                           num_threads=max(1, os.cpu_count() or 1)).clone()
            for t in tasks]


def runner_threads(count: int) -> None:
    """In each MetaSchedule runner process, before its first kernel: TVM's pool defaults to half
    the logical CPUs on x86 (one thread on a 2-core VM), so candidates were timed on fewer
    threads than the artifact runs with, and the search favoured schedules for the wrong machine."""
    os.environ["TVM_NUM_THREADS"] = str(count)


def thread_count(target) -> int:
    """The runtime threads the kernels of ``target`` are built for (its ``num-cores``)."""
    return int(target.attrs.get("num-cores", 0)) or os.cpu_count() or 1


def deadline_scheduler(deadline: float):
    """A MetaSchedule task scheduler that stops handing out tasks when the time is spent:
    MetaSchedule itself only knows trial budgets.

    A batch starts only if the batches so far say it will end by ``deadline`` (monotonic
    seconds), so the budget holds to within the spread of batch times. Every task gets one
    batch first, heaviest (weight x FLOP) first, so all have a record if time allows and a
    second compile has nothing left to tune; after that, the task whose share of the batches
    lags its share of the work most. A batch is joined before the next task is chosen (no
    overlap on a small machine), so stopping leaves nothing running.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

    @derived_object
    class DeadlineScheduler(PyTaskScheduler):
        def __init__(self):
            super().__init__()
            self.batches: dict[int, int] = {}
            self.batch_seconds: list[float] = []
            self.last: int | None = None
            self.sent = 0.0

        def next_task_id(self) -> int:
            scheduler = self._outer()
            records = scheduler.tasks_
            if self.last is not None and records[self.last].runner_futures is not None:
                scheduler.join_running_task(self.last)
                self.batch_seconds.append(time.monotonic() - self.sent)
            alive = [i for i, r in enumerate(records) if not r.is_terminated]
            expected = statistics.mean(self.batch_seconds) if self.batch_seconds else 0.0
            if not alive or time.monotonic() + expected > deadline:
                self.last = None
                return -1
            work = {i: records[i].task_weight * records[i].flop for i in alive}
            self.last = min(alive, key=lambda i: (self.batches.get(i, 0) / work[i], -work[i]))
            self.batches[self.last] = self.batches.get(self.last, 0) + 1
            self.sent = time.monotonic()
            return self.last

    return DeadlineScheduler()


def tuning_counter(bar, budget: TuningBudget, start: float):
    """A MetaSchedule measure callback that counts the trials and moves the progress bar: the
    share of the budget spent, trials or time, whichever is further along."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class TuningCounter(PyMeasureCallback):
        def __init__(self):
            super().__init__()
            self.trials = 0
            self.row = bar.add_task("tuning: 0 trials", total=1.0)

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            self.trials += len(measure_candidates)
            self.tick()

        def tick(self) -> None:
            spent = [self.trials / budget.trials] if budget.trials else []
            if budget.seconds:
                spent.append((time.monotonic() - start) / budget.seconds)
            bar.update(self.row, completed=min(1.0, max(spent, default=0.0)), description=f"tuning: {self.trials} trials")

    return TuningCounter()


@contextlib.contextmanager
def every_second(tick):
    """Call ``tick`` every second meanwhile: MetaSchedule's start-up and each batch take many
    seconds without a callback, and the time budget's share of the bar should move meanwhile."""
    stop = threading.Event()

    def loop():
        while not stop.wait(1.0):
            tick()

    thread = threading.Thread(target=loop, name="infoptc-tuning-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ----------------------------------------------------------------------------- tuned or rules


def choose_schedules(tasks, target, database, work_dir: Path, bar):
    """A database of the tuned schedules that beat the rules, and facts about the choice.

    MetaSchedule's best after a small budget is often slower than the rules, and applying a
    database replaces the rules for every task it has a record for. So each such task is built
    both ways and timed here, on this CPU with the artifact's threads, and the tuned schedule is
    kept only where it is faster by TUNED_MARGIN. The choice is saved beside the database, keyed
    by workload and target, with the hashes of both kernels: the next compile reuses it without
    timing anything, unless either kernel changed (a better record, other rules).
    """
    from tvm.s_tir import meta_schedule as ms

    path = work_dir / CHOICES_FILE
    saved = load_choices(path)
    chosen = ms.database.MemoryDatabase()
    found = [(t, r) for t in tasks if (r := database.query_tuning_record(t.dispatched[0], target, "main")) is not None]
    row = bar.add_task("tuned vs rules", total=len(found))
    choices, timed = {}, 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="infoptc-timer") as timer:
        for task, record in found:
            workload = task.dispatched[0]
            kernels = {"rules": rule_scheduled(workload, target), "tuned": database.query_schedule(workload, target, "main").mod}
            stamp = {f"{name}_kernel": structural_key(kernel) for name, kernel in kernels.items()}
            key = f"{structural_key(workload)} {target}"
            choice = saved.get(key)
            if choice is None or any(choice.get(k) != v for k, v in stamp.items()):
                rules_ms, tuned_ms = timer.submit(time_kernels, list(kernels.values()), target).result()
                choice = saved[key] = {"task": task.task_name, "rules_ms": rules_ms, "tuned_ms": tuned_ms,
                                       "use": "tuned" if tuned_ms * TUNED_MARGIN <= rules_ms else "rules", **stamp}
                timed += 1
            choices[task.task_name] = choice
            if choice["use"] == "tuned":
                chosen.commit_tuning_record(ms.database.TuningRecord(
                    record.trace, chosen.commit_workload(workload), record.run_secs, target, record.args_info))
            bar.advance(row)
    if timed:
        save_choices(path, saved)
    tuned = sum(c["use"] == "tuned" for c in choices.values())
    return chosen, {
        "tasks_using_tuned": tuned,
        "tasks_using_rules": len(tasks) - tuned,
        "kernels_timed_now": timed,
        "tuned_vs_rules": {name: {"rules_ms": float(f"{c['rules_ms']:.3g}"), "tuned_ms": float(f"{c['tuned_ms']:.3g}"),
                                  "speedup": round(c["rules_ms"] / c["tuned_ms"], 2), "use": c["use"]}
                           for name, c in choices.items()},
    }


def rule_scheduled(workload, target):
    """One task's kernel as the default rules schedule it (what runs when no record applies).
    On a copy: dlight's ApplyDefaultSchedule updates the module it is given in place, and the
    task's module must stay unscheduled to find its records."""
    copy = tvm.IRModule(dict(workload.functions_items()), attrs=workload.attrs)
    with target:
        return cpu_schedule_pass()(copy)


def structural_key(mod) -> str:
    import tvm_ffi

    return format(tvm_ffi.structural_hash(mod), "016x")


def time_kernels(kernels: list, target, repeats: int = 7) -> list[float]:
    """Median milliseconds of each kernel (TIR modules with one signature), timed in turns so a
    neighbour's load hits all alike, on the thread count the artifact uses. Run it in a thread
    of its own: TVM's pool belongs to the calling thread, which this resizes."""

    size_thread_pool(thread_count(target))
    device = tvm.cpu(0)
    built = [tvm.compile(kernel, target=target).jit() for kernel in kernels]
    args = random_arguments(kernels[0]["main"], device)
    timers = [module.time_evaluator("main", device, repeat=1, min_repeat_ms=KERNEL_MIN_MS) for module in built]
    samples: list[list[float]] = [[] for _ in kernels]
    for _ in range(repeats):
        for evaluate, out in zip(timers, samples):
            out.append(evaluate(*args).mean * 1e3)
    return [float(statistics.median(s)) for s in samples]


def time_models(executables: list, specs: list[dict], threads: int, rounds: int = 7) -> list[float]:
    """Median milliseconds of a whole-model run of each executable (same random inputs), in
    turns of about 50 ms each after a few untimed runs. Run it in a thread of its own, as
    ``time_kernels``."""
    from infoptc.bench import run_interleaved


    size_thread_pool(threads)
    device = tvm.cpu(0)
    args = random_tensors([(spec["shape"], spec["dtype"]) for spec in specs], device)
    machines = [relax.VirtualMachine(executable, device)["main"] for executable in executables]
    runners = [functools.partial(machine, *args) for machine in machines]
    for run in runners:
        run()
    once = time.perf_counter()
    runners[0]()
    block = max(1, min(200, int(0.05 / max(time.perf_counter() - once, 1e-6))))
    samples = run_interleaved(runners, iterations=rounds, settle=0.01, wake=3, block=block)
    return [float(statistics.median(s)) * 1e3 for s in samples]


def random_arguments(func, device) -> list:
    """Inputs for one kernel (``random_tensors`` of its parameters)."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    return random_tensors([([int(d) for d in info.shape], str(info.dtype)) for info in ArgInfo.from_prim_func(func)],
                          device)


def random_tensors(shapes_and_dtypes, device) -> list:
    """TVM tensors for timing: normal floats, zero integers (always valid as indices); seeded."""
    rng = np.random.default_rng(0)
    return [tvm.runtime.tensor(rng.standard_normal(shape).astype(dtype) if dtype.startswith("float")
                               else np.zeros(shape, dtype), device)
            for shape, dtype in shapes_and_dtypes]


def load_choices(path: Path) -> dict:
    """The saved choices, or none if the file is missing or not ours (it is only a cache)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("choices", {}) if data.get("format") == CHOICES_FORMAT else {}


def save_choices(path: Path, choices: dict) -> None:
    from infoptc.ir import write_atomic

    write_atomic(path, json.dumps({"format": CHOICES_FORMAT, "choices": choices}, indent=1, sort_keys=True).encode())


def build_candidate(mod, target, _params):
    """MetaSchedule's default candidate build minus its ``import tvm.s_tir.tensor_intrin``, which
    parses every GPU intrinsic (20 s on a busy 2-core machine) in each fresh builder process,
    once per batch: longer than the build timeout, so no candidate ever got measured. The
    candidates arrive already scheduled (tensorized bodies inlined), so the build needs none."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def progress_bar(stream):
    """Rich progress bars with an ETA on ``stream``; silent unless it is a terminal and logging is
    not quieted (``-q`` sets the ``infoptc`` logger to errors only)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(file=stream, highlight=False) if stream is not None else None
    quiet = not logging.getLogger("infoptc").isEnabledFor(logging.WARNING)
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
                    disable=console is None or not console.is_terminal or quiet)


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
        if target.kind.name != "llvm":
            return tvm.compile(mod, target=target)
        with target:
            mod = relax.get_pipeline("default")(mod)
        return tvm.compile(accept_unaligned_inputs(mod), target=target, relax_pipeline=None)
    except Exception as e:  # noqa: BLE001 - TVM raises many types; one line for the user
        raise compile_error(target.kind.name, e) from None


def accept_unaligned_inputs(mod):
    """Kernels that read a model input directly (or a view of one) no longer assume its data
    starts on 64 bytes, TVM's default for every buffer, only on its element size.

    A caller's array is rarely 64-byte aligned (numpy's large arrays start 16 bytes into a page),
    and an aligned vector load from it faults (the MLP's first dense). Without this, every call
    copied each input into an aligned buffer (ResNet's 600 KB input: 16 us a run). Only those
    kernel parameters change: on x86 and AArch64 an unaligned vector load of aligned data costs
    the same, and the kernels' own buffers keep the assumption. Runs on the module after Relax's
    build pipeline, where each kernel call names its arguments in the kernel's parameter order."""
    import tvm_ffi

    kernels = {gv for gv, func in mod.functions_items() if isinstance(func, tvm.tirx.PrimFunc)}
    unaligned: dict = {}  # kernel -> indices of parameters that may receive an input

    def mark(kernel, index):
        unaligned.setdefault(kernel, set()).add(index)

    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        inputs = set(func.params)  # and every value that may be a view of one

        def visit(body):
            for block in body.blocks:
                for binding in block.bindings:
                    value = binding.value
                    if isinstance(value, relax.If):
                        visit(value.true_branch)
                        visit(value.false_branch)
                        used = [value.true_branch.body, value.false_branch.body]
                    elif isinstance(value, relax.Call) and value.op in kernels:
                        for index, arg in enumerate(value.args):
                            if arg in inputs:
                                mark(value.op, index)
                        continue
                    else:
                        used = _relax_leaves(value)
                    if not any(v in inputs for v in used):
                        continue
                    inputs.add(binding.var)  # a reshape view, a cast binding, a tuple of inputs...
                    for gv in set(used) & kernels:  # a kernel called some other way: every parameter
                        for index in range(len(mod[gv].params)):
                            mark(gv, index)

        visit(func.body)
    for gv, indices in unaligned.items():
        func = mod[gv]
        replace = {}
        for index in indices:
            old = func.params[index]
            if not tvm.tirx.buffer.is_buffer_var(old):
                continue
            replace[old] = tvm.tirx.decl_buffer(old.shape, old.dtype, old.name, strides=old.strides,
                                                elem_offset=old.elem_offset, scope=old.scope(),
                                                data_alignment=max(1, tvm.DataType(old.dtype).bits // 8),
                                                offset_factor=old.offset_factor)
        if replace:
            mod[gv] = tvm_ffi.structural_map(func, (tvm.tirx.Var, lambda v: replace.get(v, v)), order="post")
    return mod


def _relax_leaves(value) -> list:
    """The variables and global functions a binding's value names, looking into calls and tuples."""
    found = []

    def walk(expr):
        if isinstance(expr, (relax.Var, tvm.ir.GlobalVar)):
            found.append(expr)
        elif isinstance(expr, relax.Call):
            walk(expr.op)
            for arg in expr.args:
                walk(arg)
        elif isinstance(expr, relax.Tuple):
            for field_ in expr.fields:
                walk(field_)
        elif isinstance(expr, relax.TupleGetItem):
            walk(expr.tuple_value)

    walk(value)
    return found


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
