"""Do two models or artifacts compute the same thing? The comparison behind `infoptc verify
REFERENCE CANDIDATE` (cli/verify.py): ``compare(reference, candidate, samples)``.

Both run on the same inputs (generated, or the user's .npz files); each output is compared
with ``verify.compare_outputs`` at a per-output tolerance (defaults by dtype, see
``verify.REASSOCIATING_TOLERANCE``; integer and bool outputs must match exactly). The reference,
when it is an ONNX model, runs with ONNX Runtime's graph optimizations off and one thread, so it
is the model as written; the candidate runs as its artifact runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import UsageError, VerificationError
from .targets import Artifact
from .verify import REASSOCIATING_TOLERANCE, OutputDiff, Tolerance


# ----------------------------------------------------------------------------- tolerances


def parse_tolerances(values: Sequence[str], flag: str) -> tuple[float | None, dict[str, float]]:
    """``["1e-4", "logits:1e-3"]`` -> ``(1e-4, {"logits": 1e-3})``: one global value, and per output."""
    default, per = None, {}
    for text in values:
        name, sep, number = text.rpartition(":")
        try:
            value = float(number)
            if not value >= 0:
                raise ValueError
        except ValueError:
            raise UsageError(f"bad {flag} {text!r}; expected a number >= 0 or OUTPUT:NUMBER") from None
        if sep:
            per[name] = value
        else:
            default = value
    return default, per


def default_tolerance(dtype: np.dtype | str) -> Tolerance:
    """By dtype: the reassociating tolerances for floats (fp32: atol 1e-5, rtol 1e-4); exact otherwise."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "fc":
        return Tolerance(0.0, 0.0)
    atol, rtol = REASSOCIATING_TOLERANCE.get(dtype.name, REASSOCIATING_TOLERANCE["float32"])
    return Tolerance(atol, rtol)


def resolve_tolerances(outputs: dict[str, str], atol: Sequence[str] = (),
                       rtol: Sequence[str] = ()) -> dict[str, Tolerance]:
    """Per output name (-> dtype): the defaults by dtype, overridden by the flags."""
    a_all, a_per = parse_tolerances(atol, "--atol")
    r_all, r_per = parse_tolerances(rtol, "--rtol")
    for name in [*a_per, *r_per]:
        if name not in outputs:
            raise UsageError(f"tolerance given for {name!r}, which is not an output of the reference "
                             f"(outputs: {', '.join(map(repr, outputs))})")
    tols = {}
    for name, dtype in outputs.items():
        base = default_tolerance(dtype)
        tols[name] = Tolerance(a_per.get(name, a_all if a_all is not None else base.atol),
                               r_per.get(name, r_all if r_all is not None else base.rtol))
    return tols


def min_atol(ref: np.ndarray, got: np.ndarray, rtol: float) -> float | None:
    """The smallest atol with which ``|got - ref| <= atol + rtol * |ref|`` holds everywhere
    (inf where NaNs differ); None for non-float outputs, which must match exactly."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return float("inf")
    if ref.dtype.kind not in "fc" or ref.size == 0:
        return None
    r, g = ref.astype(np.float64), got.astype(np.float64)
    same = (np.isnan(r) & np.isnan(g)) | (np.isinf(r) & (r == g))
    err = np.where(same, 0.0, np.abs(r - g))
    err = np.where(np.isnan(r) != np.isnan(g), np.inf, err)
    need = err - rtol * np.abs(np.nan_to_num(r, posinf=0.0, neginf=0.0))
    return float(max(np.nanmax(need), 0.0))


# ----------------------------------------------------------------------------- inputs


def load_samples(path: str | Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """An .npz file (one sample) or a folder of them (one sample each, in name order)."""
    from .files import load_npz

    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise UsageError(f"{p}: folder holds no .npz files")
        return [(f.name, load_npz(str(f))) for f in files]
    return [(p.name, load_npz(str(p)))]


def check_compatible(reference: Artifact, candidate: Artifact) -> None:
    """The two take the same inputs: the same names and dtypes (one-line ``UsageError`` if not)."""
    ref = {s.name: s for s in reference.inputs}
    cand = {s.name: s for s in candidate.inputs}
    if set(ref) != set(cand):
        only_r = [n for n in ref if n not in cand]
        only_c = [n for n in cand if n not in ref]
        raise UsageError(f"the models take different inputs: only the reference takes {_names(only_r)}, "
                         f"only the candidate takes {_names(only_c)}")
    for name, spec in ref.items():
        if cand[name].dtype != spec.dtype:
            raise UsageError(f"input {name!r} is {spec.dtype} in the reference but {cand[name].dtype} in the candidate")


def _names(names: Sequence[str]) -> str:
    return ", ".join(map(repr, names)) if names else "none"


# ----------------------------------------------------------------------------- comparing


@dataclass
class OutputReport:
    name: str
    dtype: str
    tolerance: Tolerance
    max_abs: float = 0.0
    max_rel: float = 0.0
    min_atol: float | None = None
    failed_samples: list[str] = field(default_factory=list)
    first_failure: str = ""
    min_sqnr: float | None = None  # set: a lossy candidate, judged by SQNR (dB) instead of atol/rtol
    sqnr_db: float = float("inf")  # the worst sample's

    @property
    def passed(self) -> bool:
        return not self.failed_samples

    def add(self, sample: str, diff: OutputDiff, need: float | None, sqnr: float | None = None) -> None:
        self.max_abs = max(self.max_abs, diff.max_abs)
        self.max_rel = max(self.max_rel, diff.max_rel)
        if need is not None:
            self.min_atol = need if self.min_atol is None else max(self.min_atol, need)
        if self.lossy and sqnr is not None:
            self.sqnr_db = min(self.sqnr_db, sqnr)
            if sqnr < self.min_sqnr:
                self.failed_samples.append(sample)
                self.first_failure = self.first_failure or (
                    f"sample {sample}: output {self.name!r}: SQNR {sqnr:.1f} dB, below {self.min_sqnr:g} dB (lossy)")
        elif not diff.ok and not self.lossy:
            self.failed_samples.append(sample)
            self.first_failure = self.first_failure or f"sample {sample}: {diff.describe()}"

    @property
    def lossy(self) -> bool:
        return self.min_sqnr is not None and self.dtype_kind == "f"

    @property
    def criterion(self) -> str:
        """The bound that decided: ``bit for bit``; ``abs err <= atol`` when every element was
        within atol alone; ``abs err <= atol + rtol*|ref|`` when some needed the relative part
        (then a max abs err above atol passed); ``abs err > atol + rtol*|ref|`` when it failed."""
        if self.lossy:
            return f"SQNR {self.sqnr_db:.1f} dB {'>=' if self.passed else '<'} {self.min_sqnr:g} dB"
        if self.dtype_kind != "f" or (self.tolerance.atol == 0 and self.tolerance.rtol == 0):
            return "bit for bit"
        if not self.passed:
            return "abs err > atol + rtol*|ref|"
        return "abs err <= atol" if self.max_abs <= self.tolerance.atol else "abs err <= atol + rtol*|ref|"

    @property
    def dtype_kind(self) -> str:
        try:
            return "f" if np.dtype(self.dtype).kind in "fc" else "x"
        except TypeError:
            return "x"

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "atol": self.tolerance.atol, "rtol": self.tolerance.rtol,
                "exact": self.dtype_kind != "f" or (self.tolerance.atol == 0 and self.tolerance.rtol == 0),
                "max_abs_error": self.max_abs, "max_rel_error": self.max_rel,
                "min_atol_to_pass": self.min_atol, "passed": self.passed, "criterion": self.criterion,
                "sqnr_db": None if self.sqnr_db == float("inf") else round(self.sqnr_db, 2), "min_sqnr_db": self.min_sqnr,
                "failed_samples": self.failed_samples, "first_failure": self.first_failure or None}


def reference_runner(artifact: Artifact) -> Callable[[dict], dict]:
    """ONNX models run unoptimized and single-threaded; other artifacts as they run."""
    from .verify import OrtRunner

    model = getattr(artifact, "model", None)
    if model is not None:
        return OrtRunner(model, threads=1, optimize=False).run
    return artifact.run


def is_lossy(artifact: Artifact) -> bool:
    """The artifact was made by a lossy transform (infoptc's quantizers record theirs)."""
    model = getattr(artifact, "model", None)
    return model is not None and any(m.key == "infoptc.quantization" for m in model.metadata_props)


def compare(reference: Artifact, candidate: Artifact, samples: Iterator[tuple[str, dict]],
            atol: Sequence[str] = (), rtol: Sequence[str] = (), min_sqnr: float | None = None) -> list[OutputReport]:
    """Run both on every sample and aggregate, per output, the worst errors and failures.

    ``min_sqnr`` (dB) judges float outputs by signal-to-noise ratio instead of atol/rtol: the
    way to check a quantized candidate. It defaults to ``verify.LOSSY_MIN_SQNR_DB`` when the
    candidate records a lossy transform and no tolerance was given."""
    from .verify import LOSSY_MIN_SQNR_DB, check_feeds, compare_outputs, sqnr_db

    if min_sqnr is None and not atol and not rtol and is_lossy(candidate):
        min_sqnr = LOSSY_MIN_SQNR_DB

    check_compatible(reference, candidate)
    ref_specs = {s.name: s for s in reference.inputs}
    cand_specs = {s.name: s for s in candidate.inputs}
    run_ref = reference_runner(reference)
    reports: dict[str, OutputReport] | None = None
    for sample, feeds in samples:
        check_feeds(ref_specs, feeds)
        check_feeds(cand_specs, feeds)
        try:
            expected = run_ref(feeds)
        except VerificationError as e:  # the reference failing means the inputs are bad
            raise UsageError(f"the reference cannot run on sample {sample}: {e}") from None
        actual = candidate.run(feeds)
        if reports is None:
            tols = resolve_tolerances({k: np.asarray(v).dtype.name for k, v in expected.items()}, atol, rtol)
            reports = {k: OutputReport(k, np.asarray(v).dtype.name, tols[k], min_sqnr=min_sqnr)
                       for k, v in expected.items()}
        diffs = compare_outputs(expected, actual, tolerances={k: r.tolerance for k, r in reports.items()})
        for d in diffs:
            rep = reports[d.name]
            need = min_atol(expected[d.name], actual[d.name], rep.tolerance.rtol) if d.name in actual else float("inf")
            sqnr = sqnr_db(expected[d.name], actual[d.name]) if rep.lossy and d.name in actual else None
            rep.add(sample, d, need, sqnr)
    return list((reports or {}).values())


def generated_samples(artifact: Artifact, count: int, seed: int, dims: dict[str, int]) -> Iterator[tuple[str, dict]]:
    """``count`` input sets from seeds ``seed, seed+1, ...``; symbolic dims from ``dims``, else 2."""
    from .bench import inputs_for

    for i in range(count):
        yield f"seed={seed + i}", inputs_for(artifact, dims, seed + i)
