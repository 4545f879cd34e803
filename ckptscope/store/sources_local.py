"""Referenced checkpoints on a local (or shared) file system: identity from stat, one folder
level without following links out of it, and pread with size+mtime checked around each read.
Also the few rules both kinds of store share (range clamping, addressable names, the entry limit)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from typing import BinaryIO

from ckptscope.errors import CheckpointError, SourceChanged, SourceNotFound

from .sources_errors import os_error
from .sources_refs import ObjectIdentity, SourceRef

MAX_DIR_ENTRIES = 10_000
FILE_BUFFER = 1 << 20  # pread/write through 1 MiB measured fastest here (shared/DESIGN.md §3)


def clamp(start: int, end: int, size: int) -> tuple[int, int]:
    """``[start, end)`` within ``[0, size)``; an empty range where they do not overlap."""
    start = max(0, min(int(start), size))
    return start, max(start, min(int(end), size))


def addressable(name: str) -> bool:
    """A name that SourceRef.child accepts (others cannot be referred to, so are left out)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return name not in ("", ".", "..") and "/" not in name and not any(ord(c) < 32 or ord(c) == 127 for c in name)


def check_entry_count(ref: SourceRef, count: int) -> None:
    if count > MAX_DIR_ENTRIES:
        raise CheckpointError("limit_exceeded", f"{ref.url} holds more than {MAX_DIR_ENTRIES} entries")


def file_identity(st: os.stat_result) -> ObjectIdentity:
    return ObjectIdentity(size=st.st_size, mtime=st.st_mtime_ns / 1e9)


def _under(path: str, folder: str) -> bool:
    return folder == "/" or path.startswith(folder + "/")


def head_file(ref: SourceRef) -> ObjectIdentity:
    try:
        st = os.stat(ref.key)
    except OSError as exc:
        raise os_error(exc, ref) from None
    if not stat.S_ISREG(st.st_mode):
        raise SourceNotFound(f"{ref.url} is not a file")
    return file_identity(st)


def list_folder(ref: SourceRef) -> dict[str, ObjectIdentity] | None:
    """Regular files directly in the folder (a link counts as its target's file when the target
    lies inside the folder; others are left out), or None when ``ref`` is not a folder."""
    real_dir = os.path.realpath(ref.key)
    found: dict[str, ObjectIdentity] = {}
    try:
        with os.scandir(ref.key) as entries:
            for entry in entries:
                if not addressable(entry.name):
                    continue
                try:
                    if entry.is_symlink():
                        target = os.path.realpath(entry.path)
                        if not _under(target, real_dir):
                            continue
                        st = os.stat(target)
                    else:
                        st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished or unreadable while listing
                if stat.S_ISREG(st.st_mode):
                    found[entry.name] = file_identity(st)
                    check_entry_count(ref, len(found))
    except NotADirectoryError:
        return None
    except OSError as exc:
        raise os_error(exc, ref) from None
    return found


def _open_checked(ref: SourceRef, identity: ObjectIdentity | None) -> tuple[int, ObjectIdentity]:
    try:
        # O_NONBLOCK: opening a FIFO planted under a root must not hang (regular files ignore it)
        fd = os.open(ref.key, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise os_error(exc, ref) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SourceNotFound(f"{ref.url} is not a file")
    before = file_identity(st)
    if identity is not None and not identity.same_object(before):
        os.close(fd)
        raise SourceChanged(f"{ref.url} changed since it was listed (another size or modification time)")
    return fd, before


def _check_unchanged(ref: SourceRef, fd: int, before: ObjectIdentity) -> None:
    if not before.same_object(file_identity(os.fstat(fd))):
        raise SourceChanged(f"{ref.url} changed while it was being read")


def _pread_exact(fd: int, offset: int, length: int) -> bytes:
    parts = []
    while length > 0:
        data = os.pread(fd, length, offset)
        if not data:
            break
        parts.append(data)
        offset += len(data)
        length -= len(data)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def read_file_ranges(
    ref: SourceRef, ranges: Sequence[tuple[int, int]], identity: ObjectIdentity | None, count: Callable[[int], None]
) -> list[bytes]:
    fd, before = _open_checked(ref, identity)
    try:
        out = []
        for s, e in ranges:
            start, end = clamp(s, e, before.size)
            data = _pread_exact(fd, start, end - start)
            count(len(data))
            if len(data) != end - start:
                raise SourceChanged(f"{ref.url} changed while it was being read (it is shorter)")
            out.append(data)
        _check_unchanged(ref, fd, before)
        return out
    except OSError as exc:
        raise os_error(exc, ref) from None
    finally:
        os.close(fd)


def copy_file_range(
    ref: SourceRef,
    start: int,
    end: int,
    out: BinaryIO,
    identity: ObjectIdentity | None,
    chunk: int,
    count: Callable[[int], None],
) -> int:
    fd, before = _open_checked(ref, identity)
    try:
        start, end = clamp(start, end, before.size)
        view = memoryview(bytearray(min(chunk, FILE_BUFFER, max(end - start, 1))))
        position = start
        while position < end:
            n = os.preadv(fd, [view[: min(len(view), end - position)]], position)
            if n <= 0:
                raise SourceChanged(f"{ref.url} changed while it was being read (it is shorter)")
            out.write(view[:n])
            position += n
            count(n)
        _check_unchanged(ref, fd, before)
        return position - start
    except OSError as exc:
        raise os_error(exc, ref) from None
    finally:
        os.close(fd)
