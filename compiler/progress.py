"""Long steps say when they start, how far they are and when they end, for whoever listens:
library code never prints, the CLI shows a spinner on a terminal (cli/output.py).

    with stage("calibrating") as step:             # logged at INFO: `-v` shows it
        for i, feed in enumerate(data):
            step.update(f"calibrating: sample {i + 1}")   # the spinner's text; not logged

Listeners are called as ``listener(event, stage)``, event "start", "update" or "end".
A stage that draws its own progress bar (MetaSchedule tuning) says so (``own_display``), and
listeners keep the terminal free for it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator

log = logging.getLogger("infoptc.progress")


class Stage:
    def __init__(self, text: str, own_display: bool = False):
        self.text = text
        self.own_display = own_display

    def update(self, text: str) -> None:
        self.text = text
        _tell("update", self)


Listener = Callable[[str, Stage], None]
_listeners: list[Listener] = []


def _tell(event: str, step: Stage) -> None:
    for listener in list(_listeners):
        listener(event, step)


@contextlib.contextmanager
def stage(text: str, own_display: bool = False) -> Iterator[Stage]:
    """A long step: logged when it starts (INFO) and ends (DEBUG, with its time)."""
    log.info("%s", text)
    step = Stage(text, own_display)
    start = time.perf_counter()
    _tell("start", step)
    try:
        yield step
    finally:
        _tell("end", step)
        log.debug("%s: %.2f s", text, time.perf_counter() - start)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener`` for every stage while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
