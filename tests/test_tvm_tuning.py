"""Tuning on the llvm target (backends/tvm/build.py): tuned kernels only where they beat the
rules, the choice saved beside the database and reused, and the time budget.

The fast tests stand in for MetaSchedule (``run_tuning``) with records of each kernel's
unscheduled loop nest (one thread, scalar): real records, real timings, no search. The slow
ones run MetaSchedule; they are skipped unless asked for with ``-m slow``.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import onnx
import pytest

tvm = pytest.importorskip("tvm")
for _module in ("psutil", "cloudpickle", "xgboost"):  # MetaSchedule's own needs: pip install -e ".[tvm-tune]"
    pytest.importorskip(_module)

import infoptc
from infoptc.backends.tvm import build as _tvm_build
from infoptc.errors import UsageError
from infoptc.verify import OrtRunner, Tolerance, compare_outputs, random_inputs

TOL = Tolerance(atol=1e-4, rtol=1e-4)
SHAPES = {"x": (8, 64)}
# The MLP's first layer (8x64 @ 64x16, ReLU): its loop nest runs ~20x slower than the rules'.
FIRST_LAYER = "fused_matmul_add_relu"


def _check_against_ort(artifact, model_path) -> None:
    feeds = random_inputs(artifact.model, seed=3)
    expected = OrtRunner(onnx.load(model_path)).run(feeds)
    diffs = compare_outputs(expected, artifact.run(feeds), tolerances={k: TOL for k in expected})
    assert all(d.ok for d in diffs), [d.describe() for d in diffs if not d.ok]


def _loop_nest_records(tasks, target, database, budget, start, bar) -> int:
    """Stands in for ``run_tuning``: each task's only record is its unscheduled loop nest (the
    trace needs one instruction to count as a record; looking a block up changes nothing)."""
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.database import TuningRecord

    for task in tasks:
        workload = task.dispatched[0]
        schedule = Schedule(workload)
        schedule.get_sblock("root")
        database.commit_tuning_record(TuningRecord(schedule.trace, database.commit_workload(workload), [1e-9],
                                                   target, ArgInfo.from_prim_func(workload["main"])))
    return len(tasks)


def _refuse(*args, **kwargs):
    raise AssertionError("called on a compile that should reuse the database and the saved choices")


@pytest.fixture
def fake_tuning(monkeypatch):
    monkeypatch.setattr(_tvm_build, "run_tuning", _loop_nest_records)


def _compile(golden, db, **options):
    return infoptc.compile(golden("mlp"), target="llvm", input_shapes=SHAPES, tune=1, tuning_db=str(db), **options)


def test_rules_kept_where_the_tuned_kernel_is_slower(golden, tmp_path, fake_tuning):
    artifact = _compile(golden, tmp_path / "db")
    tuning = artifact.describe()["tuning"]
    first = tuning["tuned_vs_rules"][FIRST_LAYER]
    assert first["use"] == "rules" and first["speedup"] < 0.5, first  # real timings, ~0.05 here
    for row in tuning["tuned_vs_rules"].values():  # each choice follows its own timings
        assert row["use"] == ("tuned" if row["tuned_ms"] * _tvm_build.TUNED_MARGIN <= row["rules_ms"] else "rules")
    assert tuning["tasks_using_tuned"] + tuning["tasks_using_rules"] == tuning["tasks"] == 3
    assert tuning["kernels_timed_now"] == 3
    _check_against_ort(artifact, golden("mlp"))


def _kernels(db, golden, monkeypatch, timings):
    """The scheduled kernels of the MLP after tuning (faked) with ``timings`` as the timer."""
    from infoptc.backends.tvm import prepare as _tvm_prepare
    from tvm import tirx

    monkeypatch.setattr(_tvm_build, "time_kernels", lambda kernels, target: list(timings))
    prepared = _tvm_prepare.prepare(infoptc.optimize(golden("mlp"), input_shapes=SHAPES))
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    mod, facts = _tvm_build.optimize(_tvm_prepare.import_onnx(prepared.model), target, cpu_layout=True,
                                     schedules="rules", tuning=_tvm_build.TuningBudget(db_dir=str(db), trials=1))
    return {gv.name_hint: f.script() for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}, facts


def test_the_choice_follows_the_timer(golden, tmp_path, monkeypatch, fake_tuning):
    """With the timer saying "tuned is slower", every kernel keeps the rules (vector loops);
    saying "faster", every kernel is the database's scalar loop nest."""
    kernels, facts = _kernels(tmp_path / "slower", golden, monkeypatch, timings=(1.0, 1.02))  # within the margin
    assert facts["tasks_using_tuned"] == 0 and all("T.vectorized" in k for k in kernels.values())
    kernels, facts = _kernels(tmp_path / "faster", golden, monkeypatch, timings=(1.0, 0.5))
    assert facts["tasks_using_tuned"] == 3 and not any("T.vectorized" in k for k in kernels.values())
    assert {row["speedup"] for row in facts["tuned_vs_rules"].values()} == {2.0}


def _target_dir(db):
    """The one target folder a database holds after compiles for this CPU."""
    (folder,) = [p.parent for p in db.glob("*/" + _tvm_build.TARGET_FILE)]
    return folder


def test_a_database_from_another_cpu_is_ignored_with_a_warning(golden, tmp_path, fake_tuning, caplog):
    """Records and choices live in one folder per target (CPU and options): a database tuned
    for another CPU (here haswell's, AVX2) is not applied to this one, and the log says so."""
    db = tmp_path / "db"
    other = _compile(golden, db, mcpu="haswell").describe()["tuning"]
    assert other["tasks_tuned_now"] > 0
    with caplog.at_level(logging.WARNING, logger="infoptc.backends.tvm"):
        artifact = _compile(golden, db)
    here = artifact.describe()["tuning"]
    assert here["tasks_tuned_now"] == here["tasks"] > 0  # nothing taken from haswell's records
    assert "records for other targets ignored (haswell-" in caplog.text
    assert len(list(db.glob("*/" + _tvm_build.TARGET_FILE))) == 2
    _check_against_ort(artifact, golden("mlp"))


def test_an_unreadable_database_is_set_aside_with_a_warning(golden, tmp_path, fake_tuning, caplog):
    """A truncated record file (a compile killed while saving) is renamed *.unreadable and the
    compile tunes again, instead of failing on its cache."""
    db = tmp_path / "db"
    _compile(golden, db)
    records = _target_dir(db) / "database_tuning_record.json"
    records.write_text(records.read_text()[:25])
    with caplog.at_level(logging.WARNING, logger="infoptc.backends.tvm"):
        artifact = _compile(golden, db)
    assert "is unreadable" in caplog.text
    assert (records.parent / (records.name + ".unreadable")).exists()
    assert artifact.describe()["tuning"]["tasks_tuned_now"] > 0
    _check_against_ort(artifact, golden("mlp"))


def test_second_compile_reuses_the_choice_without_tuning_or_timing(golden, tmp_path, monkeypatch, fake_tuning):
    db = tmp_path / "db"
    first = _compile(golden, db).describe()["tuning"]
    saved = json.loads((_target_dir(db) / _tvm_build.CHOICES_FILE).read_text())
    assert saved["format"] == _tvm_build.CHOICES_FORMAT
    assert sorted(c["task"] for c in saved["choices"].values()) == sorted(first["tuned_vs_rules"])
    monkeypatch.setattr(_tvm_build, "run_tuning", _refuse)
    monkeypatch.setattr(_tvm_build, "time_kernels", _refuse)
    artifact = _compile(golden, db)
    again = artifact.describe()["tuning"]
    assert again["tasks_tuned_now"] == 0 and again["trials_run"] == 0 and again["kernels_timed_now"] == 0
    assert again["tuned_vs_rules"] == first["tuned_vs_rules"]
    _check_against_ort(artifact, golden("mlp"))


def test_a_changed_kernel_is_timed_again(golden, tmp_path, monkeypatch, fake_tuning):
    """A saved choice holds for the two kernels that were timed: other rules (here, another
    hash for one of them) make that task be timed again, and only that one."""
    db = tmp_path / "db"
    _compile(golden, db)
    path = _target_dir(db) / _tvm_build.CHOICES_FILE
    saved = json.loads(path.read_text())
    key = next(k for k, c in saved["choices"].items() if c["task"] == FIRST_LAYER)
    saved["choices"][key]["rules_kernel"] = "0" * 16
    path.write_text(json.dumps(saved))
    timed = []
    monkeypatch.setattr(_tvm_build, "time_kernels", lambda kernels, target: timed.append(1) or [1.0, 2.0])
    tuning = _compile(golden, db).describe()["tuning"]
    assert timed == [1] and tuning["kernels_timed_now"] == 1


def test_whole_model_check_keeps_the_faster_build(golden, tmp_path, monkeypatch, fake_tuning):
    """Kernels timed "faster" one by one can still make the model slower: both builds then run the
    whole model in turns, and the faster one is kept. Here every kernel claims a 2x win (a forged
    kernel timer) but the tuned ones are the scalar loop nests, so the real model timing picks the
    rules, and the artifact says so."""
    monkeypatch.setattr(_tvm_build, "time_kernels", lambda kernels, target: [1.0, 0.5])
    artifact = _compile(golden, tmp_path / "db")
    tuning = artifact.describe()
    check = tuning["tuning"]["model_check"]
    assert tuning["tuning"]["tasks_using_tuned"] == 3
    assert check["use"] == "rules" and check["tuned_ms"] > check["rules_ms"], check
    assert tuning["schedules"] == "rules"
    _check_against_ort(artifact, golden("mlp"))


def test_whole_model_check_follows_its_timer(golden, tmp_path, monkeypatch, fake_tuning):
    monkeypatch.setattr(_tvm_build, "time_kernels", lambda kernels, target: [1.0, 0.5])
    monkeypatch.setattr(_tvm_build, "time_models", lambda executables, specs, threads: [0.5, 1.0])
    artifact = _compile(golden, tmp_path / "db")
    assert artifact.describe()["tuning"]["model_check"]["use"] == "tuned"
    assert artifact.describe()["schedules"] == "metaschedule+rules"
    _check_against_ort(artifact, golden("mlp"))
    # A tuned library loads without TVM's per-kernel "Scope Loaded" lines on stderr.
    path = tmp_path / "mlp.so"
    artifact.save(path)
    code = "import infoptc, numpy as np; a = infoptc.load(%r); a.run({'x': np.zeros((8, 64), np.float32)})" % str(path)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr[-500:]


def test_tune_time_option_and_flag(golden, tmp_path, monkeypatch, fake_tuning):
    from infoptc.cli import build_parser
    from infoptc.cli.compile import _target_options

    budgets = []
    real = _tvm_build.run_tuning

    def spy(tasks, target, database, budget, start, bar):
        budgets.append(budget)
        return real(tasks, target, database, budget, start, bar)

    monkeypatch.setattr(_tvm_build, "run_tuning", spy)
    infoptc.compile(golden("mlp"), target="llvm", tune_time="2.5", tuning_db=str(tmp_path / "db"))
    assert budgets[0].seconds == 2.5 and budgets[0].trials == 0
    args = build_parser().parse_args(["compile", "m.onnx", "--target", "llvm", "--tune-time", "600"])
    options = _target_options(args)
    assert options["tune_time"] == 600 and options["tuning_db"].endswith("tune")
    for bad in ("soon", 0, -5, "inf"):
        with pytest.raises(UsageError, match="tune_time"):
            infoptc.compile(golden("mlp"), target="llvm", tune_time=bad, tuning_db=str(tmp_path / "db"))
    with pytest.raises(UsageError, match="tuning_db"):
        infoptc.compile(golden("mlp"), target="llvm", tune_time=60)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_not_when_quiet():
    assert _tvm_build.progress_bar(io.StringIO()).disable
    assert _tvm_build.progress_bar(None).disable
    terminal = _Terminal()
    with _tvm_build.progress_bar(terminal) as bar:
        bar.add_task("tuning: 5 trials", total=1.0, completed=0.5)
    assert "tuning: 5 trials" in terminal.getvalue() and "ETA" in terminal.getvalue()
    logger = logging.getLogger("infoptc")
    old = logger.level
    logger.setLevel(logging.ERROR)  # what -q does
    try:
        assert _tvm_build.progress_bar(_Terminal()).disable
    finally:
        logger.setLevel(old)


# ----------------------------------------------------------------------------- MetaSchedule for real


@pytest.fixture
def slow_only(request):
    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr or "not slow" in expr:
        pytest.skip("runs MetaSchedule (20 s to start, seconds per trial): run with -m slow")


@pytest.mark.slow
def test_a_tiny_time_budget_runs_no_trial(golden, tmp_path, slow_only):
    """The budget counts from the start of tuning: spent before the first batch, nothing runs,
    and every kernel keeps the rules."""
    artifact = infoptc.compile(golden("mlp"), target="llvm", input_shapes=SHAPES, tune_time=0.5,
                               tuning_db=str(tmp_path / "db"))
    tuning = artifact.describe()["tuning"]
    assert tuning["trials_run"] == 0 and tuning["records_added"] == 0
    assert tuning["tasks_using_tuned"] == 0 and len(tuning["tasks_without_record"]) == tuning["tasks"]
    assert tuning["tuning_seconds"] < 90  # MetaSchedule's start-up alone, no batch
    _check_against_ort(artifact, golden("mlp"))


@pytest.mark.slow
def test_trials_and_time_whichever_first_then_reused(golden, tmp_path, monkeypatch, slow_only):
    """One trial per kernel with a long time budget: the trials run out first; every kernel
    gets a record and a choice, and the second compile neither tunes nor times."""
    db = tmp_path / "db"
    options = {"input_shapes": SHAPES, "tune": 3, "tune_time": 600, "tuning_db": str(db)}
    first = infoptc.compile(golden("mlp"), target="llvm", **options)
    tuning = first.describe()["tuning"]
    assert tuning["trials_run"] == 3 and tuning["tasks_without_record"] == []
    assert tuning["tuning_seconds"] < 300 and tuning["kernels_timed_now"] == 3
    _check_against_ort(first, golden("mlp"))
    monkeypatch.setattr(_tvm_build, "run_tuning", _refuse)
    monkeypatch.setattr(_tvm_build, "time_kernels", _refuse)
    again = infoptc.compile(golden("mlp"), target="llvm", **options).describe()["tuning"]
    assert again["tasks_tuned_now"] == 0 and again["kernels_timed_now"] == 0
    assert again["tuned_vs_rules"] == tuning["tuned_vs_rules"]


@pytest.mark.slow
def test_time_budget_stops_between_batches(golden, tmp_path, slow_only):
    budget = 60
    artifact = infoptc.compile(golden("mlp"), target="llvm", input_shapes=SHAPES, tune_time=budget,
                               tuning_db=str(tmp_path / "db"))
    tuning = artifact.describe()["tuning"]
    assert tuning["trials_run"] > 0 and tuning["records_added"] > 0
    # A batch starts only if the earlier ones say it ends in time; the first has no estimate.
    assert tuning["tuning_seconds"] <= budget * 1.5
    _check_against_ort(artifact, golden("mlp"))
