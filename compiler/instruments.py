"""Pass instruments: each flag of the CLI (--time-passes, --print-after, --verify-each,
--opt-bisect-limit, --stats) is one small hook object given to the ``PassManager``."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable

import onnx
import onnx_graphsurgeon as gs

from . import ir
from .errors import InfoptcError, VerificationError
from .pass_manager import Contract, Instrument, PassContext, PassRecord

log = logging.getLogger("infoptc")


class TimePasses(Instrument):
    """Wall time per pass name (summed over applications)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.runs: dict[str, int] = defaultdict(int)
        self.changes: dict[str, int] = defaultdict(int)

    def after_pass(self, record: PassRecord, graph: gs.Graph, ctx: PassContext) -> None:
        self.seconds[record.name] += record.seconds
        self.runs[record.name] += 1
        self.changes[record.name] += int(record.changed)

    def rows(self) -> list[tuple[str, int, int, float]]:
        """(pass, runs, runs that changed the graph, seconds), slowest first."""
        return sorted(((n, self.runs[n], self.changes[n], s) for n, s in self.seconds.items()),
                      key=lambda r: -r[3])


class Stats(Instrument):
    """The counters of every pass, summed per pass name."""

    def __init__(self):
        self.counters: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def after_pass(self, record: PassRecord, graph: gs.Graph, ctx: PassContext) -> None:
        for key, value in record.counters.items():
            self.counters[record.name][key] += value

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {p: dict(c) for p, c in self.counters.items() if any(c.values())}


def graph_text(graph: gs.Graph) -> str:
    """A readable dump: ONNX's textual syntax, with large constants elided."""
    model = gs.export_onnx(graph, do_type_check=False)
    for t in model.graph.initializer:
        if t.raw_data and len(t.raw_data) > 64:
            t.ClearField("raw_data")
    try:
        return onnx.printer.to_text(model.graph)
    except Exception:  # the printer rejects some malformed intermediate states
        return str(graph)


class PrintAfter(Instrument):
    """Dump the graph after the named passes (or ``all``) to ``write``."""

    def __init__(self, names: set[str] | str, write: Callable[[str], None], only_changed: bool = False):
        self.names = {names} if isinstance(names, str) else set(names)
        self.write = write
        self.only_changed = only_changed

    def after_pass(self, record: PassRecord, graph: gs.Graph, ctx: PassContext) -> None:
        if ("all" in self.names or record.name in self.names) and (record.changed or not self.only_changed):
            self.write(f"// ----- IR after {record.name} (application {record.index}) -----\n{graph_text(graph)}\n")


class VerifyEach(Instrument):
    """After every pass that changed the graph: ONNX checker, strict shape inference, and a
    numerical comparison with the input model, at the tolerance of the contracts so far."""

    def __init__(self, reference: onnx.ModelProto, samples: int = 1, seed: int = 0):
        self.reference = reference
        self.samples = samples
        self.seed = seed
        self.contracts: list[Contract] = []
        self._feeds: list | None = None

    def after_pass(self, record: PassRecord, graph: gs.Graph, ctx: PassContext) -> None:
        from .verify import check_equivalent

        self.contracts.append(record.pass_.contract)
        if not record.changed:
            return
        where = f"pass {record.name!r} (application {record.index})"
        model = ir.from_graph(graph, self.reference)
        try:
            onnx.checker.check_model(model)
            onnx.shape_inference.infer_shapes(model, strict_mode=True)
        except Exception as e:
            raise VerificationError(f"--verify-each: {where} produced an invalid model: {str(e).splitlines()[0]}") from None
        contract = Contract.loosest(self.contracts)
        feeds = self._calibration_feeds(ctx) if contract == Contract.LOSSY else None
        try:
            check_equivalent(self.reference, model, contract, self.samples, self.seed,
                             what=f"the model after {where}", feeds=feeds)
        except InfoptcError as e:
            raise VerificationError(f"--verify-each: {e}") from None


    def _calibration_feeds(self, ctx: PassContext) -> list | None:
        """A lossy pass is judged on the data it was calibrated for, not on noise: the first
        samples of the calibration data, read once for every pass after it."""
        if ctx.options.get("calibration") is None:
            return None
        if self._feeds is None:
            from .calibration_data import CalibrationData, model_inputs

            self._feeds = list(CalibrationData(ctx.options["calibration"], model_inputs(self.reference),
                                               limit=max(self.samples, 2)))
        return self._feeds


class BisectLimit(Instrument):
    """Run only the first ``limit`` pass applications (like LLVM's -opt-bisect-limit)."""

    def __init__(self, limit: int, write: Callable[[str], None] | None = None):
        self.limit = limit
        self.write = write

    def before_pass(self, record: PassRecord, graph: gs.Graph, ctx: PassContext) -> bool:
        run = record.index <= self.limit
        if self.write:
            self.write(f"BISECT: {'running' if run else 'NOT running'} pass ({record.index}) {record.pass_}")
        return run
