"""The command line's exit statuses: one meaning each, the same for every command, and the one
line on stderr that comes with every status above 1. Nothing here imports torch (or anything
heavy): ``--help`` prints :data:`EPILOG`."""

from __future__ import annotations

import errno
import os
import select
import sys

from ckptscope.errors import CheckpointError, CkptscopeError

OK = 0
FAILED = 1  # findings reported, checkpoints that differ, a rule that fails, a copy refused
USAGE = 2  # argparse errors, bad option values (a malformed rule, an unknown root), bad CKPTSCOPE_* settings
UNREADABLE = 3  # an input that is missing, not a checkpoint, or refused by the parser
IO_ERROR = 4  # an output that cannot be written (-o, --junit), a full disk, a closed pipe to a file
CLOSED_PIPE = 141  # stdout closed by its reader (`| head`): quiet, as a command killed by SIGPIPE (128 + 13)
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

EPILOG = """\
exit status (the same for every command):
  0    ok
  1    findings reported, checkpoints differ, a rule failed, a copy refused
  2    usage: a bad option or value (argparse, a malformed rule, an unknown root or tensor,
       a CKPTSCOPE_* setting out of range)
  3    unreadable input: a file that is missing, not a checkpoint, or refused by the parser
  4    I/O error: an output (-o, --junit) that cannot be written, a full disk
  141  stdout closed by its reader (e.g. `| head`) before the result was all written
every status from 2 up comes with one line on stderr, `ckptscope: ...`, also under --json"""


class CliFailure(Exception):
    """A command that ends with ``status`` and ``line`` (one line, printed on stderr)."""

    status = IO_ERROR

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


class UnreadableInput(CliFailure):
    """An input file that could not be read: ``ckptscope: PATH: reason``."""

    status = UNREADABLE

    def __init__(self, path: str, reason: object) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


class CannotWrite(CliFailure):
    """An output that could not be written (nothing of it is left behind)."""

    status = IO_ERROR

    def __init__(self, path: str, reason: object) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path


def os_reason(exc: OSError) -> str:
    """``No such file or directory``, ``No space left on device``: the part a user reads."""
    return exc.strerror or str(exc)


def failure_of(exc: Exception, path: str = "") -> tuple[int, str] | None:
    """The exit status and stderr line (without ``ckptscope: ``) for an error a command raised;
    None for one that is not a user-facing failure (a bug: its traceback is wanted)."""
    if isinstance(exc, CliFailure):
        return exc.status, exc.line
    if isinstance(exc, CheckpointError):
        return UNREADABLE, f"{path}: {exc}" if path else str(exc)
    if isinstance(exc, CkptscopeError):
        return USAGE, str(exc)
    if isinstance(exc, OSError):
        return IO_ERROR, f"{exc.filename}: {os_reason(exc)}" if exc.filename else os_reason(exc)
    from pydantic import ValidationError  # imported only when something failed: --help stays fast

    if isinstance(exc, ValidationError):  # a CKPTSCOPE_* setting out of range
        first = exc.errors()[0]
        name = "CKPTSCOPE_" + "_".join(str(part) for part in first["loc"]).upper()
        return USAGE, f"{name}: {first['msg']}"
    return None


def stdout_closed() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone: a BrokenPipeError from there is
    the quiet `| head` case, one from anywhere else is an I/O error."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a test's capture: not a pipe
        return False
    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


def silence_stdout() -> None:
    """The SIGPIPE recipe of the Python docs: point stdout at devnull, so that the interpreter's
    last flush of what is still buffered cannot fail with a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


def is_closed_pipe(exc: BaseException) -> bool:
    return isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE)
