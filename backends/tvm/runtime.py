"""What the TVM targets (backends/tvm/__init__.py) and their build (build.py) both need from the
installed TVM: the versions we pin, importing it with a helpful error, its thread pool, and
its native log output. TVM itself is imported lazily, as in __init__.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

from infoptc.errors import CompileError, MissingDependencyError

log = logging.getLogger("infoptc.backends.tvm")

PINNED_TVM = "0.27.0.post1"
PINNED_FFI = "0.1.14.post1"
TUNING_FFI_SERIES = "0.1.14"
INSTALL = f"pip install 'apache-tvm=={PINNED_TVM}' 'apache-tvm-ffi=={PINNED_FFI}'"


def import_tvm():
    try:
        import tvm
    except ImportError:
        raise MissingDependencyError(f"the TVM targets need Apache TVM: {INSTALL}") from None
    return tvm


def tvm_versions() -> dict[str, str]:
    tvm = import_tvm()
    import tvm_ffi

    return {"tvm": tvm.__version__, "tvm_ffi": getattr(tvm_ffi, "__version__", "?")}


def _repoint_log_handlers(old, new) -> None:
    """Log handlers made while ``old`` stood in for sys.stderr (a library that configures
    logging when TVM first imports it) write to ``new`` instead: ``old`` is closed next, and a
    handler left on it fails on every later log line ("I/O operation on closed file")."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)


@contextlib.contextmanager
def native_output_to_log():
    """TVM's C++ side logs warnings straight to file descriptor 2 (and MetaSchedule's worker
    processes inherit it): send them to a temp file and from there to our debug log.

    Yields a stream on the real stderr (None if there is none), for the tuning progress bar."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield None
        return
    # Python's own writes to stderr (our log lines, the CLI's spinner) still reach the terminal.
    python_stderr = sys.stderr if _writes_fd2(sys.stderr) else None
    with tempfile.TemporaryFile() as sink, open(os.dup(saved), "w") as terminal:
        os.dup2(sink.fileno(), 2)
        if python_stderr is not None:
            sys.stderr = terminal
        try:
            yield terminal
        finally:
            if python_stderr is not None:
                sys.stderr.flush()
                sys.stderr = python_stderr
                _repoint_log_handlers(terminal, python_stderr)
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip():
                    log.debug("tvm: %s", line.strip())


def _writes_fd2(stream) -> bool:
    """Whether ``stream`` writes to file descriptor 2 (not a test's capture, say)."""
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def size_thread_pool(threads: int) -> None:
    """Give the calling thread's TVM pool ``threads`` workers (0: TVM's choice) sharing the CPUs
    this process may use. Also used to time kernels while tuning, with the artifact's count."""
    import tvm_ffi

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    share_all_cores = -3  # threading::ThreadGroup::kSpecifyThreadShareAllCore
    tvm_ffi.get_global_func("runtime.config_threadpool")(
        share_all_cores, min(threads, len(cpus)), [str(c) for c in cpus])


def error_line(e: BaseException) -> str:
    """One line for the user from a TVM exception: its last line, less the IR printer's footer
    ("# Metadata omitted ..."), and the op of an "Offending call:" TVM names (an op it cannot
    lower reads "CodeGenVM cannot emit this Relax operator ...: R.nn.conv2d_transpose")."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith("#")] or lines or [type(e).__name__]
    line = kept[-1]
    if "Offending call:" in lines:
        call = lines[lines.index("Offending call:") + 1:][:1]
        reason = next((x for x in lines if "cannot" in x), "offending call")
        reason = reason.split(". ")[0].rstrip(".")
        line = f"{reason}: {call[0].split('(')[0]}" if call else reason
    return line


def compile_error(target: str, e: BaseException):
    """The CompileError (exit 4) for a TVM failure while compiling for ``target``: one line."""
    return CompileError(f"TVM failed to compile the model for {target}: {error_line(e)[:400]}")
