"""Reading ahead of the stats workers: on a cold page cache the disk is kept busy while the kernel
computes, so the whole pass runs at the disk's speed rather than at disk time plus compute time.

The workers take their tensors in a fixed order (largest first, then the batches of small ones);
a thread walks the same order and asks the kernel to read each byte range
(``POSIX_FADV_WILLNEED``: the reads are queued, not waited for), staying at most ``AHEAD_BYTES``
beyond what the workers have started, so what is read ahead is about to be used and a big file
never floods the page cache. A step whose first, middle and last pages are already in the page
cache (a one-byte ``preadv(RWF_NOWAIT)`` of each succeeds) is not asked for: on a warm cache the
advice would only cost the kernel a walk of the cached pages. Files are opened ``O_RDONLY`` by the
thread itself (the workers map them separately).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterable, Sequence
from types import TracebackType

from ckptscope.formats.model import TensorInfo, byte_parts

AHEAD_BYTES = 256 << 20
STEP_BYTES = 16 << 20  # a range is asked for in steps of this, so the throttle bites inside big tensors

Range = tuple[str, int, int]  # (path, offset, length)
_PAGE = mmap.PAGESIZE


def cached(fd: int, offset: int, length: int) -> bool:
    """Whether the first, middle and last pages of the range look resident in the page cache (False
    where the system cannot tell: then the range is asked for)."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or not hasattr(os, "preadv"):
        return False
    probe = bytearray(1)
    for at in (offset, offset + length // 2, offset + length - 1):
        try:
            if os.preadv(fd, [probe], at - at % _PAGE, flag) != 1:
                return False
        except OSError:  # BlockingIOError: not resident; anything else: cannot tell
            return False
    return True


def ranges_of(work: Iterable[Sequence[TensorInfo]]) -> list[list[Range]]:
    """The byte ranges of each work item (a tensor, or a batch of tensors), in their order: each
    storage a tensor's values are read from, a batch's tensors merged where adjacent."""
    out: list[list[Range]] = []
    for item in work:
        ranges: list[Range] = []
        for info in item:
            for part in byte_parts(info):
                s = part.storage
                if s.nbytes <= 0 or part.pieces:
                    continue
                if ranges and ranges[-1][0] == s.path and ranges[-1][1] + ranges[-1][2] >= s.offset:
                    path, start, length = ranges[-1]
                    ranges[-1] = (path, start, max(start + length, s.offset + s.nbytes) - start)
                else:
                    ranges.append((s.path, s.offset, s.nbytes))
        out.append(ranges)
    return out


class Prefetcher:
    """``with Prefetcher(ranges):`` around the work; ``started(i)`` as work item ``i`` begins."""

    def __init__(self, items: list[list[Range]], ahead: int = AHEAD_BYTES) -> None:
        self._items = items
        self._sizes = [sum(length for _, _, length in ranges) for ranges in items]
        self._ahead = ahead
        self._started = 0  # bytes of the items the workers have begun
        self._begun: set[int] = set()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="ckptscope-prefetch", daemon=True)

    def __enter__(self) -> Prefetcher:
        if hasattr(os, "posix_fadvise") and any(self._items):
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def started(self, index: int) -> None:
        with self._cond:
            if index not in self._begun:
                self._begun.add(index)
                self._started += self._sizes[index]
                self._cond.notify_all()

    def _run(self) -> None:
        fds: dict[str, int] = {}
        issued = 0
        try:
            for ranges in self._items:
                for path, offset, length in ranges:
                    at, end = offset, offset + length
                    while at < end:
                        step = min(STEP_BYTES, end - at)
                        with self._cond:
                            while not self._stop and issued + step > self._started + self._ahead:
                                self._cond.wait()
                            if self._stop:
                                return
                        fd = fds.get(path)
                        if fd is None:
                            try:
                                fd = fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                            except OSError:  # the workers report the file's error themselves
                                fd = fds[path] = -1
                        if fd >= 0 and not cached(fd, at, step):
                            try:
                                os.posix_fadvise(fd, at, step, os.POSIX_FADV_WILLNEED)
                            except OSError:
                                pass  # only advice: the workers read the bytes either way
                        issued += step
                        at += step
        finally:
            for fd in fds.values():
                if fd >= 0:
                    os.close(fd)
