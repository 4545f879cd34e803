"""Where the command line's output goes: results on stdout (text or one JSON document), messages
and progress on stderr, files written whole or not at all."""

from __future__ import annotations

import errno
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptscope.cli_exits import CannotWrite, os_reason
from ckptscope.text import reveal

if TYPE_CHECKING:
    from rich.console import Console

Progress = Callable[[int, int], None]


class _WholeWrites(io.RawIOBase):
    """A file descriptor whose ``write`` writes everything or raises. CPython's buffered writer
    returns a short count, and the text layer drops the rest silently, when a pipe's reader leaves
    in the middle of a large write: the ``| head`` case would then go unnoticed, or not, by chance."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            view = view[os.write(self._fd, view) :]  # a closed pipe: BrokenPipeError
        return total


def whole_writes_stdout() -> None:
    """Put the process's stdout behind :class:`_WholeWrites` (same descriptor, encoding and
    buffering), so that a reader that leaves always shows as a BrokenPipeError. A replaced stdout
    (a test's capture) is left alone."""
    stream = sys.stdout
    if stream is not sys.__stdout__ or not isinstance(stream, io.TextIOWrapper):
        return
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    stream.flush()
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(_WholeWrites(fd)),
        encoding=stream.encoding,
        errors="backslashreplace",  # a non-UTF-8 terminal gets escapes, not a traceback
        line_buffering=stream.line_buffering,
    )


def say(line: str, *, err: bool = False) -> None:
    """Print one line. Every line the CLI prints comes here: names, metadata, warnings and error
    messages are attacker text, so no control character (ESC sequences, OSC 52 clipboard writes,
    BEL, bidi overrides, newlines) ever reaches the terminal raw."""
    stream = sys.stderr if err else sys.stdout
    stream.write(reveal(line) + "\n")


def write_json(data: Any) -> None:
    """One JSON document on one line of stdout (NaN/Inf are encoded by the services, never here)."""
    sys.stdout.write(json.dumps(data, allow_nan=False) + "\n")  # dumps: the C encoder


def write_atomically(out: str, write: Callable[[Path], object], *, make_parents: bool = False) -> None:
    """Write ``out`` through a temporary file beside it, renamed over it once complete: a failure
    (no such folder, no permission, a full disk) leaves neither a partial file nor the temporary
    one, and ends the command with ``ckptscope: cannot write OUT: reason`` (exit 4). ``write``'s
    own refusals (CkptscopeError: an unstorable dtype, a copy that does not verify) pass through."""
    import tempfile  # here, not at the top: ``ckptscope --help`` imports it otherwise (shutil, random)

    target = Path(out)
    temp: str | None = None
    try:
        if make_parents:
            target.parent.mkdir(parents=True, exist_ok=True)  # a CI job's reports/ folder
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(temp))
        os.replace(temp, target)
    except OSError as exc:
        raise CannotWrite(out, os_reason(exc)) from None
    finally:
        if temp is not None:
            Path(temp).unlink(missing_ok=True)


def stdout_console() -> Console:
    """A rich console on stdout whose closed pipe ends the command as every other one does (exit
    141, quietly). rich's own handling exits with status 1 from inside ``print``."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return _Console()


@contextmanager
def stats_progress(enabled: bool = True) -> Iterator[Progress | None]:
    """A progress bar for the statistics pass, drawn on stderr, and only when stderr is a terminal:
    never on stdout (a result may be piped), nothing at all when stderr is a pipe or a file.
    Yields the callback for ``inspect_listing(progress=...)``, or None."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, TransferSpeedColumn
    from rich.progress import Progress as Bar

    bar = Bar(
        "stats",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,  # erased when done: the terminal keeps the result, not the bar
        redirect_stdout=False,  # stdout stays the command's own, even while the bar is drawn
        redirect_stderr=False,
    )
    bar_task = bar.add_task("stats", total=None)

    def update(done: int, total: int) -> None:
        bar.update(bar_task, completed=done, total=total)

    with bar:
        yield update
