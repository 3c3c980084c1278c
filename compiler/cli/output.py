"""What the subcommands print with: results on stdout (``out``, JSON), notes, spinners and
progress bars on stderr (``err``, silenced by -q), tables at their natural width."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from rich.console import Console, ConsoleDimensions

from ..files import dumps_json


class _ResultConsole(Console):
    """A terminal's width on a terminal; piped or written to a file, no limit, so that tables keep
    their natural width instead of being cut with "..." at rich's assumed 80 columns."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return size if self.is_terminal else ConsoleDimensions(UNLIMITED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


UNLIMITED_WIDTH = 100_000
out = _ResultConsole(highlight=False, soft_wrap=True)  # follows sys.stdout, so tests can capture it
err = Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(data: Any) -> None:
    sys.stdout.write(dumps_json(data))


def note(args: argparse.Namespace, text: str) -> None:
    """A progress note on stderr, silenced by -q."""
    if not args.quiet:
        err.print(text, markup=False)


def status(args: argparse.Namespace, text: str):
    """A spinner on stderr while a long step runs (none with -q)."""
    return err.status(text, spinner="dots") if not args.quiet else contextlib.nullcontext()


@contextlib.contextmanager
def stage_spinner(quiet: bool):
    """While a command runs, the long step under way (``infoptc.progress.stage``) as a spinner on
    stderr: on a terminal only, never with -q, and out of the way of a step's own progress bar."""
    if quiet or not err.is_terminal:
        yield
        return
    from rich.errors import LiveError

    from ..progress import listening

    stack: list = []  # the stages under way, innermost last
    spinner = None

    def show(event: str, step) -> None:
        nonlocal spinner
        if event == "start":
            stack.append(step)
        elif event == "end" and step in stack:
            stack.remove(step)
        wanted = stack[-1] if stack and not any(s.own_display for s in stack) else None
        if wanted is None:
            if spinner is not None:
                spinner.stop()
                spinner = None
        elif spinner is None:
            try:
                spinner = err.status(wanted.text, spinner="dots")
                spinner.start()
            except LiveError:  # the command's own bar or spinner is showing
                spinner = None
        else:
            spinner.update(wanted.text)

    with listening(show):
        try:
            yield
        finally:
            if spinner is not None:
                spinner.stop()


def progress(console: Console, disable: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                    TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                    console=console, transient=True, disable=disable)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)
