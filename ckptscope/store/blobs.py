"""Content-addressed blob store: files named by their sha256, written atomically.

Bytes stream into a temp file in the store's own ``tmp/`` (same filesystem), hashed on one
thread and written on another as they arrive (``BlobWriter``), fsynced once, then renamed into
place. An aborted write leaves nothing behind.
Client file names are never used as paths.

Several server processes may share the store. A blob that an upload has just written (or found
already there) is *pinned* until the upload is registered or refused: a pin is a file
``pins/<sha>.<token>``, made under the store's lock (an ``flock`` on ``blobs.lock``) in the same
step that puts the blob in place. Deleting a blob takes the same lock and skips pinned blobs, so
a deletion in one process can never remove the bytes another process is about to register.

An upload's temp file is *held* while it is written: its writer keeps an ``flock`` on it (taken
under the store's lock, as it is made). Start-up cleaning removes every upload temp file no live
process holds, however fresh (a server killed mid-upload leaves nothing behind once one starts
again), and never one that another process sharing the data directory is still writing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckptscope.errors import TooLarge

from .file_lock import file_lock

PIN_TTL_S = 24 * 3600  # a pin older than this was left by a crashed process


@dataclass(frozen=True, slots=True)
class Blob:
    sha256: str
    size: int
    path: Path
    pin: Path | None = None  # held until the upload is registered or refused (BlobStore.unpin)


BATCH_BYTES = 4 << 20  # pieces are gathered into one writev (and one run of hash updates) this large
BATCHES_QUEUED = 3  # per worker: at most ~5 batches (20 MiB) held, however slow the disk is
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX"))


def _write_all(fd: int, pieces: list[bytes | memoryview]) -> None:
    """One ``writev`` of the pieces (more only where the kernel takes part of them): no copy into a
    buffer of our own."""
    views = [memoryview(p) for p in pieces]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first : first + IOV_MAX])
        while first < len(views) and written >= views[first].nbytes:
            written -= views[first].nbytes
            first += 1
        if written:
            views[first] = views[first][written:]


class _Worker:
    """A thread doing one job (hashing, or writing the file) to each batch in turn. Two of them let
    the hash and the writes overlap each other and the network read; the bounded queue makes the
    sender wait when the disk is slower than the network. An error is kept for the writer to raise;
    after one (or after ``stop``) the remaining batches are only drained."""

    def __init__(self, name: str, work: Callable[[list[bytes | memoryview]], None]) -> None:
        self._queue: queue.Queue[list[bytes | memoryview] | None] = queue.Queue(maxsize=BATCHES_QUEUED)
        self._work = work
        self.error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self.error is None and not self._stopped:
                try:
                    self._work(batch)
                except BaseException as exc:  # raised by the writer in the uploading thread
                    self.error = exc

    def put(self, batch: list[bytes | memoryview]) -> None:
        self._queue.put(batch)

    def finish(self, *, stop: bool = False) -> None:
        """Wait until every batch is done (with ``stop``: dropped, for an abort)."""
        self._stopped = self._stopped or stop
        self._queue.put(None)
        self._thread.join()


class BlobWriter:
    """Bytes of one upload into a held temp file: ``write`` only gathers the pieces (references,
    not copies) into batches of ``BATCH_BYTES``; a hashing thread and a writing thread (hashlib and
    ``writev`` release the GIL) each take every batch in order. A file smaller than one batch is
    hashed and written at ``commit`` without starting them. One fsync, at ``commit``."""

    def __init__(self, store: BlobStore, limit: int | None) -> None:
        self._store = store
        self._limit = limit
        with file_lock(store.lock_path):  # made and held in one step: never cleaned in between
            fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="upload-")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd: int | None = fd
        self._temp = Path(name)
        self._hash = hashlib.sha256()
        self._batch: list[bytes | memoryview] = []
        self._batch_bytes = 0
        self._workers: list[_Worker] = []
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        """Take the next bytes. They are kept until written, so ``data`` must be immutable: bytes or a
        read-only view of bytes (anything else is copied first)."""
        if not isinstance(data, bytes) and not (isinstance(data, memoryview) and data.readonly):
            data = bytes(data)
        size = len(data) if isinstance(data, bytes) else data.nbytes
        self.size += size
        if self._limit is not None and self.size > self._limit:
            self.abort()
            raise TooLarge(self._limit)
        if not size:
            return
        self._batch.append(data)
        self._batch_bytes += size
        if self._batch_bytes >= BATCH_BYTES or len(self._batch) >= IOV_MAX:
            self._dispatch()

    def _dispatch(self) -> None:
        if self._fd is None:
            raise ValueError("write to a blob writer that was committed or aborted")
        if not self._workers:
            fd = self._fd
            self._workers = [
                _Worker("blob-hash", self._hash_batch),
                _Worker("blob-write", lambda batch: _write_all(fd, batch)),
            ]
        self._raise_worker_error()
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        for worker in self._workers:
            worker.put(batch)

    def _hash_batch(self, batch: list[bytes | memoryview]) -> None:
        for piece in batch:
            self._hash.update(piece)

    def _raise_worker_error(self) -> None:
        for worker in self._workers:
            if worker.error is not None:
                raise worker.error

    def commit(self) -> Blob:
        if self._fd is None:
            raise ValueError("commit of a blob writer that was committed or aborted")
        if self._workers:
            if self._batch:
                self._dispatch()
            for worker in self._workers:
                worker.finish()
            self._raise_worker_error()
            self._workers = []
        elif self._batch:  # smaller than one batch: no threads
            self._hash_batch(self._batch)
            _write_all(self._fd, self._batch)
        self._batch = []
        os.fsync(self._fd)
        try:  # still held while it is moved into place
            return self._store._place(self._temp, self._hash.hexdigest(), self.size)
        finally:
            self._close()

    def abort(self) -> None:
        """Drop the upload: the threads stop (after the batch each is on) and the temp file goes."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.finish(stop=True)
        self._batch = []
        self._close()
        self._temp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def check_writable(root: Path) -> None:
    """Raise OSError with a one-line reason (for ``ckptscope serve``) when the data directory, or a
    folder or catalogue file already in it, cannot be written by this process."""
    where = root
    try:
        root.mkdir(parents=True, exist_ok=True)
        for where in (root, root / "blobs", root / "tmp", root / "pins"):
            if where.is_dir():
                with tempfile.TemporaryFile(dir=where):
                    pass
        where = root / "catalogue.db"
        if where.exists() and not os.access(where, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(
            f"data directory {root}: cannot write {where} as uid {os.getuid()} gid {os.getgid()} ({reason}); "
            "give the directory to this user or set CKPTSCOPE_DATA_DIR"
        ) from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.pin_dir = root / "pins"
        self.lock_path = root / "blobs.lock"
        for folder in (self.blob_dir, self.tmp_dir, self.pin_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.blob_dir / sha256[:2] / sha256

    def writer(self, limit: int | None = None) -> BlobWriter:
        return BlobWriter(self, limit)

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh path in the store's temp directory, for a file the server writes itself."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="write-", suffix=suffix)
        os.close(fd)
        return Path(name)

    def adopt(self, temp: Path) -> Blob:
        """Move a finished (fsynced) file from the temp directory into the store."""
        digest = hashlib.sha256()
        size = 0
        with temp.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        return self._place(temp, digest.hexdigest(), size)

    def _place(self, temp: Path, sha: str, size: int) -> Blob:
        """Pin the blob and move the finished temp file into place (or drop it: same bytes there)."""
        final = self.path_for(sha)
        pin = self.pin_dir / f"{sha}.{uuid.uuid4().hex}"
        with file_lock(self.lock_path):
            pin.touch()
            try:
                if final.exists():
                    temp.unlink()
                else:
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(temp, final)
                    _fsync_dir(final.parent)
            except BaseException:
                pin.unlink(missing_ok=True)
                raise
        return Blob(sha, size, final, pin)

    def unpin(self, blob: Blob) -> None:
        if blob.pin is not None:
            blob.pin.unlink(missing_ok=True)

    def _pinned(self, sha256: str) -> bool:
        cutoff = time.time() - PIN_TTL_S
        for pin in self.pin_dir.glob(f"{sha256}.*"):
            try:
                if pin.stat().st_mtime >= cutoff:
                    return True
                pin.unlink()
            except FileNotFoundError:
                pass
        return False

    def delete_unless(self, sha256: str, referenced: Callable[[], bool]) -> bool:
        """Delete a blob unless it is pinned or ``referenced()`` (asked under the lock, so nothing
        can pin it meanwhile). Returns whether it was deleted."""
        path = self.path_for(sha256)
        with file_lock(self.lock_path):
            if self._pinned(sha256) or referenced():
                return False
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()  # only succeeds when no other blob shares the prefix directory
            except OSError:
                pass
        return True

    def clean_tmp(self, older_than_s: float = 6 * 3600) -> None:
        """Remove temp files and pins a crashed process left behind (called at start-up): every
        upload temp file no process holds, and the server's own temp files (exports being written,
        spooled ranges of referenced objects) and pins when old (another server process sharing
        the data directory may be using them)."""
        with file_lock(self.lock_path):
            for upload in self.tmp_dir.glob("upload-*"):
                try:
                    with upload.open("rb") as fh:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: nobody writes it
                        upload.unlink()
                except BlockingIOError:
                    pass  # held by a live writer
                except FileNotFoundError:
                    pass
        now = time.time()
        leftovers = [(p, older_than_s) for p in self.tmp_dir.glob("write-*")]
        # byte ranges of referenced objects copied for a stats task or an export (stats/spool.py,
        # stats/localized.py); each process deletes its own, a killed one leaves them
        leftovers += [(p, older_than_s) for p in self.tmp_dir.glob("ckptscope-ranges-*")]
        leftovers += [(p, PIN_TTL_S) for p in self.pin_dir.iterdir()]
        for leftover, max_age in leftovers:
            try:
                if leftover.stat().st_mtime < now - max_age:
                    leftover.unlink()
            except FileNotFoundError:
                pass
