"""Typed errors. Library code raises these; only the CLI maps them to exit codes."""

from __future__ import annotations


class InfoptcError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 4


class UsageError(InfoptcError):
    """Bad flags, unknown pass or option, bad output path."""

    exit_code = 2


class VerificationError(InfoptcError):
    """A transformed model no longer matches the original within tolerance."""

    exit_code = 3


class CompileError(InfoptcError):
    """A pass or a backend failed."""

    exit_code = 4


class UnsupportedOpError(CompileError):
    """A backend cannot lower some op of the model: the model is bad input for that target."""

    exit_code = 6


class MissingDependencyError(InfoptcError):
    """An optional package, compiler or device that a target needs is absent."""

    exit_code = 5


class InvalidModelError(InfoptcError):
    """The input model is malformed, unsafe or unsupported."""

    exit_code = 6


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line
    errors and reasons."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
