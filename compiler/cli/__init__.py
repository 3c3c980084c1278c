"""The `infoptc` command. It owns the terminal: results on stdout, logs on stderr, exit codes.

    infoptc MODEL [flags]            same as `infoptc compile MODEL`
    infoptc passes [--pipeline -O2]  registered passes, or the pipeline an -O level runs
    infoptc inspect MODEL            opset, inputs/outputs, op histogram, params, size, FLOPs
    infoptc run ARTIFACT             run a model or artifact on inputs (.npz) or generated ones

One module per subcommand (cli/compile.py, cli/bench.py, ...): ``add_parser(subparsers, common)``
adds its parser and returns ``{name: handler}``, ``handler(args) -> exit code``. The subcommands
parse flags, call the library and print (with cli/output.py); the library never imports them.

Exit codes: 0 ok, 2 usage, 3 verification failed, 4 compile/pass failure,
5 missing optional dependency or hardware, 6 bad input model.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from .. import __version__, config, plugins
from ..errors import InfoptcError, UsageError
from . import bench, inspect, passes, profile, reduce, run, sensitivity, targets, verify
from . import export
from . import compile as compile_command  # (as: not to hide the builtin)
from .output import err, stage_spinner

EXIT_OK, EXIT_USAGE, EXIT_INTERNAL = 0, 2, 4

# In the order `infoptc --help` lists them.
SUBCOMMANDS = [compile_command, passes, targets, inspect, run, bench, profile, verify, reduce, sensitivity, export]

log = logging.getLogger("infoptc")

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so errors get our one-line format."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    p.add_argument("--load-plugin", action="append", default=[], metavar="FILE.py",
                   help="import a Python file that registers passes or targets (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="infoptc", description="ONNX graph compiler: optimize a model and build it for a target.",
                     epilog="The bare form `infoptc MODEL ...` means `infoptc compile MODEL ...`.")
    parser.add_argument("--version", action="version", version=f"infoptc {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    for module in SUBCOMMANDS:
        COMMANDS.update(module.add_parser(sub, _common))
    return parser


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """The bare form: a first argument that is not a command or a flag means `compile`."""
    argv = list(argv)
    if not COMMANDS:
        build_parser()  # registers the commands' names
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        _refuse_misspelt_command(argv[0])
        argv.insert(0, "compile")
    return argv


def _refuse_misspelt_command(word: str) -> None:
    """A word that is no file and reads like a command name (``benhc``) is a typo, not a model."""
    import difflib
    from pathlib import Path

    if Path(word).exists() or Path(word).suffix or "/" in word or os.sep in word:
        return
    close = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.6)
    if close:
        raise UsageError(f"unknown command {word!r}; did you mean {close[0]!r}? (see 'infoptc --help')")


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(normalize_argv(argv))
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if extra:  # the subcommand's own help lists its flags, the top-level one does not
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see 'infoptc {args.command} --help')")
        _setup_logging(args)
        args.config = config.load()
        for path in [*config.plugin_files(args.config), *args.load_plugin]:
            plugins.load_plugin_file(path)
        with stage_spinner(args.quiet):
            return COMMANDS[args.command](args)
    except InfoptcError as e:
        err.print(f"infoptc: error: {e}", markup=False)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("infoptc: interrupted", markup=False)
        return 130
    except Exception as e:  # a bug in infoptc: one line unless asked for more
        if os.environ.get("INFOPTC_DEBUG"):
            raise
        err.print(f"infoptc: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                  "(set INFOPTC_DEBUG=1 for a traceback)", markup=False)
        return EXIT_INTERNAL


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"infoptc: {record.levelname.lower()}: {record.getMessage()}", markup=False)


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if args.quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    log.handlers[:] = [_StderrHandler()]
    log.setLevel(level)
    log.propagate = False
